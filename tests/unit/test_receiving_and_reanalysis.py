"""Issue 10 end to end below the service: conformant inputs never fail, bad pixel data and reused
SOP Instance UIDs are refused on receipt, and a re-analysed study never exports superseded results.

Real associations to our SCP on an ephemeral port, real files, real SQLite, the bundled model
(the fixtures of test_pipeline.py) and Orthanc as the PACS the results go to.
"""

from __future__ import annotations

import copy
import io
import logging
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient
from pynetdicom import AE
from sqlalchemy import func, select

from dashboard_api.app import create_app
from dicom_node.ingest import IngestService
from dicom_node.scp import start_scp
from tests import dicom_fixtures as fx
from tests.conftest import free_port
from tests.unit.test_pipeline import _ready_job, env  # noqa: F401  (env is a fixture)
from triage_core.db import Database
from triage_core.models import AuditEvent, Base, Instance, ResultObject, Study
from triage_core.settings import Destination, Settings
from worker.export import export_once

# --- receiving --------------------------------------------------------------------------------------


@pytest.fixture
def node(tmp_path):
    settings = Settings(data_dir=tmp_path / "var", dicom_port=free_port(), dicom_host="127.0.0.1",
                        ae_title="NODE_TEST")
    settings.ensure_dirs()
    database = Database(settings.database_url)
    Base.metadata.create_all(database.engine)
    server = start_scp(settings, IngestService(settings, database))
    yield settings, database
    server.shutdown()
    database.dispose()


def _store(settings: Settings, *datasets: pydicom.Dataset) -> list[pydicom.Dataset]:
    """C-STORE each dataset as encoded (one context per class and syntax); the response statuses."""
    ae = AE(ae_title="MODALITY")
    for sop_class, syntax in sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets}):
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", settings.dicom_port, ae_title=settings.ae_title)
    assert assoc.is_established
    try:
        return [assoc.send_c_store(ds) for ds in datasets]
    finally:
        assoc.release()


def _rejections(database: Database) -> list[dict]:
    with database.session() as session:
        return [e.detail for e in session.scalars(select(AuditEvent).where(AuditEvent.action == "INSTANCE_REJECTED"))]


def _instances(database: Database) -> int:
    with database.session() as session:
        return session.scalar(select(func.count()).select_from(Instance))


def test_truncated_pixel_data_gets_c000_a_log_line_and_an_audit_event(node, caplog):
    settings, database = node
    caplog.set_level(logging.WARNING, logger="dicom_node")
    source = fx.dx_for_presentation()
    (status,) = _store(settings, fx.truncated(source))
    assert status.Status == 0xC000
    assert "truncated" in status.ErrorComment
    assert any("0xC000" in r.getMessage() and "truncated" in r.getMessage() for r in caplog.records)
    (event,) = _rejections(database)
    assert event["status"] == "0xC000" and event["sop_instance_uid"] == source.SOPInstanceUID
    assert "Müller" not in str(event) and "Müller" not in caplog.text  # no patient data in logs or audit
    assert _instances(database) == 0 and not any(p.is_file() for p in settings.instances_dir.rglob("*"))
    # The complete dataset is then taken.
    assert [s.Status for s in _store(settings, source)] == [0x0000]


@pytest.mark.parametrize("make", [fx.jpeg_frame_larger_than_header, fx.jpeg_frame_header_patched,
                                  fx.j2k_frame_larger_than_header])
def test_compressed_frame_larger_than_its_header_gets_c000(node, make):
    settings, database = node
    (status,) = _store(settings, make())
    assert status.Status == 0xC000 and "Rows/Columns say 512x512" in status.ErrorComment
    assert _instances(database) == 0


def test_sop_instance_uid_of_another_study_is_refused_never_rebound(node):
    settings, database = node
    first = copy.deepcopy(fx.dx_for_presentation())
    other = copy.deepcopy(first)
    other.StudyInstanceUID = fx.uid("another-patient's-study")
    other.PatientName, other.PatientID = "Other^Patient", "OTHER01"
    assert [s.Status for s in _store(settings, first)] == [0x0000]
    with database.session() as session:
        before = session.execute(select(Instance.study_id, Instance.path, Instance.sha256)).one()
    (status,) = _store(settings, other)
    assert status.Status == 0x0111  # Duplicate SOP Instance
    assert "already stored in study" in status.ErrorComment
    with database.session() as session:
        assert session.execute(select(Instance.study_id, Instance.path, Instance.sha256)).one() == before
        assert session.scalar(select(func.count()).select_from(Study)) == 1  # no study for the refused one
        stored = pydicom.dcmread(settings.instances_dir / before[1])
    assert stored.StudyInstanceUID == first.StudyInstanceUID and str(stored.PatientName) == "Müller^Jürgen"
    (event,) = _rejections(database)
    assert event["status"] == "0x0111" and event["claimed_study_instance_uid"] == other.StudyInstanceUID
    assert "Other" not in str(event)
    # The same instance resent to its own study is still a no-op success.
    assert [s.Status for s in _store(settings, first)] == [0x0000]


# --- the pipeline on conformant inputs ----------------------------------------------------------------


def _receive(ingest: IngestService, *datasets: pydicom.Dataset, tmp_path: Path) -> None:
    for number, ds in enumerate(datasets):
        path = fx.write(ds, tmp_path / f"in-{ds.SOPInstanceUID}-{number}.dcm")
        read = pydicom.dcmread(path)
        outcome = ingest.store(read, path.read_bytes(), calling_ae_title="TEST",
                               transfer_syntax_uid=str(read.file_meta.TransferSyntaxUID))
        assert outcome.status == 0x0000, outcome


def _study(database: Database) -> Study:
    with database.session() as session:
        return session.scalar(select(Study))


@pytest.mark.parametrize("make", [
    lambda: fx.dx_for_presentation(),
    lambda: fx.cr_with_projection(),
    lambda: fx.with_character_set(copy.deepcopy(fx.dx_for_presentation()), "IR 87"),
    lambda: fx.with_character_set(copy.deepcopy(fx.dx_for_presentation()), "IR 149"),
], ids=["dx_for_presentation", "cr_with_projection", "iso2022_ir87", "iso2022_ir149"])
def test_conformant_study_is_done_with_results(env, make, tmp_path):  # noqa: F811
    settings, database, ingest, pipeline = env
    source = make()
    _receive(ingest, source, tmp_path=tmp_path)
    outcome = pipeline.run_job(_ready_job(database))
    assert outcome.status == "DONE", outcome.reason
    with database.session() as session:
        rows = session.scalars(select(ResultObject)).all()
        assert {r.kind for r in rows} == {"SR", "HEATMAP", "PARAMETRIC_MAP"}
        for row in rows:
            ds = pydicom.dcmread(settings.results_dir / row.path)
            assert ds.PatientName == source.PatientName and ds.get("SpecificCharacterSet") == source.get(
                "SpecificCharacterSet")


def test_dx_for_processing_is_skipped_with_its_reason(env, tmp_path):  # noqa: F811
    _, database, ingest, pipeline = env
    _receive(ingest, fx.dx_for_processing(), tmp_path=tmp_path)
    assert pipeline.run_job(_ready_job(database)).status == "SKIPPED"
    study = _study(database)
    assert study.status == "SKIPPED" and "for processing" in study.status_reason


def test_pa_and_lateral_study_scores_the_pa_and_lists_the_lateral_as_not_analysed(env, tmp_path):  # noqa: F811
    settings, database, ingest, pipeline = env
    pa, lateral = fx.pa_lateral_study()
    _receive(ingest, pa, lateral, tmp_path=tmp_path)
    outcome = pipeline.run_job(_ready_job(database))
    assert outcome.status == "DONE"
    study = _study(database)
    assert "1 other instance(s) not analysed" in study.status_reason and "ViewPosition=LL" in study.status_reason
    with database.session() as session:
        sources = {r.source_sop_instance_uid for r in session.scalars(select(ResultObject)) if r.kind == "HEATMAP"}
    assert sources == {pa.SOPInstanceUID}
    client = TestClient(create_app(settings, database=database))
    detail = client.get(f"/studies/{pa.StudyInstanceUID}", headers=reader(database)).json()
    eligibility = {i["sop_instance_uid"]: (i["eligible"], i["eligibility_reason"]) for i in detail["instances"]}
    assert eligibility[pa.SOPInstanceUID][0] is True
    assert eligibility[lateral.SOPInstanceUID] == (False, "lateral view (ViewPosition=LL)")
    assert {image["sop_instance_uid"] for image in detail["images"]} == {pa.SOPInstanceUID}


# --- re-analysis --------------------------------------------------------------------------------------


def _orthanc_sop_uids(orthanc) -> set[str]:
    return {orthanc.get(f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"] for i in orthanc.get("/instances")}


def _current_and_superseded(database: Database) -> tuple[dict[str, ResultObject], dict[str, ResultObject]]:
    with database.session() as session:
        rows = session.scalars(select(ResultObject)).all()
    return ({r.sop_instance_uid: r for r in rows if r.superseded_at is None},
            {r.sop_instance_uid: r for r in rows if r.superseded_at is not None})


@pytest.mark.parametrize("keep", [False, True], ids=["superseded-files-deleted", "superseded-files-kept"])
def test_reanalysis_never_exports_superseded_results(env, orthanc, tmp_path, keep):  # noqa: F811
    settings, database, ingest, pipeline = env
    settings.keep_superseded_results = keep
    pa = fx.dx_for_presentation()
    ap = copy.deepcopy(fx.dx_for_presentation(view="AP", uid_seed="second-frontal", instance_number=2,
                                              series_number=2))
    ap.StudyInstanceUID = pa.StudyInstanceUID
    settings.export_destinations = [Destination(orthanc.ae_title, "127.0.0.1", orthanc.dicom_port)]

    def analyse_and_export() -> None:
        outcome = pipeline.run_job(_ready_job(database))
        assert outcome.status == "DONE"
        (export_id,) = outcome.export_ids
        assert export_once(settings, database, export_id) == "EXPORTED"

    _receive(ingest, pa, tmp_path=tmp_path)
    analyse_and_export()
    first, _ = _current_and_superseded(database)
    assert _orthanc_sop_uids(orthanc) == set(first)
    (first_sr,) = [uid for uid, row in first.items() if row.kind == "SR"]

    # An extra image of the same study: analysed again, and PACS emptied to see exactly what is sent.
    _receive(ingest, ap, tmp_path=tmp_path)
    for orthanc_id in orthanc.get("/instances"):
        orthanc.delete(f"/instances/{orthanc_id}")
    analyse_and_export()
    current, superseded = _current_and_superseded(database)
    assert first_sr in superseded and first_sr not in current
    assert _orthanc_sop_uids(orthanc) == set(current)  # nothing superseded went to PACS
    assert not set(superseded) & _orthanc_sop_uids(orthanc)
    for uid, row in superseded.items():
        assert (settings.results_dir / row.path).exists() is keep, uid
    (sr_row,) = [row for row in current.values() if row.kind == "SR"]
    sr = pydicom.dcmread(settings.results_dir / sr_row.path)
    (item,) = sr.PredecessorDocumentsSequence
    assert item.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first_sr

    client = TestClient(create_app(settings, database=database))
    headers = reader(database)
    detail = client.get(f"/studies/{pa.StudyInstanceUID}", headers=headers).json()
    assert {r["sop_instance_uid"] for r in detail["results"]} == set(current)
    served = pydicom.dcmread(io.BytesIO(client.get(f"/studies/{pa.StudyInstanceUID}/sr", headers=headers).content))
    assert served.SOPInstanceUID == sr_row.sop_instance_uid
    assert client.get(f"/studies/{pa.StudyInstanceUID}/heatmaps/{next(iter(superseded))}",
                      headers=headers).status_code == 404


def reader(database: Database) -> dict[str, str]:
    """A radiologist's Authorization header (the API answers authenticated callers once a user exists)."""
    from triage_core.users import create_user

    with database.session() as session:
        key = create_user(session, name="test-reader", role="radiologist", actor="cli:test").key
    return {"Authorization": f"Bearer {key}"}
