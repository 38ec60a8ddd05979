"""The whole path: storescu -> our node -> Celery worker -> SR + heatmaps -> Orthanc, and the worklist.

Real processes and real peers: `cxr-triage serve` (node, worker, API), dcmtk's storescu,
Orthanc as the hospital PACS, dciodvfy on what we wrote; once on the embedded defaults
(SQLite + kombu's SQLAlchemy transport) and once on PostgreSQL + Redis.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import DATA, free_port, http_json, need, storescu, wait_until

pytestmark = pytest.mark.e2e

CHEST = DATA / "cxr_dicom" / "cr_chest_pa_mono1_10bit_explicit_le.dcm"
NOT_CHEST = DATA / "not_cxr_dicom" / "bad_header_modality_ct.dcm"
SETTLED = {"DONE", "SKIPPED", "FAILED"}


class TriageService:
    """`cxr-triage serve` in a subprocess with its own data dir and ports."""

    def __init__(self, workdir: Path, extra_env: dict[str, str]) -> None:
        self.workdir = workdir
        self.dicom_port = free_port()
        self.api_port = free_port()
        self.env = {
            **os.environ,
            "CXR_TRIAGE_DATA_DIR": str(workdir / "var"),
            "CXR_TRIAGE_DICOM_PORT": str(self.dicom_port),
            "CXR_TRIAGE_DICOM_HOST": "127.0.0.1",
            "CXR_TRIAGE_API_PORT": str(self.api_port),
            "CXR_TRIAGE_API_HOST": "127.0.0.1",
            # Ports of their own for the node's and the worker's /metrics (concurrent runs share the machine).
            "CXR_TRIAGE_NODE_METRICS_PORT": str(free_port()),
            "CXR_TRIAGE_WORKER_METRICS_PORT": str(free_port()),
            "CXR_TRIAGE_AE_TITLE": "CXR_TEST",
            "CXR_TRIAGE_SERIES_QUIET_SECONDS": "1",
            "CXR_TRIAGE_EXPORT_BACKOFF_SECONDS": "0.5",
            **extra_env,
        }
        self.process: subprocess.Popen | None = None
        self.api_key = ""
        #: Every dataset sent, so that the logs can be scanned for their patients' names and birth dates.
        self.sent: list[Path] = []

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def start(self) -> "TriageService":
        """Start `serve` (again, after a stop or a kill: same data, same ports; the log is appended to)."""
        self.log_path = self.workdir / "serve.log"
        self.log = open(self.log_path, "ab")
        offset = self.log.tell()
        # In a session of its own, as under systemd: the tests can signal serve's whole process group.
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cxr_triage.cli", "serve"], env=self.env, cwd=self.workdir,
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        wait_until(lambda: self.process.poll() is None and http_json(f"{self.api}/health")["status"] == "ok",
                   90, what="the API to answer /health")
        wait_until(lambda: self.echo(), 30, what="the DICOM node to answer C-ECHO")
        # Every model process loads the model at start (the first exports the ONNX graph); the latency
        # measured below is then the running service's, not its start-up.
        processes = int(self.env.get("CXR_TRIAGE_WORKER_CONCURRENCY", "1"))
        wait_until(lambda: self._log_bytes()[offset:].count(b" loaded from ") >= processes, 180,
                   what=f"{processes} model process(es) to load the model")
        # The API answers only authenticated callers once a user exists: the reader of these tests
        # (made at the first start; a restart keeps the database and so the key).
        if not self.api_key:
            self.api_key = self.cli("user", "add", "e2e-reader", "--role", "radiologist").stdout.strip()
        return self

    def cli(self, *argv: str) -> subprocess.CompletedProcess:
        result = subprocess.run([sys.executable, "-m", "cxr_triage.cli", *argv], env=self.env, cwd=self.workdir,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        return result

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def echo(self) -> bool:
        result = subprocess.run(["echoscu", "-aec", "CXR_TEST", "127.0.0.1", str(self.dicom_port)],
                                capture_output=True, timeout=20)
        return result.returncode == 0

    def send(self, *files: Path) -> subprocess.CompletedProcess:
        self.sent += files
        return storescu(self.dicom_port, "CXR_TEST", *files, calling_aet="MODALITY1")

    def worklist(self) -> dict:
        return http_json(f"{self.api}/worklist", headers=self.headers)

    def study(self, study_instance_uid: str) -> dict:
        return http_json(f"{self.api}/studies/{study_instance_uid}", headers=self.headers)

    def get_bytes(self, path: str) -> bytes:
        return _get_bytes(f"{self.api}{path}", self.headers)

    def wait_settled(self, study_instance_uid: str, timeout: float = 240) -> dict:
        def settled():
            items = [i for i in self.worklist()["data"] if i["study_instance_uid"] == study_instance_uid]
            return items[0] if items and items[0]["status"] in SETTLED else None

        return wait_until(settled, timeout, what=f"study {study_instance_uid} to settle")

    def _log_bytes(self) -> bytes:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_bytes()

    def log_text(self) -> str:
        return self._log_bytes().decode(errors="replace")

    def stop(self) -> int:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return self.process.returncode


@pytest.fixture(params=["embedded", "postgresql+redis"])
def service(request, tmp_path, orthanc):
    need(shutil.which("storescu") is not None, "dcmtk is not installed (apt-get install dcmtk)")
    env = {"CXR_TRIAGE_EXPORT_DESTINATIONS": f"{orthanc.ae_title}@127.0.0.1:{orthanc.dicom_port}",
           # Both pools: two forked model processes (the CPU default) and Celery's solo pool (a GPU worker's).
           "CXR_TRIAGE_WORKER_CONCURRENCY": "2"}
    if request.param == "postgresql+redis":
        env["CXR_TRIAGE_DATABASE_URL"] = request.getfixturevalue("postgres_url")
        env["CXR_TRIAGE_BROKER_URL"] = request.getfixturevalue("redis_url")
        env["CXR_TRIAGE_WORKER_CONCURRENCY"] = "1"
    svc = TriageService(tmp_path, env).start()
    yield svc
    returncode = svc.stop()
    assert returncode == 0, f"serve did not stop cleanly ({returncode}):\n{svc.log_text()[-4000:]}"
    assert_no_names_or_birth_dates_in(svc.log_text(), svc.sent)
    audit = subprocess.run([sys.executable, "-m", "cxr_triage.cli", "audit", "verify"], env=svc.env,
                           cwd=svc.workdir, capture_output=True, text=True, timeout=120)
    assert audit.returncode == 0 and "audit trail intact" in audit.stdout, audit.stdout + audit.stderr


def assert_no_names_or_birth_dates_in(log: str, sent: list[Path]) -> None:
    """What CI checks of every end-to-end run: the service's logs carry no patient name or birth date."""
    import pydicom

    from cxr_triage.demo import SAMPLES

    import re

    secrets = set()
    for path in [*sent, *SAMPLES.glob("*.dcm")]:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        name = ds.get("PatientName")
        if name:
            # every component of every representation (alphabetic, ideographic, phonetic): "Yamada", "山田", "やまだ"
            for part in re.split(r"[\^= ]+", str(name)):
                if len(part) >= 3 or (len(part) >= 2 and not part.isascii()):
                    secrets.add(part)
        if ds.get("PatientBirthDate"):
            birth = str(ds.PatientBirthDate)
            secrets |= {birth, f"{birth[:4]}-{birth[4:6]}-{birth[6:]}"}
    assert secrets, "the sent files name no patient: the scan would prove nothing"
    assert log.strip(), "the service wrote no log"
    leaked = sorted(s for s in secrets if s in log)
    assert not leaked, f"patient names or birth dates in the service's log: {leaked}"


def _uid(path: Path, keyword: str) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True, force=True).get(keyword))


def test_chest_radiograph_comes_back_to_pacs_as_sr_and_heatmaps(service, orthanc, tmp_path):
    study_uid = _uid(CHEST, "StudyInstanceUID")
    started = time.monotonic()
    sent = service.send(CHEST)
    assert sent.returncode == 0, sent.stderr

    item = service.wait_settled(study_uid)
    assert item["status"] == "DONE", (item, service.log_text()[-4000:])
    assert item["model"]["name"] and item["model"]["version"]
    assert item["model"]["demo"] is True

    detail = service.study(study_uid)
    probabilities = {f["finding"]: f["probability"] for f in detail["images"][0]["findings"]}
    assert len(probabilities) == 14
    assert all(0.0 <= p <= 1.0 for p in probabilities.values())

    # Orthanc (the PACS) holds the source study's SR and heatmap series once export is done.
    def exported():
        exports = service.study(study_uid)["exports"]
        return exports and all(e["status"] == "EXPORTED" for e in exports) and exports

    wait_until(exported, 120, what="export to Orthanc")
    latency = time.monotonic() - started
    print(f"\nend-to-end (C-STORE sent -> results in Orthanc): {latency:.1f}s incl. the 1 s quiet period")
    found = orthanc_post_find(orthanc, study_uid)
    assert len(found) == 1, "Orthanc should hold exactly the one study"
    series = [orthanc.get(f"/series/{s}") for s in orthanc.get(f"/studies/{found[0]}")["Series"]]
    modalities = sorted(s["MainDicomTags"].get("Modality", "") for s in series)
    assert "SR" in modalities, modalities
    heatmap_series = [s for s in series if s["MainDicomTags"].get("Modality") not in ("SR", "CR", "DX")]
    assert heatmap_series, f"no heatmap series in Orthanc: {modalities}"

    # What we wrote validates: dciodvfy reports no errors on the SR.
    sr_path = tmp_path / "sr.dcm"
    sr_path.write_bytes(service.get_bytes(f"/studies/{study_uid}/sr"))
    need(shutil.which("dciodvfy") is not None, "dicom3tools is not installed")
    check = subprocess.run(["dciodvfy", str(sr_path)], capture_output=True, text=True, timeout=60)
    errors = [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")]
    assert not errors, "\n".join(errors)
    # The default CPU runtime is int8 (its decisions checked against fp32's at load), and the SR says so.
    assert "int8 runtime for" in service.log_text()
    dump = subprocess.run(["dsrdump", str(sr_path)], capture_output=True, text=True, timeout=60).stdout
    assert '"precision=int8"' in dump, dump[-3000:]


def test_conformant_dx_pa_and_lateral_study_in_japanese_reaches_pacs(service, orthanc, tmp_path):
    """A DX For Presentation PA + lateral study with every Type 1 attribute (Patient Orientation,
    Imager Pixel Spacing) and an ISO 2022 IR 87 patient name: the PA is scored, the lateral listed
    as not analysed, and the SR and heatmaps reach the PACS in the patient's character set."""
    import copy

    import pydicom

    from tests import dicom_fixtures as fx

    pa, lateral = (fx.with_character_set(copy.deepcopy(ds), "IR 87") for ds in fx.pa_lateral_study())
    files = [fx.write(ds, tmp_path / f"{n}.dcm") for n, ds in enumerate((pa, lateral))]
    sent = service.send(*files)
    assert sent.returncode == 0, sent.stderr
    item = service.wait_settled(pa.StudyInstanceUID)
    assert item["status"] == "DONE", (item, service.log_text()[-4000:])
    assert "ViewPosition=LL" in item["status_reason"]
    wait_until(lambda: all(e["status"] == "EXPORTED" for e in service.study(pa.StudyInstanceUID)["exports"]),
               120, what="export to Orthanc")
    sr = pydicom.dcmread(io.BytesIO(service.get_bytes(f"/studies/{pa.StudyInstanceUID}/sr")))
    assert sr.PatientName == pa.PatientName and list(sr.SpecificCharacterSet) == ["", "ISO 2022 IR 87"]
    (found,) = orthanc_post_find(orthanc, pa.StudyInstanceUID)
    modalities = sorted(orthanc.get(f"/series/{s}")["MainDicomTags"].get("Modality", "")
                        for s in orthanc.get(f"/studies/{found}")["Series"])
    assert "SR" in modalities and "OT" in modalities, modalities


def test_non_chest_input_is_skipped_with_reason_and_no_sr(service):
    study_uid = _uid(NOT_CHEST, "StudyInstanceUID")
    assert service.send(NOT_CHEST).returncode == 0
    item = service.wait_settled(study_uid)
    assert item["status"] == "SKIPPED"
    assert "CT" in item["status_reason"], item["status_reason"]
    detail = service.study(study_uid)
    assert detail["results"] == []
    with pytest.raises(Exception) as missing:
        service.get_bytes(f"/studies/{study_uid}/sr")
    assert "404" in str(missing.value)


def test_same_instance_twice_is_one_study_one_job_one_sr(service, orthanc):
    study_uid = _uid(CHEST, "StudyInstanceUID")
    assert service.send(CHEST).returncode == 0
    assert service.send(CHEST).returncode == 0
    service.wait_settled(study_uid)
    assert service.send(CHEST).returncode == 0  # again after DONE: still a duplicate
    time.sleep(3)
    items = [i for i in service.worklist()["data"] if i["study_instance_uid"] == study_uid]
    assert len(items) == 1
    detail = service.study(study_uid)
    assert len(detail["jobs"]) == 1, detail["jobs"]
    assert len([r for r in detail["results"] if r["kind"] == "SR"]) == 1
    # ...and the PACS got one SR, not one per C-STORE.
    wait_until(lambda: all(e["status"] == "EXPORTED" for e in service.study(study_uid)["exports"]), 120,
               what="export to Orthanc")
    found = orthanc_post_find(orthanc, study_uid)
    series = [orthanc.get(f"/series/{s}") for s in orthanc.get(f"/studies/{found[0]}")["Series"]]
    sr_series = [s for s in series if s["MainDicomTags"].get("Modality") == "SR"]
    assert len(sr_series) == 1 and len(sr_series[0]["Instances"]) == 1, sr_series


def orthanc_post_find(orthanc, study_uid: str) -> list[str]:
    import json
    import urllib.request

    request = urllib.request.Request(
        f"{orthanc.url}/tools/lookup", data=study_uid.encode(), method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        return [hit["ID"] for hit in json.load(response) if hit["Type"] == "Study"]


def _get_bytes(url: str, headers: dict[str, str]) -> bytes:
    import urllib.request

    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=20) as response:
        return response.read()


def test_demo_sends_the_bundled_samples_and_prints_the_worklist(service):
    without_key = subprocess.run([sys.executable, "-m", "cxr_triage.cli", "demo", "--timeout", "5"], env=service.env,
                                 cwd=service.workdir, capture_output=True, text=True, timeout=180)
    assert without_key.returncode != 0 and "401" in without_key.stdout + without_key.stderr
    result = subprocess.run([sys.executable, "-m", "cxr_triage.cli", "demo", "--timeout", "120"],
                            env={**service.env, "CXR_TRIAGE_API_KEY": service.api_key},
                            cwd=service.workdir, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr + service.log_text()[-3000:]
    assert result.stdout.count("C-STORE ") == 3 and result.stdout.count(": 0x0000") == 3, result.stdout
    lines = [line for line in result.stdout.splitlines() if line.startswith("  ")]
    assert sorted(line.split()[1] for line in lines) == ["DONE", "DONE", "SKIPPED"], result.stdout
    assert all("DEMO WEIGHTS" in line for line in lines if " DONE " in line), result.stdout
