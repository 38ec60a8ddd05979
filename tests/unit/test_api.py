"""dashboard_api against a real database: SQLite in tmp_path and, when reachable, a throwaway PostgreSQL database.

PostgreSQL is expected on 127.0.0.1:5432 (user postgres, trust auth). Without it
these cases skip, unless CXR_TRIAGE_REQUIRE_SERVICES=1, where they fail.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID
from sqlalchemy import func, select

from cxr_model.labels import DEFAULT_URGENCY
from dashboard_api.app import create_app
from tests.conftest import need
from triage_core import priority
from triage_core.db import Database
from triage_core.models import AuditEvent, Base, Export, Finding, Instance, Job, ResultObject, Study
from triage_core.settings import Settings
from triage_core.states import AuditAction, ExportStatus, JobStatus, ResultKind, Role, StudyStatus
from triage_core.users import create_user
from triage_core.storage import result_relpath
from triage_core.values import FindingResult

FINDINGS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)  # fmt: skip

ROOT = "1.2.826.0.1.3680043.8.498.7701"
HIGH = f"{ROOT}.1"  # DONE, Pneumothorax flagged (critical), demo weights
TIE = f"{ROOT}.2"  # DONE, critical too, received after HIGH
LOW = f"{ROOT}.3"  # DONE, Nodule flagged (routine), received first of all
SKIPPED = f"{ROOT}.4"  # not analysed
FAILED = f"{ROOT}.5"  # not analysed
UNKNOWN = f"{ROOT}.999"
#: Both critical studies first (longest waiting first); the others have waited since 2024, long enough
#: for age to raise them all to urgent, the ceiling of escalation, where they follow by time waited.
WORKLIST_ORDER = [HIGH, TIE, LOW, SKIPPED, FAILED]

FRONTAL = f"{HIGH}.1.1"
LATERAL = f"{HIGH}.1.2"
SR_UID = f"{HIGH}.2.1"
HEATMAP_UIDS = [f"{HIGH}.3.1", f"{HIGH}.3.2"]

SKIP_REASON = "no frontal chest radiograph: ViewPosition LL (lateral)"
FAIL_REASON = "model inference failed: RuntimeError: out of memory"
T0 = datetime(2024, 5, 1, 8, 0, tzinfo=timezone.utc)
PG_DSN = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}

HIGH_PROBABILITIES = {"Pneumothorax": 0.91, "Effusion": 0.72, "Cardiomegaly": 0.61, "Atelectasis": 0.55}


# --- backends ------------------------------------------------------------------------------------


def _postgres_unavailable(reason: str) -> None:
    need(False, f"PostgreSQL not reachable on 127.0.0.1:5432 as user postgres ({reason})")


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'api.sqlite'}"
        return
    try:
        import psycopg2

        admin = psycopg2.connect(dbname="postgres", connect_timeout=3, **PG_DSN)
    except Exception as exc:  # ImportError or OperationalError: either way, no PostgreSQL here
        _postgres_unavailable(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
    admin.autocommit = True
    name = f"cxr_test_api_{uuid.uuid4().hex[:12]}"
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg2://{PG_DSN['user']}@{PG_DSN['host']}:{PG_DSN['port']}/{name}"
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


# --- seed ----------------------------------------------------------------------------------------


def write_dicom(path: Path, *, sop_class_uid: str, sop_instance_uid: str, study_instance_uid: str, modality: str) -> None:
    """A tiny but valid Part 10 file (preamble, DICM, meta header)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid
    ds.StudyInstanceUID = study_instance_uid
    ds.SeriesInstanceUID = f"{sop_instance_uid}.0"
    ds.Modality = modality
    ds.PatientID = "P-0001"
    if modality == "OT":
        # Bytes that look like multipart framing, to prove the boundary handling.
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 2, 4, 3, "RGB"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation, ds.PlanarConfiguration = 8, 8, 7, 0, 0
        ds.PixelData = (b"\r\n--\r\n\x00\xff" * 3)[:24]
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _study(uid: str, status: StudyStatus, *, minutes: int, reason: str = "", **extra) -> Study:
    at = T0 + timedelta(minutes=minutes)
    study = Study(
        study_instance_uid=uid,
        accession_number=f"ACC{uid[-1]}",
        patient_id=f"PID{uid[-1]}",
        patient_name=f"Doe^Patient{uid[-1]}",
        study_date="20240501",
        status=str(status),
        status_reason=reason,
        received_at=at,
        waiting_since=at,
        last_instance_at=at,
        updated_at=at + timedelta(minutes=1),
        priority_level=int(priority.Level.AWAITING_ANALYSIS),
        **extra,
    )
    if status in (StudyStatus.SKIPPED, StudyStatus.FAILED):
        priority.record_status(study, str(status), reason, at + timedelta(minutes=1))
    return study


def _analysed(study: Study) -> Study:
    """The study's priority as the worker sets it, from its findings and the ChestX-ray14 urgency classes."""
    results = [FindingResult(f.finding, f.probability, f.threshold, f.present) for f in study.findings]
    priority.record_analysis(study, results, DEFAULT_URGENCY, priority.WorklistPolicy.from_minutes(),
                             study.received_at + timedelta(seconds=30))
    return study


def _findings(sop_instance_uid: str, probabilities: dict[str, float]) -> list[Finding]:
    rows = []
    for name in FINDINGS:
        p = probabilities.get(name, 0.1)
        rows.append(Finding(sop_instance_uid=sop_instance_uid, finding=name, probability=p, threshold=0.5,
                            present=p >= 0.5, urgency=DEFAULT_URGENCY[name]))
    return rows


def seed(database: Database, results_dir: Path) -> None:
    demo = {"model_name": "cxr-densenet121", "model_version": "0.1.0-demo", "model_demo": True}
    real = {"model_name": "cxr-densenet121", "model_version": "1.0.0", "model_demo": False}
    with database.session() as session:
        high = _study(HIGH, StudyStatus.DONE, minutes=10, **demo)
        high.study_description = "XR CHEST PA AND LATERAL"
        high.instances = [
            Instance(
                series_instance_uid=f"{HIGH}.1", sop_instance_uid=FRONTAL, sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
                transfer_syntax_uid="1.2.840.10008.1.2.1", modality="DX", path="x/1.dcm", size_bytes=1, sha256="0" * 64,
                eligible=True, eligibility_reason="",
            ),
            Instance(
                series_instance_uid=f"{HIGH}.1", sop_instance_uid=LATERAL, sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
                transfer_syntax_uid="1.2.840.10008.1.2.1", modality="DX", path="x/2.dcm", size_bytes=1, sha256="0" * 64,
                eligible=False, eligibility_reason="lateral view (ViewPosition LL)",
            ),
        ]  # fmt: skip
        high.findings = _findings(FRONTAL, HIGH_PROBABILITIES)
        _analysed(high)
        sr_path = result_relpath(HIGH, SR_UID)
        write_dicom(
            results_dir / sr_path, sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34", sop_instance_uid=SR_UID,
            study_instance_uid=HIGH, modality="SR",
        )  # fmt: skip
        high.results = [
            ResultObject(
                kind=str(ResultKind.SR), sop_instance_uid=SR_UID, series_instance_uid=f"{HIGH}.2",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34", source_sop_instance_uid=FRONTAL, path=sr_path,
                model_name="cxr-densenet121", model_version="0.1.0-demo",
            )
        ]  # fmt: skip
        for sop_instance_uid, finding in zip(HEATMAP_UIDS, ["Pneumothorax", "Effusion"]):
            path = result_relpath(HIGH, sop_instance_uid)
            write_dicom(
                results_dir / path, sop_class_uid="1.2.840.10008.5.1.4.1.1.7", sop_instance_uid=sop_instance_uid,
                study_instance_uid=HIGH, modality="OT",
            )  # fmt: skip
            high.results.append(
                ResultObject(
                    kind=str(ResultKind.HEATMAP), sop_instance_uid=sop_instance_uid, series_instance_uid=f"{HIGH}.3",
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.7", source_sop_instance_uid=FRONTAL, finding=finding,
                    path=path, model_name="cxr-densenet121", model_version="0.1.0-demo",
                )
            )  # fmt: skip
        high.exports = [
            Export(destination="PACS@10.0.0.5:104", status=str(ExportStatus.EXPORTED), attempts=1),
            Export(
                destination="ARCHIVE@10.0.0.6:11112", status=str(ExportStatus.EXPORT_FAILED), attempts=5,
                last_error="C-STORE failed: association rejected (0x0002)",
            ),
        ]  # fmt: skip
        high.jobs = [
            Job(status=str(JobStatus.DONE), created_at=T0, enqueued_at=T0, started_at=T0, finished_at=T0, attempts=1)
        ]

        tie = _study(TIE, StudyStatus.DONE, minutes=20, **real)
        tie.findings = _findings(f"{TIE}.1.1", {"Pneumothorax": 0.8})
        _analysed(tie)
        low = _study(LOW, StudyStatus.DONE, minutes=0, **real)
        low.findings = _findings(f"{LOW}.1.1", {"Nodule": 0.66})
        _analysed(low)
        low.exports = [Export(destination="PACS@10.0.0.5:104", status=str(ExportStatus.EXPORT_PENDING))]
        skipped = _study(SKIPPED, StudyStatus.SKIPPED, minutes=5, reason=SKIP_REASON)
        failed = _study(FAILED, StudyStatus.FAILED, minutes=6, reason=FAIL_REASON)
        session.add_all([high, tie, low, skipped, failed])


#: API users of the fixture: name -> role. Requests without other headers are dr.house's.
USERS = {"dr.house": Role.RADIOLOGIST, "alice": Role.RADIOLOGIST, "bob": Role.RADIOLOGIST,
         "auditor": Role.AUDITOR, "root": Role.ADMIN}


@dataclass
class Env:
    client: TestClient
    database: Database
    settings: Settings
    keys: dict[str, str]
    #: The last event of the fixture's own set-up (the USER_CREATED events): tests see what follows.
    baseline: int

    def events(self, action: AuditAction | None = None) -> list[AuditEvent]:
        with self.database.session() as session:
            query = select(AuditEvent).where(AuditEvent.seq > self.baseline).order_by(AuditEvent.seq)
            if action is not None:
                query = query.where(AuditEvent.action == str(action))
            return list(session.execute(query).scalars())

    def auth(self, user: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[user]}"}


def make_users(database: Database, names: dict[str, Role]) -> dict[str, str]:
    with database.session() as session:
        return {name: create_user(session, name=name, role=role, actor="cli:test").key for name, role in names.items()}


@pytest.fixture
def env(database_url, tmp_path):
    settings = Settings(data_dir=tmp_path / "var", database_url=database_url)
    settings.ensure_dirs()
    database = Database(database_url)
    Base.metadata.create_all(database.engine)
    seed(database, settings.results_dir)
    keys = make_users(database, USERS)
    with database.session() as session:
        baseline = session.scalar(select(func.max(AuditEvent.seq)))
    try:
        with TestClient(create_app(settings, database), headers={"Authorization": f"Bearer {keys['dr.house']}"}
                        ) as client:
            yield Env(client, database, settings, keys, baseline)
    finally:
        database.dispose()


def parse_multipart(content_type: str, body: bytes) -> list[tuple[dict[str, str], bytes]]:
    """A strict reader of multipart/related (RFC 2046), independent of the implementation."""
    params = dict(
        part.strip().split("=", 1) for part in content_type.split(";")[1:] if "=" in part
    )
    boundary = params["boundary"].strip('"').encode()
    assert body.endswith(b"--" + boundary + b"--\r\n")
    parts = []
    for chunk in body.split(b"--" + boundary)[1:-1]:
        assert chunk.startswith(b"\r\n") and chunk.endswith(b"\r\n")
        head, _, payload = chunk[2:-2].partition(b"\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n"))
        parts.append(({k.lower(): v for k, v in headers.items()}, payload))
    return parts


# --- health, docs, errors --------------------------------------------------------------------------


def test_health_reports_database_and_model(env):
    response = env.client.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok" and body["database"] == "ok"
    assert body["model"] == {"name": "cxr-densenet121", "version": "1.0.0", "demo": False}  # TIE: latest update
    assert body["version"]


def test_health_is_503_with_the_error_when_the_database_fails(tmp_path):
    broken = Database(f"sqlite:///{tmp_path}")  # a directory: sqlite cannot open it
    with TestClient(create_app(Settings(data_dir=tmp_path / "var"), broken)) as client:
        response = client.get("/health")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "error"
    assert "OperationalError" in body["database"]
    broken.dispose()


def test_openapi_docs_and_json_errors(env):
    schema = env.client.get("/openapi.json").json()
    assert schema["info"]["title"] == "CXR Triage API"
    assert schema["info"]["version"]
    assert {"/health", "/worklist", "/studies/{study_instance_uid}", "/audit"} <= set(schema["paths"])
    assert env.client.get("/docs").status_code == 200
    assert env.client.get("/nope").json() == {"detail": "Not Found"}
    response = env.client.post("/worklist")
    assert response.status_code == 405 and isinstance(response.json()["detail"], str)


def test_app_opens_its_own_database_from_settings(database_url, tmp_path):
    settings = Settings(data_dir=tmp_path / "own", database_url=database_url)
    setup = Database(database_url)
    Base.metadata.create_all(setup.engine)
    setup.dispose()
    with TestClient(create_app(settings)) as client:
        body = client.get("/worklist").json()
        assert (body["data"], body["count"], body["count_exact"]) == ([], 0, True)
        assert body["disclaimer"] == "Not for diagnostic use." and body["policy"]["ceiling"] == "urgent"


# --- worklist --------------------------------------------------------------------------------------


def test_worklist_is_in_priority_order_then_oldest_first(env):
    response = env.client.get("/worklist")
    assert response.status_code == 200
    body = response.json()
    assert [item["study_instance_uid"] for item in body["data"]] == WORKLIST_ORDER
    assert body["count"] == 5
    assert "Not for diagnostic use" in body["disclaimer"] and "DEMO WEIGHTS" in body["disclaimer"]


def test_worklist_item_carries_top_findings_model_and_export_summary(env):
    high = env.client.get("/worklist").json()["data"][0]
    assert high["patient_name"] == "Doe^Patient1" and high["accession_number"] == "ACC1"
    assert high["status"] == "DONE" and high["status_reason"] == ""
    assert high["top_findings"] == [
        {"finding": "Pneumothorax", "probability": 0.91, "threshold": 0.5, "urgency": "critical"},
        {"finding": "Effusion", "probability": 0.72, "threshold": 0.5, "urgency": "urgent"},
        {"finding": "Cardiomegaly", "probability": 0.61, "threshold": 0.5, "urgency": "routine"},
    ]
    assert high["model"] == {"name": "cxr-densenet121", "version": "0.1.0-demo", "demo": True}
    assert high["export"] == {"status": "EXPORT_FAILED", "total": 2, "exported": 1, "pending": 0, "failed": 1}
    assert datetime.fromisoformat(high["received_at"]) == T0 + timedelta(minutes=10)


def test_worklist_shows_skipped_and_failed_reasons(env):
    items = {item["study_instance_uid"]: item for item in env.client.get("/worklist").json()["data"]}
    assert items[SKIPPED]["status"] == "SKIPPED" and items[SKIPPED]["status_reason"] == SKIP_REASON
    assert items[FAILED]["status"] == "FAILED" and items[FAILED]["status_reason"] == FAIL_REASON
    assert items[SKIPPED]["model"] is None and items[SKIPPED]["top_findings"] == []
    assert items[SKIPPED]["export"]["status"] is None
    assert items[LOW]["export"]["status"] == "EXPORT_PENDING"


def test_worklist_filters_and_pages(env):
    body = env.client.get("/worklist", params={"status": "SKIPPED"}).json()
    assert [i["study_instance_uid"] for i in body["data"]] == [SKIPPED] and body["count"] == 1
    body = env.client.get("/worklist", params=[("status", "SKIPPED"), ("status", "FAILED")]).json()
    assert [i["study_instance_uid"] for i in body["data"]] == [SKIPPED, FAILED]
    body = env.client.get("/worklist", params={"limit": 2, "offset": 1}).json()
    assert [i["study_instance_uid"] for i in body["data"]] == WORKLIST_ORDER[1:3] and body["count"] == 5


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"status": "BOGUS"}, "query parameter 'status"),
        ({"limit": 0}, "query parameter 'limit': Input should be greater than or equal to 1"),
        ({"limit": 501}, "query parameter 'limit': Input should be less than or equal to 500"),
        ({"limit": "many"}, "query parameter 'limit'"),
        ({"offset": -1}, "query parameter 'offset'"),
        ({"stauts": "DONE"}, "query parameter 'stauts': Extra inputs are not permitted"),
    ],
)
def test_worklist_rejects_bad_query_with_a_message(env, params, fragment):
    response = env.client.get("/worklist", params=params)
    assert response.status_code == 422
    body = response.json()
    assert isinstance(body["detail"], str) and fragment in body["detail"], body
    assert env.events(AuditAction.READ_WORKLIST) == []


# --- study detail ----------------------------------------------------------------------------------


def test_study_detail_has_everything(env):
    response = env.client.get(f"/studies/{HIGH}")
    assert response.status_code == 200
    body = response.json()
    assert body["study_instance_uid"] == HIGH and body["study_description"] == "XR CHEST PA AND LATERAL"
    [image] = body["images"]
    assert image["sop_instance_uid"] == FRONTAL
    assert [f["finding"] for f in image["findings"]] == list(FINDINGS)
    for f in image["findings"]:
        assert f["threshold"] == 0.5
        assert f["probability"] == HIGH_PROBABILITIES.get(f["finding"], 0.1)
        assert f["present"] is (f["finding"] in HIGH_PROBABILITIES)
    instances = {i["sop_instance_uid"]: i for i in body["instances"]}
    assert instances[FRONTAL]["eligible"] is True and instances[FRONTAL]["modality"] == "DX"
    assert instances[LATERAL]["eligible"] is False
    assert instances[LATERAL]["eligibility_reason"] == "lateral view (ViewPosition LL)"
    assert "path" not in instances[FRONTAL]
    assert [(r["kind"], r["sop_instance_uid"], r["finding"]) for r in body["results"]] == [
        ("SR", SR_UID, ""),
        ("HEATMAP", HEATMAP_UIDS[0], "Pneumothorax"),
        ("HEATMAP", HEATMAP_UIDS[1], "Effusion"),
    ]
    assert all(r["series_instance_uid"] for r in body["results"])
    assert body["heatmap_sop_instance_uids"] == HEATMAP_UIDS
    exports = {e["destination"]: e for e in body["exports"]}
    assert exports["ARCHIVE@10.0.0.6:11112"] == {
        "destination": "ARCHIVE@10.0.0.6:11112",
        "status": "EXPORT_FAILED",
        "attempts": 5,
        "last_error": "C-STORE failed: association rejected (0x0002)",
        "updated_at": exports["ARCHIVE@10.0.0.6:11112"]["updated_at"],
        "next_attempt_at": None,
    }
    assert [j["status"] for j in body["jobs"]] == ["DONE"]
    assert body["model"] == {"name": "cxr-densenet121", "version": "0.1.0-demo", "demo": True}
    assert "Not for diagnostic use" in body["disclaimer"]
    assert "DEMO WEIGHTS, not trained on clinical data" in body["disclaimer"]


def test_study_detail_without_demo_weights_and_skipped(env):
    tie = env.client.get(f"/studies/{TIE}").json()
    assert tie["disclaimer"] == "Not for diagnostic use." and tie["model"]["demo"] is False
    skipped = env.client.get(f"/studies/{SKIPPED}").json()
    assert skipped["status_reason"] == SKIP_REASON and skipped["images"] == [] and skipped["model"] is None


def test_unknown_study_is_404_with_a_message(env):
    for path in (f"/studies/{UNKNOWN}", f"/studies/{UNKNOWN}/sr", f"/studies/{UNKNOWN}/heatmaps"):
        response = env.client.get(path)
        assert response.status_code == 404
        assert response.json() == {"detail": f"study {UNKNOWN} not found"}
    assert env.events(AuditAction.READ_STUDY) == []


@pytest.mark.parametrize("bad", ["abc", "1.02.3", "1..2", "1.2.", "9" * 65, "1.2.3%20"])
def test_invalid_uid_is_422_with_a_message(env, bad):
    for path in (f"/studies/{bad}", f"/studies/{bad}/sr", f"/studies/{bad}/heatmaps"):
        response = env.client.get(path)
        assert response.status_code == 422, path
        detail = response.json()["detail"]
        assert isinstance(detail, str) and ("not a valid Study Instance UID" in detail or "at most" in detail)


# --- SR and heatmaps -------------------------------------------------------------------------------


def test_sr_is_served_as_dicom(env):
    response = env.client.get(f"/studies/{HIGH}/sr")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/dicom"
    assert response.content[128:132] == b"DICM"
    ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(response.content))
    assert ds.SOPInstanceUID == SR_UID and ds.StudyInstanceUID == HIGH


def test_sr_missing_is_404(env):
    response = env.client.get(f"/studies/{SKIPPED}/sr")
    assert response.status_code == 404
    assert response.json() == {"detail": f"study {SKIPPED} has no structured report"}


def test_sr_file_missing_from_storage_is_a_json_500(env):
    (env.settings.results_dir / result_relpath(HIGH, SR_UID)).unlink()
    response = env.client.get(f"/studies/{HIGH}/sr")
    assert response.status_code == 500
    assert "missing from storage" in response.json()["detail"]
    assert env.events(AuditAction.READ_SR) == []


def test_heatmaps_are_multipart_related_dicom(env):
    response = env.client.get(f"/studies/{HIGH}/heatmaps")
    assert response.status_code == 200
    content_type = response.headers["content-type"]
    assert content_type.startswith('multipart/related; type="application/dicom"; boundary=')
    parts = parse_multipart(content_type, response.content)
    assert len(parts) == 2
    uids = []
    for headers, payload in parts:
        assert headers["content-type"] == "application/dicom"
        assert int(headers["content-length"]) == len(payload)
        assert payload[128:132] == b"DICM"
        ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(payload))
        assert ds.StudyInstanceUID == HIGH
        uids.append(ds.SOPInstanceUID)
    assert uids == HEATMAP_UIDS


def test_one_heatmap_by_sop_instance_uid(env):
    response = env.client.get(f"/studies/{HIGH}/heatmaps/{HEATMAP_UIDS[1]}")
    assert response.status_code == 200 and response.headers["content-type"] == "application/dicom"
    assert pydicom.dcmread(pydicom.filebase.DicomBytesIO(response.content)).SOPInstanceUID == HEATMAP_UIDS[1]
    # The SR is not a heatmap; an unknown UID is 404, a malformed one 422.
    assert env.client.get(f"/studies/{HIGH}/heatmaps/{SR_UID}").status_code == 404
    response = env.client.get(f"/studies/{HIGH}/heatmaps/{UNKNOWN}")
    assert response.status_code == 404 and response.json() == {
        "detail": f"heatmap {UNKNOWN} not found in study {HIGH}"
    }
    response = env.client.get(f"/studies/{HIGH}/heatmaps/1.02")
    assert response.status_code == 422 and "not a valid SOP Instance UID" in response.json()["detail"]
    # A heatmap of another study is not reachable through this one.
    assert env.client.get(f"/studies/{TIE}/heatmaps/{HEATMAP_UIDS[0]}").status_code == 404


def test_study_without_heatmaps_is_404(env):
    response = env.client.get(f"/studies/{TIE}/heatmaps")
    assert response.status_code == 404 and response.json() == {"detail": f"study {TIE} has no heatmaps"}


# --- audit -----------------------------------------------------------------------------------------


def test_every_read_is_audited_with_the_authenticated_user(env):
    user = env.auth("dr.house")
    assert env.client.get("/worklist", params={"limit": 2}, headers=user).status_code == 200
    assert env.client.get(f"/studies/{HIGH}", headers=user).status_code == 200
    assert env.client.get(f"/studies/{HIGH}/sr", headers=user).status_code == 200
    assert env.client.get(f"/studies/{HIGH}/heatmaps", headers=user).status_code == 200
    assert env.client.get(f"/studies/{HIGH}/heatmaps/{HEATMAP_UIDS[0]}", headers=user).status_code == 200
    events = env.events()
    assert [(e.actor, e.action) for e in events] == [
        ("dr.house", "READ_WORKLIST"),
        ("dr.house", "READ_STUDY"),
        ("dr.house", "READ_SR"),
        ("dr.house", "READ_HEATMAPS"),
        ("dr.house", "READ_HEATMAPS"),
    ]
    worklist, study, sr, heatmaps, heatmap = events
    assert worklist.study_id is None and worklist.detail["study_instance_uids"] == [HIGH, TIE]
    assert {e.study_instance_uid for e in (study, sr, heatmaps, heatmap)} == {HIGH}
    assert {e.patient_id for e in (study, sr, heatmaps, heatmap)} == {"PID1"}
    assert all(e.study_id is not None for e in (study, sr, heatmaps, heatmap))
    assert all(e.client_address == "testclient" and e.outcome == 0 for e in events)
    assert sr.detail == {"sop_instance_uid": SR_UID}
    assert heatmaps.detail == {"sop_instance_uids": HEATMAP_UIDS}
    assert heatmap.detail == {"sop_instance_uids": [HEATMAP_UIDS[0]]}


def test_x_user_names_nobody(env):
    """The actor is the key's user, whatever a client writes in X-User."""
    env.client.get(f"/studies/{HIGH}", headers={**env.auth("alice"), "X-User": "dr.house"})
    [event] = env.events(AuditAction.READ_STUDY)
    assert event.actor == "alice"


def test_audit_lists_events_newest_first_and_records_its_own_read(env):
    env.client.get(f"/studies/{HIGH}", headers=env.auth("alice"))
    env.client.get(f"/studies/{HIGH}/sr", headers=env.auth("bob"))
    env.client.get(f"/studies/{TIE}", headers=env.auth("alice"))
    response = env.client.get("/audit", headers=env.auth("auditor"))
    assert response.status_code == 200
    body = response.json()
    assert body["count"] == 3 + env.baseline  # the fixture's USER_CREATED events before them
    assert [(e["actor"], e["action"], e["study_instance_uid"]) for e in body["data"][:3]] == [
        ("alice", "READ_STUDY", TIE),
        ("bob", "READ_SR", HIGH),
        ("alice", "READ_STUDY", HIGH),
    ]
    assert body["data"][1]["detail"] == {"sop_instance_uid": SR_UID}
    assert datetime.fromisoformat(body["data"][0]["at"]).tzinfo is not None
    newest, previous = body["data"][0], body["data"][1]
    assert newest["seq"] == previous["seq"] + 1 and newest["prev_hash"] == previous["hash"]
    [own] = env.events(AuditAction.READ_AUDIT)
    assert own.actor == "auditor" and own.detail == {"filter": {"limit": 100, "offset": 0}}


def test_audit_filters(env):
    env.client.get(f"/studies/{HIGH}", headers=env.auth("alice"))
    env.client.get(f"/studies/{HIGH}/sr", headers=env.auth("bob"))
    env.client.get(f"/studies/{TIE}", headers=env.auth("alice"))

    def actions(**params):
        response = env.client.get("/audit", params=params, headers=env.auth("auditor"))
        return [(e["actor"], e["action"]) for e in response.json()["data"]]

    assert actions(actor="alice") == [("alice", "READ_STUDY")] * 2
    assert actions(action="READ_SR") == [("bob", "READ_SR")]
    assert actions(study_instance_uid=TIE) == [("alice", "READ_STUDY")]
    assert actions(since=(datetime.now(timezone.utc) + timedelta(hours=1)).isoformat()) == []
    # A naive time is UTC; the READ_AUDIT events of the calls above are listed too from now on.
    assert len(actions(since="2000-01-01T00:00:00", action="READ_STUDY")) == 2
    assert actions(limit=1, action="READ_STUDY") == [("alice", "READ_STUDY")]
    filtered = env.events(AuditAction.READ_AUDIT)[2]
    assert filtered.study_instance_uid == TIE and filtered.study_id is not None


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"action": "DELETE_EVERYTHING"}, "query parameter 'action'"),
        ({"study_instance_uid": "not-a-uid"}, "query parameter 'study_instance_uid': not a valid DICOM UID"),
        ({"since": "yesterday"}, "query parameter 'since'"),
        ({"limit": 1001}, "query parameter 'limit'"),
        ({"who": "alice"}, "query parameter 'who': Extra inputs are not permitted"),
    ],
)
def test_audit_rejects_bad_query_with_a_message(env, params, fragment):
    response = env.client.get("/audit", params=params, headers=env.auth("auditor"))
    assert response.status_code == 422
    assert fragment in response.json()["detail"], response.json()


# --- package direction -----------------------------------------------------------------------------


def test_api_does_not_import_the_model_stack():
    code = (
        "import sys, dashboard_api.app\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'torch', 'monai', 'cxr_model', 'dicom_node', 'worker'})\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_admin_can_retry_exports_others_may_not(env):
    body = {"failed": True}
    assert env.client.post("/exports/retry", json=body).status_code == 403  # a radiologist
    assert env.client.post("/exports/retry", json=body, headers=env.auth("auditor")).status_code == 403
    answer = env.client.post("/exports/retry", json=body, headers=env.auth("root"))
    assert answer.status_code == 200, answer.text
    (retried,) = answer.json()["data"]
    assert retried == {"study_instance_uid": HIGH, "destination": "ARCHIVE@10.0.0.6:11112",
                       "status": "EXPORT_PENDING"}
    (event,) = env.events(AuditAction.EXPORT_RETRY_REQUESTED)
    assert event.actor == "root" and event.detail["previous"] == "EXPORT_FAILED"
    # Nothing failed any more; a bad body is a 422 with a message.
    assert env.client.post("/exports/retry", json=body, headers=env.auth("root")).status_code == 404
    bad = env.client.post("/exports/retry", json={"failed": True, "study_instance_uid": HIGH},
                          headers=env.auth("root"))
    assert bad.status_code == 422 and "study_instance_uid" in bad.text
    by_study = env.client.post("/exports/retry", json={"study_instance_uid": LOW}, headers=env.auth("root"))
    assert by_study.status_code == 200 and by_study.json()["count"] == 1


# --- worklist policy, read state, SR content, viewer link, who am I ------------------------------------


def test_worklist_items_explain_their_priority(env):
    body = env.client.get("/worklist").json()
    items = {item["study_instance_uid"]: item["priority"] for item in body["data"]}
    high = items[HIGH]
    assert (high["level"], high["name"], high["base"], high["analysis"]) == (5, "critical", "critical", "flagged")
    assert high["flagged"][0] == {"finding": "Pneumothorax", "urgency": "critical", "probability": 0.91,
                                  "threshold": 0.5}
    assert high["explanation"].startswith("Critical finding flagged: Pneumothorax 0.91 (operating threshold 0.50); "
                                          "also Effusion 0.72 (urgent), Cardiomegaly 0.61 (routine)")
    assert high["waiting"] and not high["escalated"] and high["next_escalation_at"] is None
    # Waiting since 2024: age has raised the routine study and the not-analysed ones to urgent, no further.
    low = items[LOW]
    assert (low["level"], low["name"], low["base"], low["escalated"]) == (4, "urgent", "routine", True)
    assert "Escalated by age to not analysed at 1 h 00 min, then to urgent at 1 h 30 min" in low["explanation"]
    skipped = items[SKIPPED]
    assert (skipped["name"], skipped["base"], skipped["analysis"]) == ("urgent", "not_analysed", "not_analysed")
    assert skipped["explanation"].startswith(f"Not analysed (SKIPPED: {SKIP_REASON}): read it without AI help.")
    assert items[FAILED]["explanation"].startswith(f"Not analysed (FAILED: {FAIL_REASON})")
    assert body["policy"] == {"escalation_minutes": {"awaiting_analysis": 10.0, "nothing_flagged": 240.0,
                                                     "minor": 120.0, "routine": 60.0, "not_analysed": 30.0},
                              "ceiling": "urgent"}
    assert datetime.fromisoformat(body["as_of"]).tzinfo is not None and body["count_exact"] is True
    detail = env.client.get(f"/studies/{HIGH}").json()
    assert detail["priority"]["explanation"] == high["explanation"]
    assert {f["finding"]: f["urgency"] for f in detail["images"][0]["findings"]} == DEFAULT_URGENCY


def test_worklist_filters_by_finding_date_and_read_state(env):
    def uids(**params):
        response = env.client.get("/worklist", params=params)
        assert response.status_code == 200, response.text
        return [item["study_instance_uid"] for item in response.json()["data"]]

    assert uids(finding="Pneumothorax") == [HIGH, TIE]
    assert uids(finding="Nodule") == [LOW]
    assert uids(finding="Hernia") == []  # scored on every image, flagged on none
    assert uids(received_from=(T0 + timedelta(minutes=6)).isoformat()) == [HIGH, TIE, FAILED]
    assert uids(received_from="2024-05-01T08:05:00", received_to="2024-05-01T08:10:00") == [HIGH, SKIPPED, FAILED]
    assert uids(read="false") == WORKLIST_ORDER and uids(read="true") == []
    assert env.client.put(f"/studies/{HIGH}/read").status_code == 200
    assert uids() == [TIE, LOW, SKIPPED, FAILED, HIGH]  # read studies after every waiting one
    assert uids(read="false") == [TIE, LOW, SKIPPED, FAILED] and uids(read="true") == [HIGH]
    response = env.client.get("/worklist", params={"finding": "<script>"})
    assert response.status_code == 422 and "query parameter 'finding'" in response.json()["detail"]
    response = env.client.get("/worklist", params={"offset": 100_001})
    assert response.status_code == 422 and "query parameter 'offset'" in response.json()["detail"]
    [event, *_] = env.events(AuditAction.READ_WORKLIST)
    assert event.detail["filter"] == {"finding": "Pneumothorax"}


def test_marking_read_is_audited_idempotent_and_reversible(env):
    first = env.client.put(f"/studies/{TIE}/read", headers=env.auth("alice"))
    assert first.status_code == 200
    body = first.json()
    assert body["read_by"] == "alice" and body["read_at"] and body["priority"]["waiting"] is False
    assert body["priority"]["explanation"].endswith("UTC: no longer waiting.")
    again = env.client.put(f"/studies/{TIE}/read", headers=env.auth("bob")).json()
    assert (again["read_by"], again["read_at"]) == ("alice", body["read_at"])  # the first reader stays
    back = env.client.delete(f"/studies/{TIE}/read", headers=env.auth("bob")).json()
    assert back["read_at"] is None and back["read_by"] == "" and back["priority"]["waiting"] is True
    assert [(e.actor, e.action, e.study_instance_uid) for e in env.events()] == [
        ("alice", "MARKED_READ", TIE), ("bob", "MARKED_UNREAD", TIE)]
    assert env.client.put(f"/studies/{UNKNOWN}/read").status_code == 404
    assert env.client.put(f"/studies/{TIE}/read", headers=env.auth("auditor")).status_code == 403


def test_sr_content_reads_a_real_report_and_says_when_a_file_is_none(env):
    from dicom_io.sr import build_sr
    from tests.unit.test_results import DEMO, NIH, _result

    broken = env.client.get(f"/studies/{HIGH}/sr/content")  # the seed's SR file is a bare dataset
    assert broken.status_code == 500 and "cannot be read: not a structured report" in broken.json()["detail"]
    source = pydicom.dcmread(NIH)
    build_sr([source], [_result(source)], DEMO).save_as(env.settings.results_dir / result_relpath(HIGH, SR_UID),
                                                        enforce_file_format=True)
    response = env.client.get(f"/studies/{HIGH}/sr/content")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["title"] == "Imaging Measurement Report" and body["verification_flag"] == "UNVERIFIED"
    assert body["root"]["value_type"] == "CONTAINER" and body["root"]["code"] == "(126000, DCM)"
    groups = [c for c in body["root"]["children"] if c["name"] == "Imaging Measurements"][0]["children"]
    assert len(groups) == 14 and "NUM Probability = " in body["text"]
    assert "DEMO WEIGHTS" in body["disclaimer"]
    [event] = env.events(AuditAction.READ_SR)
    assert event.detail == {"sop_instance_uid": SR_UID, "format": "content"}
    assert env.client.get(f"/studies/{SKIPPED}/sr/content").status_code == 404


def test_viewer_link_follows_the_configured_template(env):
    assert env.client.get(f"/studies/{HIGH}").json()["viewer_url"] is None
    settings = env.settings.model_copy(update={
        "viewer_url_template": "https://pacs.hospital.example/viewer?StudyInstanceUIDs={study_instance_uid}&acc={accession_number}"})
    with TestClient(create_app(settings, env.database), headers=env.auth("dr.house")) as client:
        url = client.get(f"/studies/{HIGH}").json()["viewer_url"]
    assert url == f"https://pacs.hospital.example/viewer?StudyInstanceUIDs={HIGH}&acc=ACC1"


def test_me_says_who_the_credentials_belong_to(env):
    me = env.client.get("/me").json()
    assert me == {"name": "dr.house", "roles": ["radiologist"], "method": "api-key", "permissions": ["read_studies"]}
    assert env.client.get("/me", headers=env.auth("auditor")).json()["permissions"] == ["read_audit"]
    assert env.client.get("/me", headers=env.auth("root")).json()["permissions"] == [
        "operate", "read_audit", "read_studies"]
    assert env.events() == []  # reads no study data


def test_the_page_and_the_docs_are_served_from_the_package_without_credentials(env):
    page = env.client.get("/", headers={"Authorization": ""})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
    config = json.loads(page.text.split('id="cxr-config">')[1].split("</script>")[0])
    assert config == {"version": env.client.app.version, "oidc": None, "refresh_seconds": 15.0}
    for path in ("/static/app.js", "/static/app.css", "/static/vendor/swagger-ui/swagger-ui-bundle.js",
                 "/static/vendor/redoc/redoc.standalone.js", "/docs", "/redoc"):
        response = env.client.get(path, headers={"Authorization": ""})
        assert response.status_code == 200, path
        assert b"cdn." not in response.content[:2000] and b"googleapis" not in response.content, path
    assert "Licensed under the Apache License" in env.client.get("/static/vendor/swagger-ui/LICENSE").text
    assert "MIT" in env.client.get("/static/vendor/redoc/LICENSE").text
    assert env.events() == []
