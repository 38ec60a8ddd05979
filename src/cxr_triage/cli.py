"""`cxr-triage`: the command line others script against (DESIGN.md section 3).

Every failure an operator can cause (a bad or misspelt variable, a missing or altered model
directory, a database that does not answer, a port in use, an unreadable input) is one line on
stderr naming the variable or file, and a non-zero exit status; never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from triage_core.settings import Settings, SettingsError, env_file_path, load_settings, unknown_variables
from triage_core.states import Role

from . import runtime
from .runtime import CliError


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after every option's help (not the empty ones: their help says what happens);
    descriptions and epilogs kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False) or "default:" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def _settings() -> Settings:
    return load_settings()


def _settings_epilog(*fields: str) -> str:
    """The settings a service reads, with their defaults (README "Configuration" has them all)."""
    lines = ["settings (environment variables, or the file CXR_TRIAGE_ENV_FILE names):"]
    for field in fields:
        info = Settings.model_fields[field]
        default = info.default if info.default not in (None, "", []) else "-"
        lines.append(f"  CXR_TRIAGE_{field.upper():<32} default: {default}")
    return "\n".join(lines)


_SERVICE_SETTINGS = {
    "serve": ("data_dir", "database_url", "broker_url", "ae_title", "dicom_port", "api_host", "api_port",
              "model_path", "export_destinations", "node_metrics_port", "worker_metrics_port", "log_format"),
    "node": ("data_dir", "database_url", "broker_url", "ae_title", "dicom_host", "dicom_port",
             "allowed_calling_aets", "series_quiet_seconds", "storage_url", "metrics_host", "node_metrics_port"),
    "worker": ("data_dir", "database_url", "broker_url", "model_path", "model_runtime", "model_device",
               "worker_concurrency", "model_threads", "export_destinations", "storage_url", "metrics_host",
               "worker_metrics_port", "heartbeat_seconds"),
    "api": ("data_dir", "database_url", "broker_url", "api_host", "api_port", "oidc_issuer", "oidc_audience",
            "storage_url", "min_free_disk_mb", "export_backlog_minutes"),
}


def _command(sub, name: str, text: str, epilog: str | None = None) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=text, description=text, epilog=epilog, formatter_class=_Formatter)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxr-triage", description="Chest radiograph triage service.",
                                     formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {runtime.package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="one of these (each has --help)")
    _command(sub, "serve", "node + worker + API on one machine, supervised (a dead one is restarted)",
             _settings_epilog(*_SERVICE_SETTINGS["serve"]))
    _command(sub, "node", "the DICOM SCP (C-ECHO, C-STORE) and the scheduler (quiet period, sweeper)",
             _settings_epilog(*_SERVICE_SETTINGS["node"]))
    _command(sub, "worker", "a Celery model worker: runs the model, writes and exports the results",
             _settings_epilog(*_SERVICE_SETTINGS["worker"]))
    _command(sub, "api", "the dashboard API, DICOMweb, /health/ready and /metrics",
             _settings_epilog(*_SERVICE_SETTINGS["api"]))
    health = _command(sub, "health", "readiness of the deployment (database, broker, model workers, nodes, disk, "
                                     "exports; exit 0 ready or degraded, 1 not ready), or with --service the "
                                     "liveness of one service on this host (container healthchecks)")
    health.add_argument("--service", choices=["node", "worker", "api"], default=None,
                        help="node: C-ECHO to the local SCP; worker: a fresh heartbeat of this host with its model "
                             "loaded; api: GET /health/live on the local port")
    health.add_argument("--json", action="store_true", dest="as_json", help="print the checks as JSON")
    db = _command(sub, "db", "database maintenance")
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="DB_COMMAND", help="one of these (each has --help)")
    _command(db_sub, "upgrade", "apply the migrations (packaged with cxr-triage) to CXR_TRIAGE_DATABASE_URL")
    export = _command(sub, "export", "result exports to PACS")
    export_sub = export.add_subparsers(dest="export_command", required=True, metavar="EXPORT_COMMAND", help="one of these (each has --help)")
    retry = _command(export_sub, "retry", "send a study's results again, or every export that gave up (audited)")
    which = retry.add_mutually_exclusive_group(required=True)
    which.add_argument("--study", metavar="STUDY_INSTANCE_UID", help="every export of this study")
    which.add_argument("--failed", action="store_true", help="every export in EXPORT_FAILED")
    demo = _command(sub, "demo", "C-STORE the bundled sample studies to a running node and print the worklist")
    demo.add_argument("--host", default="127.0.0.1", help="where the node and the API run")
    demo.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for results")
    demo.add_argument("--api-key", default=None,
                      help="API key that reads the worklist (default: CXR_TRIAGE_API_KEY; none is needed while "
                           "the API runs on loopback with no authentication configured)")

    user = _command(sub, "user", "API users and their keys (radiologist, auditor, admin)")
    user_sub = user.add_subparsers(dest="user_command", required=True, metavar="USER_COMMAND", help="one of these (each has --help)")
    add = _command(user_sub, "add", "create a user and print its API key (once: only its hash is stored)")
    add.add_argument("name", help="user name (letters, digits, . _ @ -)")
    add.add_argument("--role", required=True, choices=[r.value for r in Role], help="what the user may do")
    _command(user_sub, "list", "list users, their roles and whether their key is revoked")
    revoke = _command(user_sub, "revoke", "revoke a user's key (the user stays in the list and the audit trail)")
    revoke.add_argument("name", help="user name")

    audit_cmd = _command(sub, "audit", "the audit trail")
    audit_sub = audit_cmd.add_subparsers(dest="audit_command", required=True, metavar="AUDIT_COMMAND", help="one of these (each has --help)")
    _command(audit_sub, "verify", "check the hash chain; exit 1 naming the first altered, removed or reordered event")

    model = _command(sub, "model", "model directories: info, import, train, evaluate, calibrate, make-phantoms")
    model_sub = model.add_subparsers(dest="model_command", required=True, metavar="MODEL_COMMAND", help="one of these (each has --help)")
    info = _command(model_sub, "info", "print a model card")
    info.add_argument("model_dir", type=Path, nargs="?", help="model directory (default: CXR_TRIAGE_MODEL_PATH, "
                                                               "else the bundled demo model)")
    imp = _command(model_sub, "import", "import a CheXNet / torchxrayvision / torchvision checkpoint into a new "
                                        "model directory (outputs mapped by finding name)")
    imp.add_argument("--from", dest="source", required=True, choices=["chexnet", "torchxrayvision", "torchvision"],
                     help="the checkpoint's origin")
    imp.add_argument("checkpoint", type=Path, help="checkpoint file")
    imp.add_argument("out_dir", type=Path, help="model directory to write")
    imp.add_argument("--name", help="model name for the card (default: from the source)")
    imp.add_argument("--version", help="model version for the card (default: from the source)")
    imp.add_argument("--force", action="store_true", help="overwrite OUT_DIR when it already holds files")
    _add_training_parsers(model_sub)

    predict = _command(sub, "predict", "score DICOM or PNG/JPEG radiographs (exit 1 when a file cannot be read)")
    predict.add_argument("files", type=Path, nargs="+", help="DICOM, PNG or JPEG files")
    predict.add_argument("--model", type=Path, dest="model_dir",
                         help="model directory (default: CXR_TRIAGE_MODEL_PATH, else the bundled demo model)")
    predict.add_argument("--heatmaps", type=Path, dest="heatmaps_dir", help="write heatmap PNGs here")
    predict.add_argument("--json", action="store_true", dest="as_json", help="print JSON")
    _add_progress(predict)
    return parser


def _add_progress(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress on stderr (default: only when stderr is a terminal)")


#: choices of the training commands; tests check them against cxr_model's own constants.
DATASETS = ("chestxray14", "chexpert")
SPLIT_SCHEMES = ("official", "random")
SPLIT_NAMES = ("train", "val", "test")
LOSSES = ("bce", "weighted-bce", "focal")
CALIBRATION_METHODS = ("temperature", "platt")


def _add_training_parsers(model_sub: argparse._SubParsersAction) -> None:
    """`model train | evaluate | calibrate | make-phantoms` (run by cxr_model.train_cli; choices mirror cxr_model)."""
    tr = _command(model_sub, "train", "train a DenseNet121 on ChestX-ray14 or CheXpert into a model directory")
    tr.add_argument("--dataset", required=True, choices=DATASETS, help="data set layout")
    tr.add_argument("--data-dir", required=True, type=Path, help="data set directory")
    tr.add_argument("--out", required=True, type=Path, help="model directory to write (weights, card, checkpoint)")
    tr.add_argument("--split", default="official", choices=SPLIT_SCHEMES,
                    help="official lists (validation = 10%% of train_val patients) or a patient-wise 70/10/20")
    tr.add_argument("--image-size", type=int, default=224, help="input size in pixels")
    tr.add_argument("--epochs", type=int, default=3, help="training epochs")
    tr.add_argument("--batch-size", type=int, default=16, help="images per batch")
    tr.add_argument("--lr", type=float, default=1e-3, help="learning rate (AdamW)")
    tr.add_argument("--loss", default="weighted-bce", choices=LOSSES, help="loss function")
    tr.add_argument("--focal-gamma", type=float, default=2.0, help="gamma of the focal loss")
    tr.add_argument("--init", default=None, help="torchvision:PATH (ImageNet DenseNet121 state dict) or model:DIR")
    tr.add_argument("--seed", type=int, default=0, help="random seed (deterministic on the CPU)")
    tr.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    tr.add_argument("--uncertainty", default="ignore",
                    help="CheXpert -1 labels: ignore|zeros|ones, or per finding e.g. 'ignore,Atelectasis=ones,Edema=ones'")
    tr.add_argument("--no-augment", dest="augment", action="store_false", help="no augmentation")
    tr.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    tr.add_argument("--workers", type=int, default=None, help="loader workers (default: 0 on CPU, up to 8 on CUDA)")
    tr.add_argument("--no-amp", dest="amp", action="store_false", default=None, help="no mixed precision on CUDA")
    tr.add_argument("--name", help="model name for the card")
    tr.add_argument("--version", help="model version for the card")
    tr.add_argument("--metadata", action="store_true",
                    help="also feed patient age, sex and view position (AP/PA) to the classifier (off by default; "
                         "DICOM inputs supply them, PNG/JPEG inputs count as unknown)")

    for name, default_split, helptext in (
        ("evaluate", "test", "ROC/reliability PNGs and metrics.json (AUROC with bootstrap CI, AUPRC, ECE, "
                             "operating points, Grad-CAM localisation vs a random map)"),
        ("calibrate", "val", "fit per-finding calibration (temperature or Platt) and operating thresholds into the "
                             "model card"),
    ):
        p = _command(model_sub, name, helptext)
        _add_progress(p)
        p.add_argument("--model", required=True, type=Path, dest="model_dir", help="model directory")
        p.add_argument("--dataset", required=True, choices=DATASETS, help="data set layout")
        p.add_argument("--data-dir", required=True, type=Path, help="data set directory")
        p.add_argument("--split", default=default_split, choices=SPLIT_NAMES, help="which split to score")
        p.add_argument("--scheme", default=None, choices=SPLIT_SCHEMES,
                       help="split scheme (default: the one the model was trained with)")
        p.add_argument("--seed", type=int, default=None, help="split seed (default: the training seed)")
        p.add_argument("--uncertainty", default="ignore", help="CheXpert -1 labels: ignore|zeros|ones (per finding allowed)")
        p.add_argument("--batch-size", type=int, default=16, help="images per batch")
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
        if name == "evaluate":
            p.add_argument("--out", required=True, type=Path, help="report directory")
            p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% CI")
        else:
            p.add_argument("--specificity", default=None,
                           help="fixed specificity instead of Youden's J: '0.9' for all or 'Nodule=0.95,Mass=0.9'")
            p.add_argument("--method", default="temperature", choices=CALIBRATION_METHODS,
                           help="temperature: sigmoid(logit / T); platt: sigmoid(a logit + b); per finding, by NLL")

    mp = _command(model_sub, "make-phantoms", "write synthetic phantoms in the ChestX-ray14 layout (pipeline tests)")
    mp.add_argument("out", type=Path, help="directory to write")
    mp.add_argument("--n", type=int, default=400, help="number of images")
    mp.add_argument("--size", type=int, default=96, help="image size in pixels")
    mp.add_argument("--seed", type=int, default=0, help="random seed")
    mp.add_argument("--prevalence", type=float, default=0.3, help="fraction of images with each drawn finding")



def _warn_about_environment() -> None:
    """Misspelt CXR_TRIAGE_* names, and a .env here that is not read, said once on stderr."""
    for name, suggestion in unknown_variables():
        hint = f"; did you mean {suggestion}?" if suggestion else " (see README 'Configuration')"
        print(f"cxr-triage: warning: {name} is not a setting and is ignored{hint}", file=sys.stderr)
    try:
        named = env_file_path()
    except SettingsError:
        return  # reported with the other configuration errors
    if named is None and Path(".env").is_file():
        print("cxr-triage: note: ./.env is not read; set CXR_TRIAGE_ENV_FILE=.env to use it", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _warn_about_environment()
    where = " ".join(part for part in (args.command, getattr(args, f"{args.command}_command", None)) if part)
    try:
        return _run(args)
    except CliError as exc:
        print(f"cxr-triage {where}: {exc}", file=sys.stderr)
        return exc.status
    except SettingsError as exc:
        print("cxr-triage: bad configuration: " + "\n  ".join(exc.problems), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from sqlalchemy.exc import OperationalError, ProgrammingError

        if isinstance(exc, (OperationalError, ProgrammingError)):
            try:
                settings = _settings()
            except SettingsError:
                raise exc from None
            hint = " (has `cxr-triage db upgrade` run?)" if "no such table" in str(exc) or "does not exist" in str(
                exc) else ""
            print(f"cxr-triage {where}: {runtime.database_error(exc, settings)}{hint}", file=sys.stderr)
            return 2
        import cxr_model

        if isinstance(exc, cxr_model.ModelError):
            print(f"cxr-triage {where}: {exc}", file=sys.stderr)
            return 2
        raise


def _run(args: argparse.Namespace) -> int:
    if args.command == "model":
        return _model(args)
    if args.command == "predict":
        return _predict(args)
    settings = _settings()
    runtime.configure_logging(settings, args.command)
    if args.command == "serve":
        return runtime.run_serve(settings)
    if args.command == "node":
        runtime.run_node(settings)
    elif args.command == "worker":
        runtime.run_worker(settings)
    elif args.command == "api":
        runtime.run_api(settings)
    elif args.command == "health":
        from .health import health_command

        return health_command(settings, service=args.service, as_json=args.as_json)
    elif args.command == "db":
        runtime.upgrade_database(settings)
        print(f"database schema is at head ({runtime._safe_url(settings.database_url)})")
    elif args.command == "export":
        return runtime.retry_exports(settings, study_instance_uid=args.study, failed=args.failed)
    elif args.command == "demo":
        from .demo import run_demo

        return run_demo(settings, host=args.host, timeout=args.timeout, api_key=args.api_key)
    elif args.command == "user":
        return runtime.user_command(settings, args)
    elif args.command == "audit":
        return runtime.audit_command(settings, args)
    return 0


def _progress(args: argparse.Namespace, label: str):
    from .progress import Progress

    return Progress(label, enabled=args.progress)


def _model(args: argparse.Namespace) -> int:
    import cxr_model
    from cxr_model import cli as model_cli

    if args.model_command == "info":
        print(model_cli.info(args.model_dir or _settings().model_path or cxr_model.bundled_demo_path()))
        return 0
    from cxr_model import train_cli

    if args.model_command in train_cli.COMMANDS:
        if args.model_command in ("evaluate", "calibrate"):
            progress = _progress(args, f"{args.model_command} {args.split}")
            args.on_progress = progress.update
            args.on_warning = lambda message: print(f"cxr-triage model {args.model_command}: warning: {message}",
                                                    file=sys.stderr)
            try:
                return train_cli.run(args)
            finally:
                progress.close()
        return train_cli.run(args)
    from cxr_model.importers import import_checkpoint

    out_dir: Path = args.out_dir
    if out_dir.exists() and not out_dir.is_dir():
        raise CliError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not args.force:
        raise CliError(f"{out_dir} already holds files (a model?): choose a new directory or pass --force to "
                       "overwrite it")
    card = import_checkpoint(args.source, args.checkpoint, out_dir, name=args.name, version=args.version)
    print(f"imported {card.name} {card.version} into {out_dir} (weights SHA-256 {card.weights_sha256})")
    return 0


def _predict(args: argparse.Namespace) -> int:
    """Score files; exit 1 when any file errored (skipped files are an answer, not an error)."""
    import json

    from cxr_model import cli as model_cli

    from .dicom_input import read_radiograph_and_metadata, render_heatmap

    settings = _settings()
    runtime.configure_logging(settings, "predict")
    runtime.check_model_dir(settings, args.model_dir)
    model = runtime.load_model_for(settings, args.model_dir)
    progress = _progress(args, "predict")
    try:
        records = model_cli.predict_records(args.files, model, heatmaps_dir=args.heatmaps_dir,
                                            read_image=read_radiograph_and_metadata, render_heatmap=render_heatmap,
                                            progress=progress.update)
    finally:
        progress.close()
    if args.as_json:
        print(json.dumps(records, indent=2))
    else:
        print(model_cli.format_records(records, demo=model.card.demo))
    errors = [record for record in records if record["status"] == "error"]
    for record in errors:
        print(f"cxr-triage predict: {record['file']}: {record['reason']}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
