"""Scale-out, exercised: two DICOM nodes behind a TCP load balancer, one model worker and the API,
each its own process with its own data directory, sharing only PostgreSQL, Redis and an S3 bucket
(moto's S3-compatible server on loopback). Also where the /metrics and readiness samples of the
README come from (run with -s to see them).

The load balancer is a round-robin TCP forwarder in this test (HAProxy in `mode tcp` in a hospital):
each association goes to the next node, so the two images of one study land on different nodes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests import dicom_fixtures
from tests.conftest import free_port, http_json, need, storescu, wait_until
from tests.integration.test_end_to_end import assert_no_names_or_birth_dates_in

pytestmark = pytest.mark.e2e


class RoundRobinProxy:
    """A TCP forwarder on loopback: connection n goes to backend n mod len(backends)."""

    def __init__(self, backends: list[int]) -> None:
        self.backends = backends
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.count = 0
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.listener.settimeout(0.5)
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            backend = socket.create_connection(("127.0.0.1", self.backends[self.count % len(self.backends)]))
            self.count += 1
            for a, b in ((client, backend), (backend, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self.listener.close()


class Service:
    """One `cxr-triage SERVICE` process with its own data directory and log."""

    def __init__(self, name: str, command: str, env: dict[str, str], workdir: Path) -> None:
        self.name = name
        self.env = env
        self.log_path = workdir / f"{name}.log"
        self.log = open(self.log_path, "wb")
        self.process = subprocess.Popen([sys.executable, "-m", "cxr_triage.cli", command], env=env, cwd=workdir,
                                        stdout=self.log, stderr=subprocess.STDOUT)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return self.process.returncode

    def text(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode("latin-1")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _sample(text: str, name: str, **labels: str) -> float:
    """The value of metric `name` with these labels in a Prometheus text exposition (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def test_two_nodes_and_a_worker_share_postgresql_redis_and_an_s3_bucket(
        tmp_path, postgres_url, redis_url, s3_server, orthanc):
    need(shutil.which("storescu") is not None, "dcmtk is not installed (apt-get install dcmtk)")
    s3_server.client().create_bucket(Bucket="cxr-scale")
    base = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
        "CXR_TRIAGE_DATABASE_URL": postgres_url, "CXR_TRIAGE_BROKER_URL": redis_url,
        **s3_server.settings_env("cxr-scale", "site-a"),
        "CXR_TRIAGE_AE_TITLE": "CXR_SCALE", "CXR_TRIAGE_SERIES_QUIET_SECONDS": "1",
        "CXR_TRIAGE_EXPORT_DESTINATIONS": f"{orthanc.ae_title}@127.0.0.1:{orthanc.dicom_port}",
        "CXR_TRIAGE_HEARTBEAT_SECONDS": "1", "CXR_TRIAGE_SWEEP_INTERVAL_SECONDS": "1",
        "CXR_TRIAGE_WORKER_CONCURRENCY": "1", "CXR_TRIAGE_MODEL_THREADS": "1", "CXR_TRIAGE_MODEL_RUNTIME": "torch",
        "CXR_TRIAGE_DICOM_HOST": "127.0.0.1", "CXR_TRIAGE_LOG_FORMAT": "json", "CXR_TRIAGE_MIN_FREE_DISK_MB": "10",
    }

    def env(name: str, **extra: str) -> dict[str, str]:
        return {**base, "CXR_TRIAGE_DATA_DIR": str(tmp_path / name), **extra}

    def cli(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cxr_triage.cli", *argv], env=env("cli"), cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)

    assert cli("db", "upgrade").returncode == 0
    node_ports = [free_port(), free_port()]
    node_metrics = [free_port(), free_port()]
    worker_metrics, api_port = free_port(), free_port()
    services = [
        Service(f"node{i}", "node", env(f"node{i}", CXR_TRIAGE_DICOM_PORT=str(port),
                                        CXR_TRIAGE_NODE_METRICS_PORT=str(metrics)), tmp_path)
        for i, (port, metrics) in enumerate(zip(node_ports, node_metrics))
    ]
    services.append(Service("worker", "worker", env("worker", CXR_TRIAGE_WORKER_METRICS_PORT=str(worker_metrics)),
                            tmp_path))
    services.append(Service("api", "api", env("api", CXR_TRIAGE_API_PORT=str(api_port)), tmp_path))
    api = f"http://127.0.0.1:{api_port}"
    proxy = RoundRobinProxy(node_ports)
    worker = services[2]
    try:
        wait_until(lambda: cli("health").returncode == 0, 240, interval=2, what="the deployment to be ready")
        ready = http_json(f"{api}/health/ready")
        assert ready["status"] == "ready", ready
        assert {c["name"]: c["status"] for c in ready["checks"]} == {
            "database": "ok", "broker": "ok", "workers": "ok", "nodes": "ok", "disk": "ok", "exports": "ok"}
        assert "2 DICOM node(s) alive" in [c for c in ready["checks"] if c["name"] == "nodes"][0]["detail"]

        study = dicom_fixtures.pa_lateral_study()
        files = [dicom_fixtures.write(ds, tmp_path / f"{i}.dcm") for i, ds in enumerate(study)]
        for path in files:  # one association each: the balancer sends them to different nodes
            sent = storescu(proxy.port, "CXR_SCALE", path, calling_aet="MODALITY1")
            assert sent.returncode == 0, sent.stderr
        study_uid = str(study[0].StudyInstanceUID)

        def done():
            items = [i for i in http_json(f"{api}/worklist")["data"] if i["study_instance_uid"] == study_uid]
            return items[0] if items and items[0]["status"] in {"DONE", "SKIPPED", "FAILED"} else None

        item = wait_until(done, 180, what="the study to settle")
        assert item["status"] == "DONE", (item, worker.text()[-3000:])
        wait_until(lambda: http_json(f"{api}/studies/{study_uid}")["exports"][0]["status"] == "EXPORTED", 60,
                   what="the export to PACS")
        assert len(orthanc.get("/instances")) >= 2  # the SR and at least one heatmap reached the PACS

        # Every instance and result lives in the bucket; no host kept a copy in its data directory.
        keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket="cxr-scale")["Contents"]]
        assert sum(k.startswith("site-a/instances/") for k in keys) == 2
        assert sum(k.startswith("site-a/results/") for k in keys) >= 2
        for name in ("node0", "node1", "worker", "api"):
            assert not [p for p in (tmp_path / name).rglob("*.dcm")], name
        status, sr = _get(f"{api}/studies/{study_uid}/sr")  # the API (its own empty data dir) reads the SR from S3
        assert status == 200 and sr[128:132] == "DICM"

        node_text = [_get(f"http://127.0.0.1:{port}/metrics")[1] for port in node_metrics]
        assert [_sample(t, "cxr_triage_instances_received_total", outcome="stored") for t in node_text] == [1, 1]
        # The inline export counts its attempt just after it commits EXPORTED: poll for it.
        def worker_exported():
            text = _get(f"http://127.0.0.1:{worker_metrics}/metrics")[1]
            return text if _sample(text, "cxr_triage_export_attempts_total", outcome="success") >= 1 else None

        worker_text = wait_until(worker_exported, 30, what="the worker's export attempt metric")
        # (one job, or two when the second image came after the 1 s quiet period had made the study ready)
        jobs_done = _sample(worker_text, "cxr_triage_jobs_finished_total", outcome="DONE")
        assert jobs_done >= 1
        assert _sample(worker_text, "cxr_triage_cstore_to_sr_seconds_count") == jobs_done
        assert _sample(worker_text, "cxr_triage_model_seconds_count", runtime="torch") >= 1
        assert _sample(worker_text, "cxr_triage_model_loaded") == 1
        assert "cxr_triage_cstore_seconds" not in worker_text and "cxr_triage_model" not in node_text[0]
        api_text = _get(f"{api}/metrics")[1]
        assert _sample(api_text, "cxr_triage_studies", status="DONE") == 1
        assert _sample(api_text, "cxr_triage_exports", status="EXPORTED") == 1
        assert _sample(api_text, "cxr_triage_processes_alive", service="node", model_loaded="false") == 2
        print("\n--- API /metrics (cxr_triage_*) ---")
        print("\n".join(line for line in api_text.splitlines() if "cxr_triage_" in line))
        print("--- worker /metrics (cxr_triage_*, no buckets) ---")
        print("\n".join(line for line in worker_text.splitlines() if "cxr_triage_" in line and "_bucket" not in line))
        print("--- node /metrics (cxr_triage_*, no buckets) ---")
        print("\n".join(line for line in node_text[0].splitlines() if "cxr_triage_" in line and "_bucket" not in line))

        # The worker goes away: readiness says so, with the reason, and the CLI check fails.
        assert worker.stop() == 0, worker.text()[-3000:]
        status, body = _get(f"{api}/health/ready")
        answer = json.loads(body)
        assert status == 503 and answer["status"] == "not_ready", answer
        workers = [c for c in answer["checks"] if c["name"] == "workers"][0]
        assert workers["status"] == "fail" and "no model worker reported" in workers["detail"]
        check = cli("health")
        assert check.returncode == 1 and "not_ready" in check.stdout and "workers" in check.stdout
        print("--- GET /health/ready with the worker down ---")
        print(json.dumps(answer, indent=2))
        print("--- cxr-triage health with the worker down ---")
        print(check.stdout)
    finally:
        proxy.close()
        codes = {service.name: service.stop() for service in services}
    assert all(code == 0 for code in codes.values()), codes
    for service in services:
        for line in service.text().splitlines():
            if line.strip():
                json.loads(line)  # one format: every line a JSON object
    assert_no_names_or_birth_dates_in("\n".join(s.text() for s in services), files)
