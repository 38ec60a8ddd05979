"""What the service benchmarks share: free ports, a real Orthanc, `cxr-triage serve`, waiting.

Imported by the bench scripts (run from the repository root); not a test helper and not part of
the package.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except Exception as exc:  # noqa: BLE001 - polling something that is starting
            last = exc
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}")


def http_json(url: str, timeout: float = 10.0, data: bytes | None = None):
    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


class Orthanc:
    """A real Orthanc (the hospital PACS) on loopback ports of its own, storing under `workdir`."""

    def __init__(self, workdir: Path, ae_title: str = "BENCH_PACS", nodelay: bool = True) -> None:
        if shutil.which("Orthanc") is None:
            raise SystemExit("Orthanc is not installed (apt-get install orthanc)")
        self.workdir, self.ae_title = workdir, ae_title
        self.dicom_port, self.http_port = free_port(), free_port()
        self.process: subprocess.Popen | None = None
        #: dcmtk (inside Orthanc) leaves Nagle's algorithm on unless TCP_NODELAY=1 is in its environment:
        #: then each C-STORE response waits for our delayed acknowledgement (~40 ms an object).
        self.nodelay = nodelay

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> "Orthanc":
        storage = self.workdir / "orthanc-storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "bench-pacs", "StorageDirectory": str(storage), "IndexDirectory": str(storage),
            "DicomAet": self.ae_title, "DicomPort": self.dicom_port, "HttpPort": self.http_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": True, "StableAge": 1, "Plugins": [],
        }
        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(config))
        self.log = open(self.workdir / "orthanc.log", "wb")
        env = {**os.environ, "TCP_NODELAY": "1" if self.nodelay else "0"}
        self.process = subprocess.Popen(["Orthanc", str(path)], stdout=self.log, stderr=subprocess.STDOUT, env=env)
        wait_until(lambda: http_json(f"{self.url}/system"), 30, what="Orthanc")
        return self

    def sop_instance_uids(self, study_instance_uid: str) -> list[str]:
        found = http_json(f"{self.url}/tools/lookup", data=study_instance_uid.encode())
        studies = [hit["ID"] for hit in found if hit["Type"] == "Study"]
        if not studies:
            return []
        return [i["MainDicomTags"]["SOPInstanceUID"] for i in http_json(f"{self.url}/studies/{studies[0]}/instances")]

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


class Service:
    """`cxr-triage serve` with its own data directory and ports."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.dicom_port, self.api_port = free_port(), free_port()
        self.ae_title = "CXR_BENCH"
        self.env = {
            **os.environ,
            "CXR_TRIAGE_DATA_DIR": str(workdir / "var"),
            "CXR_TRIAGE_DICOM_PORT": str(self.dicom_port),
            "CXR_TRIAGE_DICOM_HOST": "127.0.0.1",
            "CXR_TRIAGE_API_PORT": str(self.api_port),
            "CXR_TRIAGE_API_HOST": "127.0.0.1",
            "CXR_TRIAGE_AE_TITLE": self.ae_title,
            "CXR_TRIAGE_LOG_LEVEL": "INFO",
            **env,
        }
        self.process: subprocess.Popen | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / "serve.log"

    def start(self, processes: int) -> "Service":
        self.log = open(self.log_path, "wb")
        self.process = subprocess.Popen([sys.executable, "-m", "cxr_triage.cli", "serve"], env=self.env,
                                        cwd=self.workdir, stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        wait_until(lambda: self.log_path.read_bytes().count(b"model process ready") >= processes, 240,
                   what=f"{processes} model process(es) to load the model and warm up")
        wait_until(lambda: subprocess.run(["echoscu", "-aec", self.ae_title, "127.0.0.1", str(self.dicom_port)],
                                          capture_output=True).returncode == 0, 60, what="the DICOM node")
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"
