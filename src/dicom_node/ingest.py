"""Receive one instance: validate, spool atomically, record, answer a status.

Plain functions: the SCP handler calls `IngestService.store`, tests call it directly.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass
from datetime import datetime, timezone

from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from dicom_io.pixels import pixel_data_problem
from triage_core import audit
from triage_core.db import Database
from triage_core.models import Instance, Study
from triage_core.settings import Settings
from triage_core.states import AuditAction, AuditOutcome, StudyStatus
from triage_core.storage import instance_relpath, is_valid_uid

log = logging.getLogger(__name__)
ACTOR = audit.SYSTEM_ACTORS["node"]

from .statuses import (
    CANNOT_UNDERSTAND,
    DATASET_DOES_NOT_MATCH_SOP_CLASS,
    DUPLICATE_SOP_INSTANCE,
    OUT_OF_RESOURCES,
    SUCCESS,
)


@dataclass(frozen=True)
class StoreOutcome:
    status: int
    study_id: int | None = None
    duplicate: bool = False
    reason: str = ""


def _text(ds: Dataset, keyword: str, limit: int = 64) -> str:
    value = ds.get(keyword, "")
    return str(value if value is not None else "")[:limit]


class IngestService:
    """Stores instances under the data directory and records them in the worklist."""

    def __init__(self, settings: Settings, database: Database) -> None:
        self.settings = settings
        self.database = database
        # One writer per node process; IntegrityError retry covers several nodes.
        self._lock = threading.Lock()

    def store(
        self, dataset: Dataset, encoded: bytes, *, calling_ae_title: str, transfer_syntax_uid: str,
        affected_sop_instance_uid: str = "", affected_sop_class_uid: str = "",
    ) -> StoreOutcome:
        try:
            study_uid = str(dataset.get("StudyInstanceUID", "") or "")
            series_uid = str(dataset.get("SeriesInstanceUID", "") or "")
            sop_uid = str(dataset.get("SOPInstanceUID", "") or "")
            sop_class = str(dataset.get("SOPClassUID", "") or "")
        except Exception as exc:  # a malformed element in the header
            return self._refuse(CANNOT_UNDERSTAND, f"cannot read identifying attributes: {exc}",
                                calling_ae_title, affected_sop_instance_uid)

        problems = [
            name
            for name, value in (
                ("StudyInstanceUID", study_uid),
                ("SeriesInstanceUID", series_uid),
                ("SOPInstanceUID", sop_uid),
                ("SOPClassUID", sop_class),
            )
            if not is_valid_uid(value)
        ]
        if problems:
            return self._refuse(DATASET_DOES_NOT_MATCH_SOP_CLASS, "missing or invalid " + ", ".join(problems),
                                calling_ae_title, affected_sop_instance_uid)
        if affected_sop_instance_uid and affected_sop_instance_uid != sop_uid:
            return self._refuse(
                DATASET_DOES_NOT_MATCH_SOP_CLASS,
                "SOPInstanceUID in the dataset differs from the request's Affected SOP Instance UID",
                calling_ae_title, sop_uid, study_uid)
        if affected_sop_class_uid and affected_sop_class_uid != sop_class:
            return self._refuse(
                DATASET_DOES_NOT_MATCH_SOP_CLASS,
                "SOPClassUID in the dataset differs from the request's Affected SOP Class UID",
                calling_ae_title, sop_uid, study_uid)
        try:
            problem = pixel_data_problem(dataset, transfer_syntax_uid)
        except Exception as exc:  # an element that cannot be decoded
            problem = f"pixel data attributes cannot be read: {type(exc).__name__}: {exc}"
        if problem:
            return self._refuse(CANNOT_UNDERSTAND, problem, calling_ae_title, sop_uid, study_uid)

        relpath = instance_relpath(study_uid, sop_uid)
        digest = hashlib.sha256(encoded).hexdigest()
        with self._lock:
            try:
                existing = self._existing(sop_uid)
                if existing is not None and existing[0] != study_uid:
                    # Never re-bind an instance to another study (another patient, perhaps):
                    # the sender has reused a UID. The stored study keeps its instance.
                    return self._refuse(
                        DUPLICATE_SOP_INSTANCE,
                        f"SOP Instance UID already stored in study {existing[0]}; refused for study {study_uid}",
                        calling_ae_title, sop_uid, existing[0], claimed_study_instance_uid=study_uid)
                if existing is not None and existing[1] == digest:
                    return self._record_duplicate(study_uid, sop_uid, calling_ae_title)
                self.settings.storage.instances.write_bytes(relpath, encoded)  # durable before we answer
            except OSError as exc:
                log.error("C-STORE of SOP %s could not be written: %s", sop_uid, exc)
                return StoreOutcome(OUT_OF_RESOURCES, reason=f"storage error: {exc.strerror or exc}")
            for attempt in range(3):
                try:
                    study_id = self._record(
                        dataset, study_uid, series_uid, sop_uid, sop_class, relpath, len(encoded),
                        digest, calling_ae_title, transfer_syntax_uid,
                    )
                    break
                except IntegrityError:
                    if attempt == 2:
                        raise
                    log.info("concurrent insert for study %s, retrying", study_uid)
        log.info("stored SOP %s (study %s, id %s) from %s", sop_uid, study_uid, study_id, calling_ae_title)
        return StoreOutcome(SUCCESS, study_id=study_id)

    def _refuse(
        self, status: int, reason: str, calling_ae_title: str, sop_instance_uid: str = "",
        study_instance_uid: str = "", **detail: str,
    ) -> StoreOutcome:
        """Answer a failure status: a log line and an audit event, both without patient data."""
        log.warning("C-STORE refused with 0x%04X from %s (SOP %s): %s",
                    status, calling_ae_title, sop_instance_uid or "?", reason)
        try:
            with self.database.session() as session:
                study = None
                if study_instance_uid and is_valid_uid(study_instance_uid):
                    study = session.scalar(select(Study).where(Study.study_instance_uid == study_instance_uid))
                audit.record(session, actor=ACTOR, action=AuditAction.INSTANCE_REJECTED, study=study,
                             status=f"0x{status:04X}", reason=reason, calling_ae_title=calling_ae_title,
                             sop_instance_uid=sop_instance_uid if is_valid_uid(sop_instance_uid) else "",
                             **detail)
        except Exception:  # the refusal stands even when the audit cannot be written
            log.exception("audit of a refused C-STORE could not be written")
        return StoreOutcome(status, reason=reason)

    def association_rejected(self, *, calling_ae_title: str, address: str, reason: str) -> None:
        """A security alert for a refused association (no patient data: AE title and address only)."""
        log.warning("association from %s (%s) rejected: %s", calling_ae_title or "?", address or "?", reason)
        try:
            with self.database.session() as session:
                audit.record(session, actor=f"dicom:{calling_ae_title or '?'}@{address or '?'}",
                             action=AuditAction.ASSOCIATION_REJECTED, outcome=AuditOutcome.MINOR_FAILURE,
                             client_address=address, calling_ae_title=calling_ae_title,
                             called_ae_title=self.settings.ae_title, reason=reason)
        except Exception:  # the rejection stands even when its audit event cannot be written
            log.exception("audit of a rejected association could not be written")

    def _existing(self, sop_uid: str) -> tuple[str, str] | None:
        """(Study Instance UID, SHA-256) of the stored instance with this SOP Instance UID."""
        with self.database.session() as session:
            row = session.execute(
                select(Study.study_instance_uid, Instance.sha256)
                .join(Instance, Instance.study_id == Study.id)
                .where(Instance.sop_instance_uid == sop_uid)
            ).first()
            return (row[0], row[1]) if row else None

    def _record_duplicate(self, study_uid: str, sop_uid: str, calling_ae_title: str) -> StoreOutcome:
        with self.database.session() as session:
            study = session.scalar(select(Study).where(Study.study_instance_uid == study_uid))
            audit.record(session, actor=ACTOR, action=AuditAction.INSTANCE_DUPLICATE, study=study,
                         sop_instance_uid=sop_uid, calling_ae_title=calling_ae_title)
            log.info("duplicate SOP %s (study %s) from %s: already stored, unchanged",
                     sop_uid, study_uid, calling_ae_title)
            return StoreOutcome(SUCCESS, study_id=study.id if study else None, duplicate=True)

    def _record(
        self, ds: Dataset, study_uid: str, series_uid: str, sop_uid: str, sop_class: str,
        relpath: str, size: int, digest: str, calling_ae_title: str, transfer_syntax_uid: str,
    ) -> int:
        now = datetime.now(timezone.utc)
        with self.database.session() as session:
            study = session.scalar(select(Study).where(Study.study_instance_uid == study_uid))
            if study is None:
                study = Study(
                    study_instance_uid=study_uid,
                    accession_number=_text(ds, "AccessionNumber", 64),
                    patient_id=_text(ds, "PatientID", 64),
                    patient_name=_text(ds, "PatientName", 324),
                    study_date=_text(ds, "StudyDate", 8),
                    study_description=_text(ds, "StudyDescription", 64),
                    status=str(StudyStatus.RECEIVING),
                    received_at=now,
                    last_instance_at=now,
                )
                session.add(study)
                session.flush()
                audit.record(session, actor=ACTOR, action=AuditAction.STATUS_CHANGED, study=study,
                             previous=None, status=str(StudyStatus.RECEIVING), reason="first instance")
            else:
                study.last_instance_at = now
                if study.status != StudyStatus.RECEIVING:
                    # New or changed instances after READY/PROCESSING/DONE: the study is
                    # processed again once quiet; deterministic result UIDs replace old results.
                    audit.set_status(session, study, StudyStatus.RECEIVING, actor=ACTOR,
                                     reason=f"new instance after {study.status}")
            instance = session.scalar(select(Instance).where(Instance.sop_instance_uid == sop_uid))
            if instance is None:
                instance = Instance(sop_instance_uid=sop_uid, study_id=study.id)
                session.add(instance)
            instance.series_instance_uid = series_uid
            instance.sop_class_uid = sop_class
            instance.transfer_syntax_uid = transfer_syntax_uid
            instance.modality = _text(ds, "Modality", 16)
            instance.path = relpath
            instance.size_bytes = size
            instance.sha256 = digest
            instance.calling_ae_title = calling_ae_title[:16]
            instance.received_at = now
            instance.eligible = None
            instance.eligibility_reason = ""
            audit.record(session, actor=ACTOR, action=AuditAction.INSTANCE_RECEIVED, study=study,
                         sop_instance_uid=sop_uid, series_instance_uid=series_uid,
                         calling_ae_title=calling_ae_title, size_bytes=size)
            session.flush()
            return study.id


