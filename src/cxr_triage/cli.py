"""`cxr-triage`: the command line others script against (DESIGN.md section 3)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic import ValidationError

from triage_core.settings import Settings
from triage_core.states import Role

from . import runtime


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        raise SystemExit(f"cxr-triage: bad configuration:\n{exc}") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxr-triage", description="Chest radiograph triage service.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="node + worker + API on one machine with the embedded defaults")
    sub.add_parser("node", help="the DICOM SCP and the quiet-period scheduler")
    sub.add_parser("worker", help="a Celery model worker")
    sub.add_parser("api", help="the dashboard API")
    db = sub.add_parser("db", help="database maintenance")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    db_sub.add_parser("upgrade", help="apply migrations")
    export = sub.add_parser("export", help="result exports to PACS")
    export_sub = export.add_subparsers(dest="export_command", required=True)
    retry = export_sub.add_parser("retry", help="send a study's results again, or every export that gave up (audited)")
    which = retry.add_mutually_exclusive_group(required=True)
    which.add_argument("--study", metavar="STUDY_INSTANCE_UID", help="every export of this study")
    which.add_argument("--failed", action="store_true", help="every export in EXPORT_FAILED")
    demo = sub.add_parser("demo", help="C-STORE the bundled sample studies to a running node and print the worklist")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for results")
    demo.add_argument("--api-key", default=None,
                      help="API key that reads the worklist (default: CXR_TRIAGE_API_KEY; none is needed while "
                           "the API runs on loopback with no authentication configured)")

    user = sub.add_parser("user", help="API users and their keys (radiologist, auditor, admin)")
    user_sub = user.add_subparsers(dest="user_command", required=True)
    add = user_sub.add_parser("add", help="create a user and print its API key (once: only its hash is stored)")
    add.add_argument("name")
    add.add_argument("--role", required=True, choices=[r.value for r in Role])
    user_sub.add_parser("list", help="list users, their roles and whether their key is revoked")
    revoke = user_sub.add_parser("revoke", help="revoke a user's key (the user stays in the list and the audit trail)")
    revoke.add_argument("name")

    audit_cmd = sub.add_parser("audit", help="the audit trail")
    audit_sub = audit_cmd.add_subparsers(dest="audit_command", required=True)
    audit_sub.add_parser("verify", help="check the hash chain; exit 1 naming the first altered, removed or "
                                        "reordered event")

    model = sub.add_parser("model", help="model directories: info, import, train, evaluate, calibrate, make-phantoms")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    info = model_sub.add_parser("info", help="print a model card")
    info.add_argument("model_dir", type=Path, nargs="?")
    imp = model_sub.add_parser("import", help="import a CheXNet / torchxrayvision / torchvision checkpoint")
    imp.add_argument("--from", dest="source", required=True, choices=["chexnet", "torchxrayvision", "torchvision"])
    imp.add_argument("checkpoint", type=Path)
    imp.add_argument("out_dir", type=Path)
    imp.add_argument("--name")
    imp.add_argument("--version")
    _add_training_parsers(model_sub)

    predict = sub.add_parser("predict", help="score DICOM or PNG/JPEG radiographs")
    predict.add_argument("files", type=Path, nargs="+")
    predict.add_argument("--model", type=Path, dest="model_dir")
    predict.add_argument("--heatmaps", type=Path, dest="heatmaps_dir")
    predict.add_argument("--json", action="store_true", dest="as_json")
    return parser


#: choices of the training commands; tests check them against cxr_model's own constants.
DATASETS = ("chestxray14", "chexpert")
SPLIT_SCHEMES = ("official", "random")
SPLIT_NAMES = ("train", "val", "test")
LOSSES = ("bce", "weighted-bce", "focal")
CALIBRATION_METHODS = ("temperature", "platt")


def _add_training_parsers(model_sub: argparse._SubParsersAction) -> None:
    """`model train | evaluate | calibrate | make-phantoms` (run by cxr_model.train_cli; choices mirror cxr_model)."""
    tr = model_sub.add_parser("train", help="train a DenseNet121 on ChestX-ray14 or CheXpert into a model directory")
    tr.add_argument("--dataset", required=True, choices=DATASETS)
    tr.add_argument("--data-dir", required=True, type=Path)
    tr.add_argument("--out", required=True, type=Path, help="model directory to write (weights, card, checkpoint)")
    tr.add_argument("--split", default="official", choices=SPLIT_SCHEMES,
                    help="official lists (validation = 10%% of train_val patients) or a patient-wise 70/10/20")
    tr.add_argument("--image-size", type=int, default=224)
    tr.add_argument("--epochs", type=int, default=3)
    tr.add_argument("--batch-size", type=int, default=16)
    tr.add_argument("--lr", type=float, default=1e-3)
    tr.add_argument("--loss", default="weighted-bce", choices=LOSSES)
    tr.add_argument("--focal-gamma", type=float, default=2.0)
    tr.add_argument("--init", default=None, help="torchvision:PATH (ImageNet DenseNet121 state dict) or model:DIR")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    tr.add_argument("--uncertainty", default="ignore",
                    help="CheXpert -1 labels: ignore|zeros|ones, or per finding e.g. 'ignore,Atelectasis=ones,Edema=ones'")
    tr.add_argument("--no-augment", dest="augment", action="store_false")
    tr.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    tr.add_argument("--workers", type=int, default=None, help="loader workers (default: 0 on CPU, up to 8 on CUDA)")
    tr.add_argument("--no-amp", dest="amp", action="store_false", default=None, help="no mixed precision on CUDA")
    tr.add_argument("--name")
    tr.add_argument("--version")
    tr.add_argument("--metadata", action="store_true",
                    help="also feed patient age, sex and view position (AP/PA) to the classifier (off by default; "
                         "DICOM inputs supply them, PNG/JPEG inputs count as unknown)")

    for name, default_split, helptext in (
        ("evaluate", "test", "ROC/reliability PNGs and metrics.json (AUROC with bootstrap CI, AUPRC, ECE, "
                             "operating points, Grad-CAM localisation vs a random map)"),
        ("calibrate", "val", "fit per-finding calibration (temperature or Platt) and operating thresholds into the "
                             "model card"),
    ):
        p = model_sub.add_parser(name, help=helptext)
        p.add_argument("--model", required=True, type=Path, dest="model_dir")
        p.add_argument("--dataset", required=True, choices=DATASETS)
        p.add_argument("--data-dir", required=True, type=Path)
        p.add_argument("--split", default=default_split, choices=SPLIT_NAMES)
        p.add_argument("--scheme", default=None, choices=SPLIT_SCHEMES,
                       help="split scheme (default: the one the model was trained with)")
        p.add_argument("--seed", type=int, default=None, help="split seed (default: the training seed)")
        p.add_argument("--uncertainty", default="ignore")
        p.add_argument("--batch-size", type=int, default=16)
        p.add_argument("--device", default=None)
        if name == "evaluate":
            p.add_argument("--out", required=True, type=Path, help="report directory")
            p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% CI")
        else:
            p.add_argument("--specificity", default=None,
                           help="fixed specificity instead of Youden's J: '0.9' for all or 'Nodule=0.95,Mass=0.9'")
            p.add_argument("--method", default="temperature", choices=CALIBRATION_METHODS,
                           help="temperature: sigmoid(logit / T); platt: sigmoid(a logit + b); per finding, by NLL")

    mp = model_sub.add_parser("make-phantoms", help="write synthetic phantoms in the ChestX-ray14 layout (pipeline tests)")
    mp.add_argument("out", type=Path)
    mp.add_argument("--n", type=int, default=400)
    mp.add_argument("--size", type=int, default=96)
    mp.add_argument("--seed", type=int, default=0)
    mp.add_argument("--prevalence", type=float, default=0.3)



def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
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
    elif args.command == "db":
        runtime.upgrade_database(settings)
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


def _model(args: argparse.Namespace) -> int:
    import cxr_model
    from cxr_model import cli as model_cli

    if args.model_command == "info":
        print(model_cli.info(args.model_dir or _settings().model_path or cxr_model.bundled_demo_path()))
        return 0
    from cxr_model import train_cli

    if args.model_command in train_cli.COMMANDS:
        return train_cli.run(args)
    from cxr_model.importers import import_checkpoint

    card = import_checkpoint(args.source, args.checkpoint, args.out_dir, name=args.name, version=args.version)
    print(f"imported {card.name} {card.version} into {args.out_dir} (weights SHA-256 {card.weights_sha256})")
    return 0


def _predict(args: argparse.Namespace) -> int:
    """Score files; exit 1 when any file errored (skipped files are an answer, not an error)."""
    import json

    import cxr_model
    from cxr_model import cli as model_cli

    from .dicom_input import read_radiograph_and_metadata, render_heatmap

    settings = _settings()
    model_dir = args.model_dir or settings.model_path or cxr_model.bundled_demo_path()
    model = runtime.load_model_for(settings, model_dir)
    records = model_cli.predict_records(args.files, model, heatmaps_dir=args.heatmaps_dir,
                                        read_image=read_radiograph_and_metadata, render_heatmap=render_heatmap)
    if args.as_json:
        print(json.dumps(records, indent=2))
    else:
        print(model_cli.format_records(records, demo=model.card.demo))
    return 1 if any(record["status"] == "error" for record in records) else 0


if __name__ == "__main__":
    sys.exit(main())
