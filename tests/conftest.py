"""Shared fixtures: real services on 127.0.0.1 and ephemeral ports, stopped by the test that started them."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
REQUIRE_SERVICES = os.environ.get("CXR_TRIAGE_REQUIRE_SERVICES") == "1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def need(condition: bool, why: str) -> None:
    """Skip when a real part is missing, unless CI/make test demands every service."""
    if not condition:
        if REQUIRE_SERVICES:
            pytest.fail(f"required service or tool missing: {why}")
        pytest.skip(why)


def http_json(url: str, timeout: float = 10.0, headers: dict | None = None):
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


def wait_until(predicate, timeout: float, interval: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except Exception as exc:  # noqa: BLE001 - polling a server that is starting
            last = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


#: storescu proposes uncompressed syntaxes unless told; one flag per compressed family.
_STORESCU_PROPOSE = {
    "1.2.840.10008.1.2.4.50": "-xy",  # JPEG baseline
    "1.2.840.10008.1.2.4.51": "-xx",  # JPEG extended 12 bit
    "1.2.840.10008.1.2.4.70": "-xs",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.90": "-xv",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": "-xw",  # JPEG 2000
    "1.2.840.10008.1.2.5": "-xr",  # RLE
}


def storescu(port: int, called_aet: str, *files: Path, calling_aet: str = "STORESCU") -> subprocess.CompletedProcess:
    """Send files with dcmtk's storescu, one association per transfer syntax family so each goes as stored."""
    import pydicom

    groups: dict[str, list[str]] = {}
    for path in files:
        syntax = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        groups.setdefault(_STORESCU_PROPOSE.get(syntax, "-x="), []).append(str(path))
    result = None
    for flag, paths in groups.items():
        result = subprocess.run(
            ["storescu", "-R", flag, "-aet", calling_aet, "-aec", called_aet, "127.0.0.1", str(port), *paths],
            capture_output=True, text=True, timeout=60,
        )
        if result.returncode != 0:
            return result
    return result


class Orthanc:
    """A real Orthanc as the hospital PACS, on its own ports, with the DICOMweb plugin when installed."""

    def __init__(self, workdir: Path, **config: object) -> None:
        self.workdir = workdir
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.ae_title = "ORTHANC_TEST"
        self.process: subprocess.Popen | None = None
        self.extra_config = config

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> "Orthanc":
        storage = self.workdir / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        plugins = [p for p in ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so"] if Path(p).exists()]
        config = {
            "Name": "cxr-triage-test-pacs",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": True,
            "Plugins": plugins,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "StableAge": 1,
            "HttpServerEnabled": True,
            "HttpsVerifyPeers": False,
            **self.extra_config,
        }
        config_path = self.workdir / "orthanc.json"
        config_path.write_text(json.dumps(config))
        self.log = open(self.workdir / "orthanc.log", "wb")
        self.process = subprocess.Popen(["Orthanc", str(config_path)], stdout=self.log, stderr=subprocess.STDOUT)
        wait_until(lambda: http_json(f"{self.url}/system"), 30, what="Orthanc to answer")
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()

    def get(self, path: str):
        return http_json(f"{self.url}{path}")

    def delete(self, path: str) -> None:
        request = urllib.request.Request(f"{self.url}{path}", method="DELETE")
        with urllib.request.urlopen(request, timeout=10):
            pass


@pytest.fixture
def orthanc(tmp_path_factory):
    need(shutil.which("Orthanc") is not None, "Orthanc is not installed (apt-get install orthanc)")
    server = Orthanc(tmp_path_factory.mktemp("orthanc")).start()
    yield server
    server.stop()


def _pg_reachable() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture
def postgres_url():
    """A throwaway PostgreSQL database, dropped afterwards."""
    need(_pg_reachable(), "PostgreSQL is not answering on 127.0.0.1:5432")
    import psycopg2

    name = f"cxr_test_{uuid.uuid4().hex[:12]}"
    admin = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres")
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"
    with admin.cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )
        cursor.execute(f'DROP DATABASE IF EXISTS "{name}"')
    admin.close()


@pytest.fixture
def redis_url():
    """A Redis database index of its own, flushed afterwards.

    Other test runs on the same machine share the Redis server (and our queue name): an index is
    claimed with a key set only if absent, and only an otherwise empty one is taken, so that two
    runs never feed each other's workers.
    """
    try:
        import redis

        client = redis.Redis(host="127.0.0.1", port=6379, socket_timeout=2)
        client.ping()
    except Exception as exc:  # noqa: BLE001
        need(False, f"Redis is not answering on 127.0.0.1:6379 ({exc})")
    import random

    token = uuid.uuid4().hex
    indexes = list(range(8, 16))
    random.shuffle(indexes)
    db = None
    for _ in range(60):
        for index in indexes:
            candidate = redis.Redis(host="127.0.0.1", port=6379, db=index)
            if candidate.dbsize() == 0 and candidate.set("cxr-triage-test-claim", token, nx=True, ex=3600):
                db = candidate
                break
        if db is not None:
            break
        time.sleep(2)
    assert db is not None, "no free Redis database index among 8-15 (other test runs hold them all)"
    yield f"redis://127.0.0.1:6379/{index}"
    db.flushdb()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One PyTorch intra-op thread for a module: the small test models gain nothing from two and lose badly
    when the cores are shared (the model processes of the service run one thread each for the same reason)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_cli(*argv: str) -> str:
    """Run ``cxr-triage ARGV...`` in this process; assert exit status 0 and return what it printed."""
    import contextlib
    import io

    from cxr_triage import cli

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(list(argv))
    assert rc == 0, buf.getvalue()
    return buf.getvalue()


class S3Server:
    """moto's S3-compatible server as a real HTTP server on loopback (its own process and port)."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.log = open(workdir / "moto.log", "wb")
        import sys

        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=self.log, stderr=subprocess.STDOUT)
        wait_until(lambda: urllib.request.urlopen(f"{self.url}/", timeout=2).status == 200, 60,
                   what="the S3 server to answer")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    #: The S3 settings of a service using this server (any credentials: moto checks none).
    def settings_env(self, bucket: str, prefix: str = "cxr") -> dict[str, str]:
        return {"CXR_TRIAGE_STORAGE_URL": f"s3://{bucket}/{prefix}", "CXR_TRIAGE_S3_ENDPOINT_URL": self.url,
                "CXR_TRIAGE_S3_REGION": "us-east-1", "CXR_TRIAGE_S3_ACCESS_KEY_ID": "test-key",
                "CXR_TRIAGE_S3_SECRET_ACCESS_KEY": "test-secret-7f3c"}

    def client(self):
        import boto3

        return boto3.session.Session().client("s3", endpoint_url=self.url, region_name="us-east-1",
                                              aws_access_key_id="test-key", aws_secret_access_key="test-secret-7f3c")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


@pytest.fixture
def s3_server(tmp_path_factory):
    try:
        import boto3  # noqa: F401
        import moto.server  # noqa: F401
    except ImportError as exc:
        need(False, f"moto[server] and boto3 are not installed ({exc})")
    server = S3Server(tmp_path_factory.mktemp("s3"))
    yield server
    server.stop()
