"""The DICOM node on an ephemeral port: real associations, real files, real SQLite."""

from __future__ import annotations

import shutil
import time
from datetime import datetime, timedelta, timezone

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, StoragePresentationContexts
from pynetdicom.sop_class import ComputedRadiographyImageStorage, Verification
from sqlalchemy import func, select

from dicom_node.ingest import IngestService
from dicom_node.readiness import mark_quiet_studies_ready, send_pending_jobs
from dicom_node.scp import start_scp
from tests.conftest import DATA, free_port, need, storescu, wait_until
from triage_core.db import Database
from triage_core.models import AuditEvent, Base, Instance, Job, Study
from triage_core.settings import Settings

CHEST = DATA / "cxr_dicom" / "cr_chest_pa_mono1_10bit_explicit_le.dcm"


@pytest.fixture
def node(tmp_path):
    # The quiet period alone decides readiness here; the release path has its own test below.
    settings = Settings(data_dir=tmp_path / "var", dicom_port=free_port(), dicom_host="127.0.0.1", ae_title="NODE_TEST",
                        ready_on_release=False)
    settings.ensure_dirs()
    database = Database(settings.database_url)
    Base.metadata.create_all(database.engine)
    server = start_scp(settings, IngestService(settings, database))
    yield settings, database
    server.shutdown()
    database.dispose()


def _associate(settings: Settings, contexts=StoragePresentationContexts):
    ae = AE(ae_title="TEST_SCU")
    ae.requested_contexts = contexts
    assoc = ae.associate("127.0.0.1", settings.dicom_port, ae_title=settings.ae_title)
    assert assoc.is_established
    return assoc


def test_echo_and_store_write_file_and_row(node):
    settings, database = node
    assoc = _associate(settings)
    ds = pydicom.dcmread(CHEST)
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == 0x0000
    with database.session() as session:
        instance = session.scalar(select(Instance))
        assert instance.sop_instance_uid == ds.SOPInstanceUID
        study = session.scalar(select(Study))
        assert study.status == "RECEIVING"
        assert study.accession_number == str(ds.get("AccessionNumber", ""))
    stored = settings.instances_dir / instance.path
    assert stored.exists()
    # File names never carry the UID itself.
    assert ds.SOPInstanceUID not in str(stored) and ds.StudyInstanceUID not in str(stored)
    assert pydicom.dcmread(stored).SOPInstanceUID == ds.SOPInstanceUID
    assert not list(stored.parent.glob(".incoming-*"))


def test_echo(node):
    settings, _ = node
    ae = AE(ae_title="TEST_SCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", settings.dicom_port, ae_title=settings.ae_title)
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


def _bad_dataset(**overrides) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Test^Bad"
    ds.Modality = "CR"
    for key, value in overrides.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


@pytest.mark.parametrize(
    "overrides, expected_word",
    [
        ({"StudyInstanceUID": None}, "StudyInstanceUID"),
        ({"SeriesInstanceUID": "../../etc/passwd"}, "SeriesInstanceUID"),
        ({"StudyInstanceUID": "1.2.3." + "9" * 70}, "StudyInstanceUID"),
    ],
)
def test_invalid_uids_get_a_failure_status_and_a_log_line(node, caplog, overrides, expected_word):
    settings, database = node
    assoc = _associate(settings)
    status = assoc.send_c_store(_bad_dataset(**overrides))
    assoc.release()
    assert status.Status == 0xA900
    assert any(expected_word in record.getMessage() for record in caplog.records)
    with database.session() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 0
    assert not any(p.is_file() for p in settings.instances_dir.rglob("*"))


def test_calling_ae_allow_list_rejects_others(tmp_path):
    settings = Settings(data_dir=tmp_path / "var", dicom_port=free_port(), dicom_host="127.0.0.1",
                        allowed_calling_aets="PACS1,PACS2")
    database = Database(settings.database_url)
    Base.metadata.create_all(database.engine)
    server = start_scp(settings, IngestService(settings, database))
    try:
        ae = AE(ae_title="STRANGER")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", settings.dicom_port, ae_title=settings.ae_title)
        assert assoc.is_rejected
        ae = AE(ae_title="PACS2")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", settings.dicom_port, ae_title=settings.ae_title)
        assert assoc.is_established
        assoc.release()
        assert server.refusals.flush()  # written in the background, throttled per source and reason
        with database.session() as session:  # the refusal is a security alert (DICOM PS3.15 A.5.3.11)
            [alert] = session.scalars(select(AuditEvent).where(AuditEvent.action == "ASSOCIATION_REJECTED")).all()
        assert alert.actor == "dicom:STRANGER@127.0.0.1" and alert.outcome == 4
        assert alert.detail["reason"] == "calling AE title 'STRANGER' is not allowed"
        assert alert.client_address == "127.0.0.1"
    finally:
        server.shutdown()
        database.dispose()


def test_duplicate_instance_is_one_row_and_quiet_study_becomes_ready_once(node):
    settings, database = node
    ds = pydicom.dcmread(CHEST)
    assoc = _associate(settings)
    assert assoc.send_c_store(ds).Status == 0x0000
    assert assoc.send_c_store(ds).Status == 0x0000
    assoc.release()
    with database.session() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 1
        assert session.scalar(select(func.count()).where(AuditEvent.action == "INSTANCE_DUPLICATE")) == 1

    # Not yet quiet: nothing happens. Quiet: READY with one job; again: still one job.
    assert mark_quiet_studies_ready(database, 60.0) == []
    later = datetime.now(timezone.utc) + timedelta(seconds=61)
    job_ids = mark_quiet_studies_ready(database, 60.0, now=later)
    assert len(job_ids) == 1
    assert mark_quiet_studies_ready(database, 60.0, now=later) == []
    sent: list[int] = []
    assert send_pending_jobs(database, sent.append) == 1
    assert send_pending_jobs(database, sent.append) == 0
    assert sent == job_ids
    with database.session() as session:
        assert session.scalar(select(Study.status)) == "READY"
        assert session.get(Job, job_ids[0]).enqueued_at is not None


def test_enqueue_failure_keeps_job_for_retry(node):
    settings, database = node
    assoc = _associate(settings)
    assoc.send_c_store(pydicom.dcmread(CHEST))
    assoc.release()
    [job_id] = mark_quiet_studies_ready(database, 0.0, now=datetime.now(timezone.utc) + timedelta(seconds=1))

    def broken(_job_id):
        raise ConnectionError("broker down")

    assert send_pending_jobs(database, broken) == 0
    sent: list[int] = []
    assert send_pending_jobs(database, sent.append) == 1
    assert sent == [job_id]


def test_storescu_sends_compressed_and_uncompressed(node):
    need(shutil.which("storescu") is not None, "dcmtk is not installed")
    settings, database = node
    files = [CHEST, DATA / "cxr_dicom" / "siim_chest_pa_jpeg_baseline_no_pneumothorax.dcm",
             DATA / "not_cxr_dicom" / "cr_tibia_j2k.dcm"]
    result = storescu(settings.dicom_port, settings.ae_title, *files)
    assert result.returncode == 0, result.stderr
    with database.session() as session:
        syntaxes = set(session.scalars(select(Instance.transfer_syntax_uid)))
    assert "1.2.840.10008.1.2.4.50" in syntaxes  # JPEG baseline kept as sent
    assert "1.2.840.10008.1.2.4.91" in syntaxes  # JPEG 2000 kept as sent


@pytest.mark.parametrize("ready_on_release", [True, False])
def test_a_released_association_ends_the_quiet_period(tmp_path, ready_on_release):
    """The modality released the association after the study: ready at once, not after the quiet period
    (CXR_TRIAGE_READY_ON_RELEASE); a later instance starts the wait again."""
    settings = Settings(data_dir=tmp_path / "var", dicom_port=free_port(), dicom_host="127.0.0.1",
                        ae_title="NODE_TEST", ready_on_release=ready_on_release)
    settings.ensure_dirs()
    database = Database(settings.database_url)
    Base.metadata.create_all(database.engine)
    server = start_scp(settings, IngestService(settings, database))
    try:
        assoc = _associate(settings)
        assert assoc.send_c_store(pydicom.dcmread(CHEST)).Status == 0x0000
        assert mark_quiet_studies_ready(database, 60.0) == []  # still associated: wait
        assoc.release()
        ready = lambda: mark_quiet_studies_ready(database, 60.0)  # noqa: E731
        if ready_on_release:
            (job_id,) = wait_until(ready, 5, interval=0.05, what="the study to be ready after the release")
            with database.session() as session:
                assert session.scalar(select(Study)).status_reason == "the sending association was released"
        else:
            time.sleep(0.5)
            assert ready() == []
    finally:
        server.shutdown()
        database.dispose()
