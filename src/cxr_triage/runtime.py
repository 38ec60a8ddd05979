"""Composition roots: each service wires the packages together here and nowhere else."""

from __future__ import annotations

import logging
import os
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

REPO_ROOT = Path(__file__).resolve().parents[2]


def configure_logging(settings: Settings, service: str) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s %(levelname)s [{service}:%(process)d] %(name)s: %(message)s",
        force=True,
    )
    # pynetdicom logs every PDU at INFO; keep it to warnings unless asked.
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, logging.getLogger().level))


def upgrade_database(settings: Settings) -> None:
    from alembic import command
    from alembic.config import Config

    ini = REPO_ROOT / "alembic.ini"
    if not ini.exists():
        raise SystemExit(f"alembic.ini not found at {ini}: run from a checkout of cxr-triage")
    settings.ensure_dirs()
    config = Config(str(ini))
    config.attributes["database_url"] = settings.database_url
    config.attributes["configure_logging"] = False
    command.upgrade(config, "head")
    log.info("database schema is at head (%s)", _safe_url(settings.database_url))


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
    return WorkerPlan(concurrency, threads, gpu)


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
    return model


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.is_set():
        stop.wait(1.0)


def run_node(settings: Settings) -> None:
    """The DICOM edge (listeners and admission here, associations in receiving processes) and the
    quiet-period scheduler that queues ready studies."""
    from functools import partial

    from dicom_node.processes import receiver_processes, start_node
    from dicom_node.readiness import ReadinessLoop
    from worker.celery_app import enqueuer, make_celery

    settings.ensure_dirs()
    database = Database(settings.database_url)
    celery_app = make_celery(settings)
    edge = start_node(settings, database, receiver_processes(settings),
                      initializer=partial(configure_logging, settings, "node"))
    loop = ReadinessLoop(database, settings.series_quiet_seconds, enqueuer(celery_app))
    loop.start()
    try:
        _wait_for_signal()
    finally:
        log.info("node stopping")
        edge.shutdown()
        loop.stop()
        database.dispose()


def run_worker(settings: Settings) -> None:
    from celery import signals as celery_signals

    from worker.celery_app import QUEUE, make_celery
    from worker.tasks import register_tasks

    settings.ensure_dirs()
    database = Database(settings.database_url)
    app = make_celery(settings)
    plan = worker_plan(settings)
    pipeline = register_tasks(app, settings, database, lambda: load_model_for(settings, threads=plan.threads))
    pool = "solo" if plan.concurrency == 1 else "prefork"
    log.info("model worker: %d process(es) x %s thread(s)%s", plan.concurrency, plan.threads or "default",
             " on a GPU" if plan.gpu else "")

    def warm(**_):
        # A forked child must not share the parent's database connections; then load the model now,
        # not on the first study (a failure here is logged and the job that needs it fails with the reason).
        database.engine.dispose(close=False)
        try:
            pipeline.model
        except Exception:
            log.exception("model failed to load; jobs will fail with the reason until it does")

    signal_name = "worker_process_init" if pool == "prefork" else "worker_ready"
    getattr(celery_signals, signal_name).connect(warm, weak=False)
    app.worker_main([
        "worker", f"--loglevel={settings.log_level}", f"--pool={pool}",
        f"--concurrency={plan.concurrency}", "-Q", QUEUE,
        "--without-gossip", "--without-mingle", "--without-heartbeat",
        f"--hostname=cxr-triage@{os.uname().nodename}-{os.getpid()}",
    ])


def run_api(settings: Settings) -> None:
    import uvicorn

    from dashboard_api.app import create_app

    settings.ensure_dirs()
    uvicorn.run(create_app(settings), host=settings.api_host, port=settings.api_port, log_level="info")


def run_serve(settings: Settings) -> int:
    """Node + worker + API as three processes; Ctrl-C or SIGTERM stops all of them."""
    upgrade_database(settings)
    executable = [sys.executable, "-m", "cxr_triage.cli"]
    children: dict[str, subprocess.Popen] = {}
    for service in ("node", "worker", "api"):
        children[service] = subprocess.Popen(executable + [service], start_new_session=True)
    log.info("serving: DICOM %s on port %s, API http://%s:%s, worker pid %s", settings.ae_title,
             settings.dicom_port, settings.api_host, settings.api_port, children["worker"].pid)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    exit_code = 0
    while not stop.is_set():
        for name, child in children.items():
            if child.poll() is not None:
                log.error("%s exited with %s; stopping the others", name, child.returncode)
                exit_code = child.returncode or 1
                stop.set()
        stop.wait(0.5)
    for child in children.values():
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 20
    for name, child in children.items():
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in time; killing it", name)
            child.kill()
            child.wait()
    log.info("stopped")
    return exit_code
