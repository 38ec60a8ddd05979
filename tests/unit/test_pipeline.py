"""The worker's pipeline without Celery: real files, real SQLite, the bundled model, a real Orthanc."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pydicom
import pytest
from sqlalchemy import func, select

from cxr_triage.runtime import load_model_for
from dicom_node.ingest import IngestService
from dicom_node.readiness import mark_quiet_studies_ready
from tests.conftest import DATA, free_port
from triage_core.db import Database
from triage_core import priority
from triage_core.models import AuditEvent, Base, Export, Finding, Instance, Job, ResultObject, Study
from triage_core.settings import Settings
from triage_core.values import FindingResult
from worker.export import export_once
from worker.pipeline import Pipeline

CHEST = DATA / "cxr_dicom" / "cr_chest_pa_mono1_10bit_explicit_le.dcm"
CHEST_J2K = DATA / "cxr_dicom" / "cr_chest_pa_mono1_15bit_j2k_lossy.dcm"
DOG_LATERAL = DATA / "not_cxr_dicom" / "dx_dog_thorax_lateral.dcm"

_MODEL = {}


def _model(settings):
    if "model" not in _MODEL:  # one load for the module: the bundled demo weights, eager PyTorch
        _MODEL["model"] = load_model_for(settings)
    return _MODEL["model"]


@pytest.fixture
def env(tmp_path):
    dead_port = free_port()  # nothing listens there
    settings = Settings(data_dir=tmp_path / "var", model_runtime="torch", model_threads=1,
                        export_destinations=f"NOBODY@127.0.0.1:{dead_port}")
    settings.ensure_dirs()
    database = Database(settings.database_url)
    Base.metadata.create_all(database.engine)
    yield settings, database, IngestService(settings, database), Pipeline(settings, database, lambda: _model(settings))
    database.dispose()


def _receive(ingest: IngestService, *paths) -> None:
    for path in paths:
        ds = pydicom.dcmread(path)
        outcome = ingest.store(ds, path.read_bytes(), calling_ae_title="TEST",
                               transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID))
        assert outcome.status == 0x0000, outcome


def _ready_job(database: Database) -> int:
    (job_id,) = mark_quiet_studies_ready(database, 0, now=datetime.now(timezone.utc) + timedelta(seconds=1))
    return job_id


def test_chest_study_is_scored_stored_and_queued_for_export(env):
    settings, database, ingest, pipeline = env
    _receive(ingest, CHEST)
    outcome = pipeline.run_job(_ready_job(database))
    assert outcome.status == "DONE", outcome
    with database.session() as session:
        study = session.scalar(select(Study))
        assert study.status == "DONE" and study.status_reason
        assert study.model_name == "cxr-triage-demo-densenet121" and study.model_version
        findings = session.scalars(select(Finding)).all()
        assert len(findings) == 14 and all(0 <= f.probability <= 1 for f in findings)
        card = _model(settings).card
        expected, flagged = priority.assess(
            (FindingResult(f.finding, f.probability, f.threshold, f.present) for f in findings), card.urgency)
        assert flagged and study.priority_level == expected  # the demo model flags findings
        assert study.priority_detail["analysis"] == "flagged"
        assert [f["finding"] for f in study.priority_detail["flagged"]] == [f.finding for f in flagged]
        assert {f.finding: f.urgency for f in findings} == card.urgency  # each finding row keeps its class
        rows = session.scalars(select(ResultObject)).all()
        kinds = sorted(r.kind for r in rows)
        assert kinds.count("SR") == 1 and "HEATMAP" in kinds
        for row in rows:
            ds = pydicom.dcmread(settings.results_dir / row.path)
            assert ds.StudyInstanceUID == study.study_instance_uid
            assert ds.SOPInstanceUID == row.sop_instance_uid
        heatmap_findings = {r.finding for r in rows if r.kind == "HEATMAP"}
        assert heatmap_findings <= {f.finding for f in findings} | {"overview"}
        exports = session.scalars(select(Export)).all()
        assert [(e.destination, e.status) for e in exports] == [(str(settings.export_destinations[0]), "EXPORT_PENDING")]
        assert sorted(outcome.export_ids) == [e.id for e in exports]
        actions = session.scalars(select(AuditEvent.action)).all()
        assert "RESULT_STORED" in actions


def test_running_the_same_job_again_changes_nothing(env):
    settings, database, ingest, pipeline = env
    _receive(ingest, CHEST)
    job_id = _ready_job(database)
    pipeline.run_job(job_id)
    with database.session() as session:
        before = session.scalar(select(func.count()).select_from(ResultObject))
    assert pipeline.run_job(job_id).status == "DONE"  # a redelivered message
    with database.session() as session:
        assert session.scalar(select(func.count()).select_from(ResultObject)) == before
        assert session.scalar(select(func.count()).select_from(Job)) == 1


def test_lateral_and_non_chest_are_skipped_with_reason(env):
    _, database, ingest, pipeline = env
    _receive(ingest, DOG_LATERAL)
    outcome = pipeline.run_job(_ready_job(database))
    assert outcome.status == "SKIPPED"
    with database.session() as session:
        study = session.scalar(select(Study))
        assert study.status == "SKIPPED" and "lateral" in study.status_reason.lower(), study.status_reason
        assert session.scalar(select(func.count()).select_from(ResultObject)) == 0
        assert session.scalar(select(func.count()).select_from(Export)) == 0


def test_an_exception_ends_failed_with_its_reason(env):
    settings, database, ingest, pipeline = env
    _receive(ingest, CHEST)
    settings.results_dir.rmdir()
    settings.results_dir.write_text("not a directory")  # result storage is broken
    outcome = pipeline.run_job(_ready_job(database))
    assert outcome.status == "FAILED"
    with database.session() as session:
        study = session.scalar(select(Study))
        job = session.scalar(select(Job))
        assert study.status == "FAILED" and "Error" in study.status_reason, study.status_reason
        assert job.status == "FAILED" and job.error == study.status_reason


def test_new_instance_during_processing_leaves_the_study_to_the_next_job(env, tmp_path):
    _, database, ingest, pipeline = env
    _receive(ingest, CHEST)
    first = _ready_job(database)
    with database.session() as session:  # the job is picked up...
        session.scalar(select(Study)).status = "PROCESSING"
    second = pydicom.dcmread(CHEST)  # ...and a second image of the same study arrives
    second.SOPInstanceUID = pydicom.uid.generate_uid()
    second.file_meta.MediaStorageSOPInstanceUID = second.SOPInstanceUID
    second.save_as(tmp_path / "second.dcm", enforce_file_format=True)
    _receive(ingest, tmp_path / "second.dcm")
    with database.session() as session:
        assert session.scalar(select(Study)).status == "RECEIVING"
    assert pipeline.run_job(first).status == "SUPERSEDED"
    assert pipeline.run_job(_ready_job(database)).status == "DONE"
    with database.session() as session:
        analysed = set(session.scalars(select(Finding.sop_instance_uid)))
    assert len(analysed) == 2


def test_export_to_an_unreachable_destination_is_rescheduled_then_given_up(env):
    settings, database, ingest, pipeline = env
    _receive(ingest, CHEST)
    (export_id,) = pipeline.run_job(_ready_job(database)).export_ids
    start = datetime.now(timezone.utc)
    assert export_once(settings, database, export_id, now=start) == "EXPORT_PENDING"
    with database.session() as session:
        export = session.get(Export, export_id)
        assert export.attempts == 1 and "not established" in export.last_error
        wait = (export.next_attempt_at - start).total_seconds()
        assert settings.export_backoff_seconds / 2 <= wait <= settings.export_backoff_seconds
        assert export.enqueued_at is None and export.locked_until is None  # for the sweeper to publish when due
    assert export_once(settings, database, export_id, now=start) == "NOT_DUE"  # an early message does nothing
    later = start + timedelta(hours=settings.export_give_up_hours, seconds=1)
    assert export_once(settings, database, export_id, now=later) == "EXPORT_FAILED"
    with database.session() as session:
        assert session.get(Export, export_id).attempts == 2


def test_export_to_orthanc_stores_every_result_object(env, orthanc):
    settings, database, ingest, pipeline = env
    _receive(ingest, CHEST)
    pipeline.run_job(_ready_job(database))
    with database.session() as session:
        export = session.scalar(select(Export))
        export.destination = f"{orthanc.ae_title}@127.0.0.1:{orthanc.dicom_port}"
        uids = set(session.scalars(select(ResultObject.sop_instance_uid)))
    assert export_once(settings, database, export.id) == "EXPORTED"
    stored = {orthanc.get(f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"] for i in orthanc.get("/instances")}
    assert uids <= stored


def test_queued_studies_are_scored_in_one_batch(env, tmp_path):
    """CXR_TRIAGE_BATCH_STUDIES (a GPU worker's default 8): one task claims the queued studies, the model
    scores their images in one call, and the other jobs' own messages then find them done. A study that
    fails in the batch fails alone."""
    settings, database, ingest, pipeline = env
    settings.batch_studies, settings.batch_wait_ms = 4, 50
    base = pydicom.dcmread(CHEST)
    for number in range(3):
        ds = pydicom.dcmread(CHEST)
        ds.StudyInstanceUID, ds.SOPInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(tmp_path / f"{number}.dcm", enforce_file_format=True)
        _receive(ingest, tmp_path / f"{number}.dcm")
    broken = pydicom.dcmread(CHEST)
    broken.StudyInstanceUID, broken.SOPInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    broken.file_meta.MediaStorageSOPInstanceUID = broken.SOPInstanceUID
    broken.save_as(tmp_path / "broken.dcm", enforce_file_format=True)
    _receive(ingest, tmp_path / "broken.dcm")
    with database.session() as session:  # its file is damaged on disk after it was received
        instance = session.scalar(select(Instance).where(Instance.sop_instance_uid == broken.SOPInstanceUID))
        (settings.instances_dir / instance.path).write_bytes(b"DICM-not-any-more")
    job_ids = mark_quiet_studies_ready(database, 0, now=datetime.now(timezone.utc) + timedelta(seconds=1))
    assert len(job_ids) == 4 and base.StudyInstanceUID

    calls = []
    model = pipeline.model
    original = model.predict

    def counting(images, **kwargs):
        calls.append(len(images))
        return original(images, **kwargs)

    model.predict = counting
    try:
        outcomes = pipeline.run_jobs(job_ids[0])
    finally:
        model.predict = original
    assert calls == [3]  # three studies' images in one call; the broken one never reached the model
    assert sorted(o.status for o in outcomes) == ["DONE", "DONE", "DONE", "SKIPPED"]
    assert all(pipeline.run_job(job_id).status in ("DONE", "FAILED") for job_id in job_ids[1:])  # late messages
    with database.session() as session:
        statuses = sorted(s.status for s in session.scalars(select(Study)))
        assert statuses == ["DONE", "DONE", "DONE", "SKIPPED"]
        assert session.scalar(select(func.count()).select_from(Job).where(Job.status == "DONE")) == 4
