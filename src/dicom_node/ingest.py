"""Receive one instance: validate, spool, commit durably together with its neighbours, answer a status.

The C-STORE handler calls `IngestService.store_file` with the spool file that
pynetdicom wrote while the data set arrived (never held whole in memory);
tests and tools call `IngestService.store` with encoded bytes.

Durability before success, as before: the file is renamed into place, its data
and its directory are fsynced, and only then is its database row committed and
0x0000 answered; a row never names a file that a crash could lose. What changed
is who pays and when: the association thread checks the file (header, pixel
data against the header, SHA-256), and one `GroupCommitter` thread per process
takes every instance waiting at that moment, decides each (new, changed,
duplicate, or a SOP Instance UID of another study), renames them, and fsyncs
their files in parallel and each directory once while it writes their rows;
one transaction then commits them all (group commit). The fsync after the
rename also carries the rename to disk, so the directory fsync that follows is
nearly free. One sender waits for one commit per instance; N concurrent
senders share their fsyncs and commits.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Generic, Protocol, TypeVar

from pydicom.dataset import Dataset
from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError, OperationalError

from dicom_io.pixels import pixel_data_problem_in_file, read_header
from triage_core import audit
from triage_core.db import Database
from triage_core.models import Instance, Study
from triage_core.settings import Settings
from triage_core.states import AuditAction, StudyStatus
from triage_core.storage import LocalStore, instance_relpath, is_valid_uid

from .batching import take_batch
from .statuses import (
    CANNOT_UNDERSTAND,
    DATASET_DOES_NOT_MATCH_SOP_CLASS,
    DUPLICATE_SOP_INSTANCE,
    OUT_OF_RESOURCES,
    SUCCESS,
)

log = logging.getLogger(__name__)
ACTOR = audit.SYSTEM_ACTORS["node"]

#: Instances one transaction commits at most.
BATCH_LIMIT = 64
#: Attempts of a batch whose transaction lost a race with another process (unique key, SQLite lock).
COMMIT_ATTEMPTS = 4
#: Threads that fsync the files of one batch at once (the file system merges their journal commits).
FSYNC_THREADS = 8


@dataclass(frozen=True)
class StoreOutcome:
    status: int
    study_id: int | None = None
    duplicate: bool = False
    reason: str = ""


@dataclass
class Received:
    """One checked spool file waiting for its commit (crosses process boundaries as `as_message`)."""

    spool_path: Path
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    calling_ae_title: str
    size: int
    sha256: str
    #: Study-level attributes for a new Study row, and the instance's modality.
    study_attributes: dict[str, str] = field(default_factory=dict)
    modality: str = ""
    #: Set once the file has been renamed into place (a retried batch does not rename again), or, with
    #: an object store (CXR_TRIAGE_STORAGE_URL), the key it was uploaded under.
    final_path: Path | None = None
    stored_key: str | None = None

    def as_message(self) -> dict:
        return {name: (str(value) if isinstance(value, Path) else value)
                for name, value in self.__dict__.items() if name not in ("final_path", "stored_key")}

    @classmethod
    def from_message(cls, message: dict) -> "Received":
        return cls(**dict(message, spool_path=Path(message["spool_path"])))


def _text(ds: Dataset, keyword: str, limit: int = 64) -> str:
    value = ds.get(keyword, "")
    return str(value if value is not None else "")[:limit]


def _fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb", buffering=0) as handle:
        buffer = bytearray(1 << 20)
        view = memoryview(buffer)
        while count := handle.readinto(buffer):
            digest.update(view[:count])
            size += count
    return digest.hexdigest(), size


T = TypeVar("T")
R = TypeVar("R")


class Committer(Protocol):
    def submit(self, item: Received) -> StoreOutcome: ...

    def close(self) -> None: ...


class GroupCommitter(Generic[T, R]):
    """One thread that commits what concurrent callers submit, in batches.

    `submit` blocks its caller until the batch holding its item is committed
    and returns that item's result. Whatever waits when a commit finishes goes
    into the next one, so under load each commit serves many callers and alone
    it serves one without delay.
    """

    def __init__(self, commit: Callable[[list[T]], list[R]], failed: Callable[[T, Exception], R],
                 limit: int = BATCH_LIMIT, name: str = "group-commit") -> None:
        self._commit = commit
        self._failed = failed
        self._limit = limit
        self._name = name
        self._queue: queue.Queue[tuple[T, Future] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.batches = 0
        self.items = 0

    def submit(self, item: T) -> R:
        return self.submit_async(item).result()

    def submit_async(self, item: T) -> Future:
        """`submit` without waiting: the Future holds the item's result once its batch is committed."""
        future: Future = Future()
        self._ensure_thread()
        self._queue.put((item, future))
        return future

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = take_batch(self._queue, first, self._limit)
            items = [item for item, _ in batch]
            try:
                results = self._commit(items)
            except Exception as exc:
                log.exception("group commit of %d instance(s) failed", len(items))
                results = [self._failed(item, exc) for item in items]
            self.batches += 1
            self.items += len(items)
            for (_, future), result in zip(batch, results):
                future.set_result(result)

    def close(self) -> None:
        with self._lock:
            thread = self._thread
            self._thread = None
        if thread is not None and thread.is_alive():
            self._queue.put(None)
            thread.join(timeout=30)


class IngestService:
    """Stores instances under the data directory and records them in the worklist."""

    def __init__(self, settings: Settings, database: Database, *, batch_limit: int = BATCH_LIMIT,
                 committer: "Committer | None" = None) -> None:
        self.settings = settings
        self.database = database
        #: Who commits checked instances: this process's group committer, or (in a receiving process)
        #: the listening process's, so that all receiving processes share one (processes.RemoteCommitter).
        self.committer: Committer = committer or GroupCommitter(
            self._commit_batch, self._commit_failed, limit=batch_limit)
        # One thread runs a batch's syncs beside the committer; it fans the files out to the others.
        self._fsyncs = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sync")
        self._fsyncs_inner = ThreadPoolExecutor(max_workers=FSYNC_THREADS, thread_name_prefix="fsync")

    # --- entry points -------------------------------------------------------------------------------

    def store(
        self, dataset: Dataset | None, encoded: bytes, *, calling_ae_title: str, transfer_syntax_uid: str,
        affected_sop_instance_uid: str = "", affected_sop_class_uid: str = "",
    ) -> StoreOutcome:
        """Store an instance held in memory as encoded Part 10 bytes (`dataset` is not needed)."""
        self.settings.spool_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.settings.spool_dir, prefix="mem-", suffix=".dcm")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(encoded)
        except OSError as exc:
            Path(name).unlink(missing_ok=True)
            return StoreOutcome(OUT_OF_RESOURCES, reason=f"storage error: {exc.strerror or exc}")
        return self.store_file(Path(name), calling_ae_title=calling_ae_title,
                               transfer_syntax_uid=transfer_syntax_uid,
                               affected_sop_instance_uid=affected_sop_instance_uid,
                               affected_sop_class_uid=affected_sop_class_uid)

    def store_file(
        self, path: Path, *, calling_ae_title: str, transfer_syntax_uid: str,
        affected_sop_instance_uid: str = "", affected_sop_class_uid: str = "",
        digest: tuple[str, int] | None = None,
    ) -> StoreOutcome:
        """Store the Part 10 file at `path` (in the spool directory, same file system as the
        instances): it is renamed into place on success and deleted otherwise. `digest` is the
        file's (SHA-256, size) when the caller hashed it while writing it."""
        received: Received | None = None
        try:
            outcome_or_item = self._check(path, calling_ae_title, transfer_syntax_uid,
                                          affected_sop_instance_uid, affected_sop_class_uid, digest)
            if isinstance(outcome_or_item, StoreOutcome):
                return outcome_or_item
            received = outcome_or_item
            outcome = self.committer.submit(received)
        finally:
            # Whoever committed renamed the file into place when it was stored; otherwise it goes.
            path.unlink(missing_ok=True)
        if outcome.status == SUCCESS and not outcome.duplicate:
            log.info("stored SOP %s (study %s, id %s) from %s", received.sop_instance_uid,
                     received.study_instance_uid, outcome.study_id, calling_ae_title)
        return outcome

    def close(self) -> None:
        self.committer.close()
        self._fsyncs.shutdown(wait=True)
        self._fsyncs_inner.shutdown(wait=True)

    # --- in the association's thread: check the file, fsync its data --------------------------------

    def _check(
        self, path: Path, calling_ae_title: str, transfer_syntax_uid: str, affected_sop_instance_uid: str,
        affected_sop_class_uid: str, digest: tuple[str, int] | None = None,
    ) -> StoreOutcome | Received:
        try:
            header = read_header(path)
            ds = header[0]
            study_uid = str(ds.get("StudyInstanceUID", "") or "")
            series_uid = str(ds.get("SeriesInstanceUID", "") or "")
            sop_uid = str(ds.get("SOPInstanceUID", "") or "")
            sop_class = str(ds.get("SOPClassUID", "") or "")
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
            problem = pixel_data_problem_in_file(path, transfer_syntax_uid, header=header)
        except Exception as exc:  # an element that cannot be decoded
            problem = f"pixel data attributes cannot be read: {type(exc).__name__}: {exc}"
        if problem:
            return self._refuse(CANNOT_UNDERSTAND, problem, calling_ae_title, sop_uid, study_uid)
        try:
            attributes = {
                "accession_number": _text(ds, "AccessionNumber", 64),
                "patient_id": _text(ds, "PatientID", 64),
                "patient_name": _text(ds, "PatientName", 324),
                "study_date": _text(ds, "StudyDate", 8),
                "study_description": _text(ds, "StudyDescription", 64),
            }
            modality = _text(ds, "Modality", 16)
        except Exception as exc:
            return self._refuse(CANNOT_UNDERSTAND, f"study attributes cannot be read: {exc}",
                                calling_ae_title, sop_uid, study_uid)
        try:
            sha256, size = digest if digest is not None else _sha256_file(path)
        except OSError as exc:
            log.error("C-STORE of SOP %s could not be spooled: %s", sop_uid, exc)
            return StoreOutcome(OUT_OF_RESOURCES, reason=f"storage error: {exc.strerror or exc}")
        return Received(path, study_uid, series_uid, sop_uid, sop_class, transfer_syntax_uid, calling_ae_title,
                        size, sha256, attributes, modality)

    # --- in the committer's thread: rename, fsync directories, one transaction ------------------------

    def _commit_failed(self, item: Received, exc: Exception) -> StoreOutcome:
        reason = f"storage error: {exc.strerror or exc}" if isinstance(exc, OSError) else "storage failed; try again later"
        return StoreOutcome(OUT_OF_RESOURCES, reason=reason)

    def _commit_batch(self, items: list[Received]) -> list[StoreOutcome]:
        for attempt in range(COMMIT_ATTEMPTS):
            try:
                return self._commit(items)
            except (IntegrityError, OperationalError) as exc:
                if attempt == COMMIT_ATTEMPTS - 1:
                    raise
                log.info("commit of %d instance(s) raced another writer (%s); retrying",
                         len(items), type(exc).__name__)
                time.sleep(0.01 * (attempt + 1))
        raise AssertionError("unreachable")

    def _commit(self, items: list[Received]) -> list[StoreOutcome]:
        now = datetime.now(timezone.utc)
        outcomes: list[StoreOutcome] = []
        placed: list[Received] = []
        new_directories: set[Path] = set()
        refused: list[Received] = []
        with self.database.session() as session:
            sop_uids = {item.sop_instance_uid for item in items}
            study_uids = {item.study_instance_uid for item in items}
            stored: dict[str, tuple[Instance, str]] = {
                instance.sop_instance_uid: (instance, study_uid)
                for instance, study_uid in session.execute(
                    select(Instance, Study.study_instance_uid)
                    .join(Study, Instance.study_id == Study.id)
                    .where(Instance.sop_instance_uid.in_(sop_uids))
                ).all()
            }
            studies: dict[str, Study] = {
                study.study_instance_uid: study
                for study in session.scalars(select(Study).where(
                    Study.study_instance_uid.in_(study_uids | {uid for _, uid in stored.values()})))
            }
            decisions: list[str] = []
            seen: dict[str, tuple[str, str]] = {uid: (study_uid, instance.sha256)
                                                for uid, (instance, study_uid) in stored.items()}
            for item in items:
                known = seen.get(item.sop_instance_uid)
                if known is not None and known[0] != item.study_instance_uid:
                    decisions.append("other-study")
                elif known is not None and known[1] == item.sha256:
                    decisions.append("duplicate")
                else:
                    decisions.append("store")
                    seen[item.sop_instance_uid] = (item.study_instance_uid, item.sha256)
                    relpath = instance_relpath(item.study_instance_uid, item.sop_instance_uid)
                    self._place(item, relpath, new_directories)
                    placed.append(item)
            # Data and names to disk while the rows are written; the commit waits for both.
            synced = self._fsyncs.submit(self._sync, [item.final_path for item in placed if item.final_path],
                                         new_directories)
            try:
                new_rows: list[dict] = []
                for item, decision in zip(items, decisions):
                    outcomes.append(self._record(session, studies, stored, item, decision, now, refused, new_rows))
                if new_rows:
                    session.execute(insert(Instance), new_rows)
                session.flush()
            finally:
                synced.result()
        for item in refused:
            # Renamed by an earlier attempt of this batch: the file is at a path no row names.
            if item.final_path is not None:
                item.final_path.unlink(missing_ok=True)
                item.final_path = None
            if item.stored_key is not None:
                self.settings.storage.instances.delete(item.stored_key)
                item.stored_key = None
        return outcomes

    def _sync(self, files: list[Path], new_directories: set[Path]) -> None:
        """fsync the renamed files (in parallel), then their directories (and the parents of new ones)."""
        if len(files) > 1:
            list(self._fsyncs_inner.map(_fsync_path, files))
        elif files:
            _fsync_path(files[0])
        for directory in sorted(new_directories):
            _fsync_path(directory.parent, directory=True)
        for directory in sorted({path.parent for path in files}):
            _fsync_path(directory, directory=True)

    def _record(self, session, studies: dict[str, Study], stored: dict[str, tuple[Instance, str]],
                item: Received, decision: str, now: datetime, refused: list[Received],
                new_rows: list[dict]) -> StoreOutcome:
        existing = stored.get(item.sop_instance_uid)
        if decision == "other-study":
            # Never re-bind an instance to another study (another patient, perhaps):
            # the sender has reused a UID. The stored study keeps its instance.
            owner = existing[1] if existing is not None else "?"
            reason = f"SOP Instance UID already stored in study {owner}; refused for study {item.study_instance_uid}"
            self._audit_refusal(session, DUPLICATE_SOP_INSTANCE, reason, item.calling_ae_title,
                                item.sop_instance_uid, studies.get(owner),
                                claimed_study_instance_uid=item.study_instance_uid)
            refused.append(item)
            return StoreOutcome(DUPLICATE_SOP_INSTANCE, reason=reason)
        study = studies.get(item.study_instance_uid)
        if decision == "duplicate":
            audit.record(session, actor=ACTOR, action=AuditAction.INSTANCE_DUPLICATE, study=study,
                         sop_instance_uid=item.sop_instance_uid, calling_ae_title=item.calling_ae_title)
            log.info("duplicate SOP %s (study %s) from %s: already stored, unchanged",
                     item.sop_instance_uid, item.study_instance_uid, item.calling_ae_title)
            return StoreOutcome(SUCCESS, study_id=study.id if study else None, duplicate=True)
        study = self._study_for(session, studies, item, now)
        values = dict(
            series_instance_uid=item.series_instance_uid, sop_class_uid=item.sop_class_uid,
            transfer_syntax_uid=item.transfer_syntax_uid, modality=item.modality,
            path=instance_relpath(item.study_instance_uid, item.sop_instance_uid), size_bytes=item.size,
            sha256=item.sha256, calling_ae_title=item.calling_ae_title[:16], received_at=now, eligible=None,
            eligibility_reason="",
        )
        instance = existing[0] if existing is not None else None
        if instance is None:
            # New rows go in one INSERT for the batch (`_commit`), not through the ORM unit of work.
            row = dict(values, sop_instance_uid=item.sop_instance_uid, study_id=study.id)
            new_rows.append(row)
            stored[item.sop_instance_uid] = (row, item.study_instance_uid)  # type: ignore[assignment]
        elif isinstance(instance, dict):  # new in this very batch, and changed again
            instance.update(values)
        else:
            for name, value in values.items():
                setattr(instance, name, value)
        audit.record(session, actor=ACTOR, action=AuditAction.INSTANCE_RECEIVED, study=study,
                     sop_instance_uid=item.sop_instance_uid, series_instance_uid=item.series_instance_uid,
                     calling_ae_title=item.calling_ae_title, size_bytes=item.size)
        return StoreOutcome(SUCCESS, study_id=study.id)

    def _place(self, item: Received, relpath: str, new_directories: set[Path]) -> None:
        if item.final_path is not None or item.stored_key is not None:
            return  # placed by an earlier attempt of this batch
        store = self.settings.storage.instances
        if not isinstance(store, LocalStore):
            # An object store: the upload is durable when it returns (before the row commits).
            with open(item.spool_path, "rb") as spooled:
                store.write(relpath, lambda handle: shutil.copyfileobj(spooled, handle, 1 << 20))
            item.spool_path.unlink(missing_ok=True)
            item.stored_key = relpath
            return
        final = store.path(relpath)
        if not final.parent.is_dir():
            final.parent.mkdir(parents=True, exist_ok=True)
            new_directories.add(final.parent)
        os.replace(item.spool_path, final)
        item.final_path = final

    def _study_for(self, session, studies: dict[str, Study], item: Received, now: datetime) -> Study:
        study = studies.get(item.study_instance_uid)
        if study is None:
            study = Study(study_instance_uid=item.study_instance_uid, status=str(StudyStatus.RECEIVING),
                          received_at=now, last_instance_at=now, **item.study_attributes)
            session.add(study)
            session.flush()
            studies[item.study_instance_uid] = study
            audit.record(session, actor=ACTOR, action=AuditAction.STATUS_CHANGED, study=study,
                         previous=None, status=str(StudyStatus.RECEIVING), reason="first instance")
            return study
        study.last_instance_at = now
        if study.status != StudyStatus.RECEIVING:
            # New or changed instances after READY/PROCESSING/DONE: the study is
            # processed again once quiet; deterministic result UIDs replace old results.
            audit.set_status(session, study, StudyStatus.RECEIVING, actor=ACTOR,
                             reason=f"new instance after {study.status}")
        return study

    # --- refusals -------------------------------------------------------------------------------------

    def _audit_refusal(self, session, status: int, reason: str, calling_ae_title: str, sop_instance_uid: str,
                       study: Study | None, **detail: str) -> None:
        log.warning("C-STORE refused with 0x%04X from %s (SOP %s): %s",
                    status, calling_ae_title, sop_instance_uid or "?", reason)
        audit.record(session, actor=ACTOR, action=AuditAction.INSTANCE_REJECTED, study=study,
                     status=f"0x{status:04X}", reason=reason, calling_ae_title=calling_ae_title,
                     sop_instance_uid=sop_instance_uid if is_valid_uid(sop_instance_uid) else "", **detail)

    def _refuse(
        self, status: int, reason: str, calling_ae_title: str, sop_instance_uid: str = "",
        study_instance_uid: str = "", **detail: str,
    ) -> StoreOutcome:
        """Answer a failure status: a log line and an audit event, both without patient data."""
        try:
            with self.database.session() as session:
                study = None
                if study_instance_uid and is_valid_uid(study_instance_uid):
                    study = session.scalar(select(Study).where(Study.study_instance_uid == study_instance_uid))
                self._audit_refusal(session, status, reason, calling_ae_title, sop_instance_uid, study, **detail)
        except Exception:  # the refusal stands even when the audit cannot be written
            log.exception("audit of a refused C-STORE could not be written")
        return StoreOutcome(status, reason=reason)
