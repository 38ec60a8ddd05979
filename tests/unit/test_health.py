"""Readiness tells the truth: each check fails or degrades on what it watches, and a real worker whose model
cannot load is reported with the reason (it is alive, so /health alone would have said "ok")."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest
from fastapi.testclient import TestClient

from cxr_triage.runtime import upgrade_database
from dashboard_api.app import create_app
from tests.conftest import free_port, wait_until
from triage_core import health, work
from triage_core.db import Database
from triage_core.models import Export, Study
from triage_core.settings import Settings

MODEL = {"name": "m", "version": "1", "runtime": "onnx", "device": "cpu"}


@pytest.fixture
def deployment(tmp_path):
    settings = Settings(data_dir=tmp_path / "var", heartbeat_seconds=5, min_free_disk_mb=0)
    upgrade_database(settings)
    database = Database(settings.database_url)
    yield settings, database
    database.dispose()


def _names(result) -> dict[str, str]:
    return {check.name: check.status for check in result.checks}


def test_ready_only_with_a_worker_whose_model_is_loaded_and_a_node(deployment):
    settings, database = deployment
    assert _names(health.readiness(settings, database)) == {
        "database": "ok", "broker": "ok", "workers": "fail", "nodes": "fail", "disk": "ok", "exports": "ok"}
    with database.session() as session:
        work.beat(session, holder="host-a:10:1", service="node")
        work.beat(session, holder="host-b:11:1", service="worker", model=None, model_error="ModelError: bad weights")
    result = health.readiness(settings, database)
    workers = [c for c in result.checks if c.name == "workers"][0]
    assert result.status == "not_ready" and "none with its model loaded: ModelError: bad weights" in workers.detail
    with database.session() as session:
        work.beat(session, holder="host-c:12:1", service="worker", model=MODEL)
    assert health.readiness(settings, database).status == "ready"
    later = datetime.now(timezone.utc) + timedelta(seconds=16)  # three heartbeats missed
    assert _names(health.readiness(settings, database, now=later))["workers"] == "fail"


def test_disk_watermark_and_export_backlog(deployment):
    settings, database = deployment
    assert health.check_disk(settings.data_dir, 10**9).status == "fail"
    now = datetime.now(timezone.utc)
    with database.session() as session:
        study = Study(study_instance_uid="1.2.3", status="DONE", received_at=now, last_instance_at=now)
        session.add(study)
        session.flush()
        session.add(Export(study_id=study.id, destination="PACS@h:104", status="EXPORT_PENDING",
                           pending_since=now - timedelta(hours=2)))
    check = health.check_exports(database, settings)
    assert check.status == "degraded" and "pending, the oldest for 120 min" in check.detail
    assert check.data["pending"] == 1


def test_broker_and_database_that_do_not_answer(deployment, tmp_path):
    settings, _ = deployment
    port = free_port()
    assert health.check_broker(f"redis://127.0.0.1:{port}/0", timeout=1).status == "fail"
    gone = Database(f"postgresql+psycopg2://u:p9@127.0.0.1:{port}/x")
    try:
        assert health.check_database(gone).status == "fail"
    finally:
        gone.dispose()


def test_health_routes_answer_without_credentials(deployment):
    settings, database = deployment
    with TestClient(create_app(settings, database)) as client:
        assert client.get("/health/live").json()["status"] == "alive"
        ready = client.get("/health/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "not_ready"
        assert client.get("/health").json()["status"] == "ok"  # the old route, as its callers know it
        metrics = client.get("/metrics")
        assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
        assert 'cxr_triage_studies{status="DONE"} 0.0' in metrics.text and "cxr_triage_disk_free_bytes" in metrics.text


def test_a_real_worker_whose_model_cannot_load_is_reported_not_ready(deployment, tmp_path):
    """A GPU asked of a machine without one: the worker runs, its heartbeat says why its model is not loaded."""
    settings, database = deployment
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
           "CXR_TRIAGE_DATA_DIR": str(settings.data_dir), "CXR_TRIAGE_HEARTBEAT_SECONDS": "1",
           "CXR_TRIAGE_MODEL_DEVICE": "cuda:0", "CXR_TRIAGE_MODEL_RUNTIME": "torch",
           "CXR_TRIAGE_WORKER_CONCURRENCY": "1", "CXR_TRIAGE_WORKER_METRICS_PORT": str(free_port())}
    log = open(tmp_path / "worker.log", "wb")
    worker = subprocess.Popen([sys.executable, "-m", "cxr_triage.cli", "worker"], env=env, cwd=tmp_path, stdout=log,
                              stderr=subprocess.STDOUT)
    try:
        def reported():
            with database.session() as session:
                return work.live_heartbeats(session, "worker", timedelta(seconds=30))

        (beat,) = wait_until(reported, 120, what="the worker's heartbeat")
        assert not beat.model_loaded and beat.model_error, beat.model_error
        check = health.check_workers(database, settings)
        assert check.status == "fail" and "none with its model loaded" in check.detail
        cli = subprocess.run([sys.executable, "-m", "cxr_triage.cli", "health", "--service", "worker"], env=env,
                             cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert cli.returncode == 1 and "model not loaded" in cli.stdout
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        log.close()
    assert worker.returncode == 0, (tmp_path / "worker.log").read_text()[-3000:]
    with database.session() as session:  # a clean stop removes its row
        assert work.live_heartbeats(session, "worker", timedelta(hours=1)) == []
