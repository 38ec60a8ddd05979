"""Composition roots: each service wires the packages together here and nowhere else."""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from triage_core.db import Database
from triage_core.settings import Settings

log = logging.getLogger("cxr_triage")

#: The Alembic migrations travel inside the package (a wheel can `db upgrade`): alembic.ini at a
#: checkout's root points here too, for `alembic revision`.
MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def configure_logging(settings: Settings, service: str) -> None:
    """JSON lines (CXR_TRIAGE_LOG_FORMAT=json, the default off a terminal) or plain text; libraries at WARNING."""
    from .logs import configure

    configure(settings.log_level, settings.log_format, service)


def alembic_config(database_url: str):
    """Alembic's configuration without an ini file: the packaged migrations and this URL."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["database_url"] = database_url
    config.attributes["configure_logging"] = False
    return config


def upgrade_database(settings: Settings) -> None:
    from alembic import command

    settings.ensure_dirs()
    command.upgrade(alembic_config(settings.database_url), "head")
    log.info("database schema is at head (%s)", _safe_url(settings.database_url))


def _cli_actor() -> str:
    import getpass
    import socket

    try:
        who = getpass.getuser()
    except Exception:  # no user name for this uid (containers)
        who = str(os.getuid())
    return f"cli:{who}@{socket.gethostname()}"


def retry_exports(settings: Settings, *, study_instance_uid: str | None, failed: bool) -> int:
    """`cxr-triage export retry`: make the exports pending and due now, and publish them; audited with
    the operating-system user as the actor. Exit 1 when nothing matched."""
    from triage_core import work
    from worker.celery_app import Publisher, make_celery
    from worker.tasks import publish_exports

    sink = audit_sink(settings)
    database = Database(settings.database_url, audit_sink=sink)
    try:
        with database.session() as session:
            exports = work.request_export_retry(session, actor=_cli_actor(),
                                                study_instance_uid=study_instance_uid, failed=failed)
            rows = [(e.id, e.destination, e.study.study_instance_uid) for e in exports]
        if not rows:
            print("no export matched" + (f" for study {study_instance_uid}" if study_instance_uid else ""))
            return 1
        publish_exports(database, Publisher(make_celery(settings)), [export_id for export_id, _, _ in rows])
        for export_id, destination, study_uid in rows:
            print(f"export {export_id}: study {study_uid} to {destination}: pending, due now")
        return 0
    finally:
        if sink is not None:
            sink.flush()
        database.dispose()


def user_command(settings: Settings, args) -> int:
    """`cxr-triage user add|list|revoke`: on the database directly, each change audited."""
    from triage_core import users

    sink = audit_sink(settings)
    database = Database(settings.database_url, audit_sink=sink)
    try:
        with database.session() as session:
            if args.user_command == "add":
                new = users.create_user(session, name=args.name, role=args.role, actor=_cli_actor())
                print(f"created {new.user.name} ({new.user.role}). API key, shown once; send it as "
                      f"'Authorization: Bearer <key>':", file=sys.stderr)
                print(new.key)
            elif args.user_command == "list":
                rows = users.list_users(session)
                print(f"{'name':<24} {'role':<12} {'key':<14} {'created':<26} revoked")
                for user in rows:
                    revoked = user.revoked_at.isoformat(timespec="seconds") if user.revoked_at else "-"
                    print(f"{user.name:<24} {user.role:<12} {user.key_prefix + '...':<14} "
                          f"{user.created_at.isoformat(timespec='seconds'):<26} {revoked}")
            else:
                user = users.revoke_user(session, name=args.name, actor=_cli_actor())
                print(f"revoked {user.name} ({user.role}) at {user.revoked_at.isoformat(timespec='seconds')}")
    except users.UserError as exc:
        print(f"cxr-triage user {args.user_command}: {exc}", file=sys.stderr)
        return 2
    finally:
        if sink is not None:
            sink.flush()
        database.dispose()
    return 0


def audit_command(settings: Settings, args) -> int:
    """`cxr-triage audit verify`: 0 when the chain is intact, 1 naming the first broken event."""
    from triage_core.audit_chain import verify

    database = Database(settings.database_url)
    try:
        with database.session() as session:
            result = verify(session)
    finally:
        database.dispose()
    if result.intact:
        print(f"audit trail intact: {result.events} events, head seq={result.head_seq} hash={result.head_hash}")
        return 0
    problem = result.problem
    print(f"audit trail BROKEN ({problem.kind}): {problem.message}")
    print(f"{result.events} events verified before it; chain head seq={result.head_seq} hash={result.head_hash}")
    return 1


def audit_sink(settings: Settings):
    """The syslog copy of the audit trail when CXR_TRIAGE_AUDIT_SYSLOG is set, else None."""
    if not settings.audit_syslog:
        return None
    from triage_core.atna import SyslogSink

    return SyslogSink.from_settings(settings)


def _safe_url(url: str) -> str:
    from sqlalchemy import make_url

    return make_url(url).render_as_string(hide_password=True)


#: Auto concurrency stops here: each process holds its own model and runtime (several hundred MB).
MAX_AUTO_WORKERS = 8


@dataclass(frozen=True)
class WorkerPlan:
    """How the model worker uses the machine: processes x intra-op threads."""

    concurrency: int
    threads: int | None
    gpu: bool
    #: Studies scored in one batch (CXR_TRIAGE_BATCH_STUDIES).
    batch_studies: int = 1


def usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _gpu_expected(settings: Settings) -> bool:
    """Whether the model will run on a GPU, decided without initialising CUDA (the pool forks afterwards)."""
    if settings.model_device:
        return settings.model_device.startswith("cuda")
    return Path("/dev/nvidiactl").exists()


def worker_plan(settings: Settings, cores: int | None = None, gpu: bool | None = None) -> WorkerPlan:
    """Processes and threads for the model worker.

    On the CPU, one single-threaded process per core: bench/model_bench.py
    measured two 1-thread processes at 1.1-1.9x the images/s of one 2-thread
    process (DenseNet121 at 224, ONNX Runtime) on the 2-core build machine,
    and a study's preprocessing, result encoding and storage run alongside
    another's inference. On a GPU one process feeds the device. The settings,
    when given, win; threads left unset divide the cores among the processes.
    """
    cores = usable_cores() if cores is None else cores
    gpu = _gpu_expected(settings) if gpu is None else gpu
    concurrency = settings.worker_concurrency or (1 if gpu else min(cores, MAX_AUTO_WORKERS))
    threads = settings.model_threads or (None if gpu else max(1, cores // concurrency))
    return WorkerPlan(concurrency, threads, gpu, settings.batch_studies or (8 if gpu else 1))


class CliError(Exception):
    """A one-line answer for the operator (the variable or file at fault named), and an exit status."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cxr-triage")
    except PackageNotFoundError:  # pragma: no cover - a bare checkout
        return "0+unknown"


def _model_variable(settings: Settings, path) -> str:
    return "CXR_TRIAGE_MODEL_PATH" if path is None and settings.model_path else "--model" if path else "bundled model"


def check_model_dir(settings: Settings, path=None):
    """The model directory's card, and its weights' SHA-256 against the card, without loading torch:
    a missing or tampered directory stops a service at start with one line naming it."""
    import cxr_model
    from cxr_model.card import load_card, sha256_file

    directory = Path(path or settings.model_path or cxr_model.bundled_demo_path())
    where = _model_variable(settings, path)
    if not directory.is_dir():
        raise CliError(f"model directory {directory} ({where}) does not exist")
    try:
        card = load_card(directory)
    except cxr_model.ModelError as exc:
        raise CliError(f"model directory {directory} ({where}): {exc}") from None
    weights = directory / card.weights_file
    if not weights.is_file():
        raise CliError(f"model directory {directory} ({where}): weights file {weights.name} is missing")
    if sha256_file(weights) != card.weights_sha256:
        raise CliError(f"model directory {directory} ({where}): {weights.name} does not match the SHA-256 in "
                       "model_card.json (altered or replaced weights)")
    return card


def load_model_for(settings: Settings, path=None, threads: int | None = None):
    """The model the worker uses: ``path``, else CXR_TRIAGE_MODEL_PATH, else the bundled demo model.

    ``threads`` defaults to CXR_TRIAGE_MODEL_THREADS; the worker passes its plan's.
    The ONNX graph exported from the weights is cached under the data directory.
    """
    import cxr_model

    path = path or settings.model_path or cxr_model.bundled_demo_path()
    device = settings.model_device or None
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else None
    model = cxr_model.load_model(path, runtime=settings.model_runtime, threads=threads or settings.model_threads,
                                 device=device, cache_dir=settings.data_dir / "cache" / "onnx")
    card = model.card
    log.info("model %s %s loaded from %s (runtime %s, device %s)%s", card.name, card.version, path, model.runtime,
             device or "cpu",
             " -- DEMO WEIGHTS, not trained on clinical data" if card.demo else "")
    return TimedModel(model, device or "cpu")


class TimedModel:
    """The loaded model, each predict call timed into cxr_triage_model_seconds (the worker's metrics)."""

    def __init__(self, model, device: str) -> None:
        self._model = model
        self.device = device

    def __getattr__(self, name: str):
        return getattr(self._model, name)

    def predict(self, images, *args, **kwargs):
        from triage_core import metrics

        started = time.perf_counter()
        result = self._model.predict(images, *args, **kwargs)
        metrics.worker().model_seconds.labels(self._model.runtime).observe(time.perf_counter() - started)
        metrics.worker().model_images.labels(self._model.runtime).inc(len(images))
        return result

    def describe(self) -> dict:
        card = self._model.card
        return {"name": card.name, "version": card.version, "runtime": self._model.runtime, "device": self.device}


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(sig: int = signal.SIGTERM, parent_pid: int | None = None) -> None:
    """Ask Linux to send `sig` to this process when its parent dies (prctl PR_SET_PDEATHSIG), so that
    no child of `serve` (or of the Celery worker) outlives it, even after a kill -9. If the parent is
    already gone (it died before the request), act on it now."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %s", ctypes.get_errno())
        return
    if parent_pid is not None and os.getppid() != parent_pid:
        os.kill(os.getpid(), sig)


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.is_set():
        stop.wait(1.0)


def bind_check(host: str, port: int, variable: str, what_port: str = "port") -> None:
    """Raise CliError naming `variable` when host:port cannot be bound (in use, not ours, no such address)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            what = "is in use" if exc.errno == 98 else f"cannot be bound: {exc.strerror or exc}"
            raise CliError(f"{what_port} {port} on {host} ({variable}) {what}") from None


def serve_metrics(settings: Settings, port: int, variable: str, registry):
    """Prometheus /metrics of this process on metrics_host:port (0: none)."""
    if not port:
        return None
    from prometheus_client import start_http_server

    try:
        server, thread = start_http_server(port, addr=settings.metrics_host, registry=registry)
    except OSError as exc:
        what = "is in use" if exc.errno == 98 else f"cannot be bound: {exc.strerror or exc}"
        raise CliError(f"metrics port {port} on {settings.metrics_host} ({variable}) {what}") from None
    log.info("metrics on http://%s:%s/metrics", settings.metrics_host, port)
    return server


def _receiving_process(settings: Settings) -> None:
    """In each receiving process of the node: its logging, and it dies with the node (even a kill -9 of it)."""
    configure_logging(settings, "node")
    die_with_parent(signal.SIGTERM)


def node_metrics_dir(settings: Settings) -> Path:
    """PROMETHEUS_MULTIPROC_DIR of this node (its receiving processes count too): one per host and port."""
    return settings.data_dir / "prometheus" / f"node-{os.uname().nodename}-{settings.node_metrics_port}"


def run_node(settings: Settings) -> None:
    """The DICOM edge (listeners and admission here, associations in receiving processes), the
    scheduler (quiet-period readiness and the sweeper), the node's heartbeat and its /metrics."""
    from functools import partial

    settings.ensure_dirs()
    bind_check(settings.dicom_host, settings.dicom_port, "CXR_TRIAGE_DICOM_PORT")
    if settings.node_metrics_port:
        bind_check(settings.metrics_host, settings.node_metrics_port, "CXR_TRIAGE_NODE_METRICS_PORT", "metrics port")
        # Before prometheus_client is imported: the receiving processes (spawned with this environment)
        # write their counts to files here, summed by this process's /metrics; cleaned at start.
        multiproc = node_metrics_dir(settings)
        if multiproc.exists():
            shutil.rmtree(multiproc)
        multiproc.mkdir(parents=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(multiproc)

    from dicom_node.processes import receiver_processes, start_node
    from dicom_node.readiness import Scheduler
    from triage_core.health import HeartbeatThread
    from triage_core.metrics import DiskCollector
    from triage_core.work import WorkPolicy
    from worker.celery_app import Publisher, make_celery

    database = Database(settings.database_url, audit_sink=audit_sink(settings))
    check_database(database, settings)
    publisher = Publisher(make_celery(settings))
    metrics_server = None
    if settings.node_metrics_port:
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        registry.register(DiskCollector(settings.data_dir))
        metrics_server = serve_metrics(settings, settings.node_metrics_port, "CXR_TRIAGE_NODE_METRICS_PORT", registry)
    try:
        edge = start_node(settings, database, receiver_processes(settings),
                          initializer=partial(_receiving_process, settings))
    except OSError as exc:
        raise CliError(f"port {settings.dicom_port} on {settings.dicom_host} (CXR_TRIAGE_DICOM_PORT) cannot be "
                       f"bound: {exc.strerror or exc}") from None
    scheduler = Scheduler(database, settings.series_quiet_seconds, publisher.job, publisher.export,
                          WorkPolicy.from_settings(settings), settings.sweep_interval_seconds)
    scheduler.start()
    heartbeat = HeartbeatThread(database, "node", settings.heartbeat_seconds, package_version()).start()
    try:
        _wait_for_signal()
    finally:
        log.info("node stopping")
        edge.shutdown()
        scheduler.stop()
        heartbeat.stop()
        if metrics_server is not None:
            metrics_server.shutdown()
        database.dispose()


def check_database(database: Database, settings: Settings) -> None:
    """One-line CliError naming CXR_TRIAGE_DATABASE_URL when the database does not answer."""
    from sqlalchemy import text
    from sqlalchemy.exc import SQLAlchemyError

    try:
        with database.session() as session:
            session.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        raise CliError(database_error(exc, settings)) from None


def database_error(exc: BaseException, settings: Settings) -> str:
    original = getattr(exc, "orig", None) or exc
    lines = str(original).strip().splitlines()
    return (f"database {_safe_url(settings.database_url)} (CXR_TRIAGE_DATABASE_URL) cannot be used: "
            f"{lines[0] if lines else type(original).__name__}")


def worker_metrics_dir(settings: Settings) -> Path:
    """PROMETHEUS_MULTIPROC_DIR of this worker: under the data directory, one per host and port."""
    return settings.data_dir / "prometheus" / f"worker-{os.uname().nodename}-{settings.worker_metrics_port}"


def run_worker(settings: Settings) -> None:
    settings.ensure_dirs()
    check_model_dir(settings)
    if settings.worker_metrics_port:
        bind_check(settings.metrics_host, settings.worker_metrics_port, "CXR_TRIAGE_WORKER_METRICS_PORT",
                   "metrics port")
        # Before prometheus_client is imported: the model processes then write their values to files
        # here, summed by this process's /metrics. Cleaned at start: a dead worker's values must not count.
        multiproc = worker_metrics_dir(settings)
        if multiproc.exists():
            import shutil

            shutil.rmtree(multiproc)
        multiproc.mkdir(parents=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(multiproc)

    from celery import signals as celery_signals

    from triage_core import metrics
    from triage_core.health import HeartbeatThread
    from worker.celery_app import QUEUE, make_celery
    from worker.tasks import register_tasks

    database = Database(settings.database_url, audit_sink=audit_sink(settings))
    check_database(database, settings)
    app = make_celery(settings)
    plan = worker_plan(settings)
    settings.batch_studies = plan.batch_studies
    pipeline = register_tasks(app, settings, database, lambda: load_model_for(settings, threads=plan.threads))
    pool = "solo" if plan.concurrency == 1 else "prefork"
    log.info("model worker: %d process(es) x %s thread(s)%s", plan.concurrency, plan.threads or "default",
             " on a GPU" if plan.gpu else "")
    metrics_server = None
    if settings.worker_metrics_port:
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        registry.register(metrics.DiskCollector(settings.data_dir))
        metrics_server = serve_metrics(settings, settings.worker_metrics_port, "CXR_TRIAGE_WORKER_METRICS_PORT",
                                       registry)
    state: dict = {"error": "", "heartbeat": None}

    def describe():
        model = pipeline._model
        return (model.describe() if model is not None else None), state["error"]

    def warm(**_):
        # A forked child must not share the parent's database connections; then load the model now,
        # not on the first study (a failure here is logged, reported in the heartbeat, and the job that
        # needs it fails with the reason).
        database.engine.dispose(close=False)
        try:
            started = time.monotonic()
            pipeline.warm_up()
            metrics.worker().model_loaded.set(1)
            log.info("model process ready: warm-up took %.0f ms", 1000 * (time.monotonic() - started))
        except Exception as exc:
            state["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            metrics.worker().model_loaded.set(0)
            log.exception("model failed to load; jobs will fail with the reason until it does")
        state["heartbeat"] = HeartbeatThread(database, "worker", settings.heartbeat_seconds, package_version(),
                                             describe).start()

    def stop_heartbeat(**_):
        if state["heartbeat"] is not None:
            state["heartbeat"].stop()
        if settings.worker_metrics_port:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(os.getpid())

    def pool_child(**kwargs):
        # A SIGTERM to the whole process group (systemd's KillMode=control-group, Ctrl-C's SIGINT is
        # already ignored by Celery's children) must reach only the main process, which then drains
        # the pool: a child killed under it deadlocks Celery's pool shutdown. A child never outlives
        # its main process, not even a kill -9 of it.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        die_with_parent(signal.SIGKILL)
        warm(**kwargs)

    if pool == "prefork":
        celery_signals.worker_process_init.connect(pool_child, weak=False)
        celery_signals.worker_process_shutdown.connect(stop_heartbeat, weak=False)
    else:
        celery_signals.worker_ready.connect(warm, weak=False)
        celery_signals.worker_shutdown.connect(stop_heartbeat, weak=False)
    argv = [
        # --quiet: no banner on stdout (the log is one format); what it says is in our start-up lines.
        "--quiet", "worker", f"--loglevel={settings.log_level}", f"--pool={pool}",
        f"--concurrency={plan.concurrency}", "-Q", QUEUE, "--without-gossip", "--without-mingle",
        f"--hostname=cxr-triage@{os.uname().nodename}-{os.getpid()}",
    ]
    # Task events and worker heartbeats (what Flower shows) on a real broker; the embedded
    # SQLAlchemy transport has no fan-out exchange to carry them.
    argv += ["--without-heartbeat"] if settings.uses_embedded_broker else ["--task-events"]
    _celery_says_through_our_log()
    try:
        app.worker_main(argv)
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()


def _celery_says_through_our_log() -> None:
    """Celery's signal handlers print ("worker: Warm shutdown (MainProcess)") past logging: give them our
    format. Formatted without logging's locks and written with one os.write, as safe in a signal handler
    as Celery's own print."""
    import celery.apps.worker as celery_worker

    def say(message: str, *_args, **_kwargs) -> None:
        record = logging.LogRecord("celery.worker", logging.INFO, __file__, 0, message.strip(), None, None)
        handlers = logging.getLogger().handlers
        text = handlers[0].format(record) if handlers else record.getMessage()
        os.write(2, (text + "\n").encode("utf-8", "replace"))

    celery_worker.safe_say = say


def run_api(settings: Settings) -> None:
    import uvicorn

    from dashboard_api.app import create_app
    from dashboard_api.auth import AuthConfigError, startup_check

    settings.ensure_dirs()
    bind_check(settings.api_host, settings.api_port, "CXR_TRIAGE_API_PORT")
    database = Database(settings.database_url, audit_sink=audit_sink(settings))
    check_database(database, settings)
    try:
        authenticator = startup_check(settings, database)
    except AuthConfigError as exc:
        database.dispose()
        raise CliError(str(exc)) from None
    app = create_app(settings, database, authenticator)
    # Our logging, not uvicorn's own (one format; its access lines, which would carry query strings
    # such as a QIDO PatientID, stay at WARNING like the other libraries).
    config = uvicorn.Config(app, host=settings.api_host, port=settings.api_port, log_config=None)
    log.info("API on http://%s:%s (health /health/ready, metrics /metrics)", settings.api_host, settings.api_port)
    # uvicorn re-raises the SIGTERM/SIGINT it handled once it has shut down gracefully: let that
    # land on a handler that does nothing, so that a clean stop exits 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    try:
        uvicorn.Server(config).run()
    finally:
        database.dispose()


#: A child that dies is started again after this long, doubling per quick death, at most the maximum.
RESTART_BACKOFF_SECONDS = 1.0
RESTART_BACKOFF_MAX_SECONDS = 60.0
#: A child that ran this long before dying counts as a fresh failure (the backoff starts again).
STABLE_SECONDS = 60.0
#: A child that dies this many times in a row within a few seconds of its start cannot start (a port
#: in use, a bad setting): serve stops everything and says so.
START_FAILURES = 5
STOP_TIMEOUT_SECONDS = 20.0


@dataclass
class _Child:
    name: str
    process: subprocess.Popen | None = None
    started: float = 0.0
    failures: int = 0
    quick_failures: int = 0
    restart_at: float | None = None


def run_serve(settings: Settings) -> int:
    """Node + worker + API as three supervised processes.

    They are in serve's process group and die with it (PR_SET_PDEATHSIG), even after a kill -9 of
    serve. A child that dies is started again with backoff while the others keep running (reception
    never stops because inference died). SIGINT or SIGTERM (to serve alone or to the whole group)
    stops all of them within STOP_TIMEOUT_SECONDS.
    """
    upgrade_database(settings)
    parent = os.getpid()
    executable = [sys.executable, "-m", "cxr_triage.cli"]
    children = {name: _Child(name) for name in ("node", "worker", "api")}

    def start(child: _Child) -> None:
        child.process = subprocess.Popen(executable + [child.name],
                                         preexec_fn=lambda: die_with_parent(signal.SIGTERM, parent))
        child.started = time.monotonic()
        child.restart_at = None
        log.info("started %s (pid %s)", child.name, child.process.pid)

    for child in children.values():
        start(child)
    log.info("serving: DICOM %s on port %s, API http://%s:%s", settings.ae_title, settings.dicom_port,
             settings.api_host, settings.api_port)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    exit_code = 0
    while not stop.is_set():
        now = time.monotonic()
        for child in children.values():
            if child.process is not None and child.process.poll() is not None:
                ran = now - child.started
                child.failures = 1 if ran >= STABLE_SECONDS else child.failures + 1
                child.quick_failures = child.quick_failures + 1 if ran < 5 else 0
                delay = min(RESTART_BACKOFF_MAX_SECONDS, RESTART_BACKOFF_SECONDS * 2 ** (child.failures - 1))
                log.error("%s exited with %s after %.0f s; starting it again in %.0f s", child.name,
                          child.process.returncode, ran, delay)
                child.process = None
                child.restart_at = now + delay
                if child.quick_failures >= START_FAILURES:
                    log.error("%s cannot start (%d quick exits in a row); stopping", child.name, child.quick_failures)
                    exit_code = 1
                    stop.set()
            elif child.process is None and child.restart_at is not None and now >= child.restart_at:
                start(child)
        stop.wait(0.25)
    running = [c for c in children.values() if c.process is not None and c.process.poll() is None]
    for child in running:
        child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
    for child in running:
        try:
            child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0f s; killing it", child.name, STOP_TIMEOUT_SECONDS)
            child.process.kill()
            child.process.wait()
    log.info("stopped")
    return exit_code
