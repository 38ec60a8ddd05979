"""Send a study's result objects to one destination and record the outcome."""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack

from sqlalchemy import select

from dicom_node.scu import ExportError, send_files
from triage_core import audit, work
from triage_core.db import Database
from triage_core.models import Export, ResultObject
from triage_core.settings import Destination, Settings
from triage_core.states import AuditAction, ExportStatus
from triage_core.work import WorkPolicy

from .leases import LeaseKeeper


log = logging.getLogger(__name__)
ACTOR = audit.SYSTEM_ACTORS["worker"]


def export_once(settings: Settings, database: Database, export_id: int, *, now=None) -> str:
    """One attempt, if the export is due and nobody else holds it. Returns its status afterwards:
    EXPORTED, EXPORT_PENDING (rescheduled with backoff) or EXPORT_FAILED (given up), or why nothing
    was done (GONE, NOT_DUE, HELD)."""
    policy = WorkPolicy.from_settings(settings)
    holder = work.holder_id()
    with database.session() as session:
        export = work.claim_export(session, export_id, holder, policy, now)
        if export is None:
            existing = session.get(Export, export_id)
            if existing is None:
                log.info("export %s is gone: nothing to do", export_id)
                return "GONE"
            if existing.status != ExportStatus.EXPORT_PENDING:
                return existing.status
            return "HELD" if existing.locked_until is not None else "NOT_DUE"
        destination = Destination.parse(export.destination)
        study_id = export.study_id
    keys = result_keys(database, study_id)
    error = ""
    renew = lambda session: work.renew_export(session, export_id, holder, policy)  # noqa: E731
    started = time.perf_counter()
    with LeaseKeeper(database, renew, policy, f"export {export_id}"):
        try:
            if not keys:
                raise ExportError("no result objects to export")
            with ExitStack() as files:  # the files themselves, or local copies from an object store
                paths = [files.enter_context(settings.storage.results.local_path(key)) for key in keys]
                send_files(destination, paths, calling_ae_title=settings.ae_title, settings=settings)
        except (ExportError, OSError) as exc:
            error = str(exc) or type(exc).__name__
    sent_ms = 1000 * (time.perf_counter() - started)
    with database.session() as session:
        export = session.get(Export, export_id, with_for_update=True, populate_existing=True)
        if export is None or export.locked_by != holder or export.status != ExportStatus.EXPORT_PENDING:
            log.warning("export %s: its lease was taken back while it ran; leaving it to its new holder", export_id)
            return "HELD"
        if error:
            work.export_failed(export, error, policy, now)
        else:
            work.export_succeeded(export, now)
        audit.record(session, actor=ACTOR, action=AuditAction.EXPORT_STATUS, study=export.study,
                     destination=export.destination, status=export.status, attempt=export.attempts, error=error,
                     next_attempt_at=export.next_attempt_at.isoformat() if export.next_attempt_at else None)
        status, next_attempt = export.status, export.next_attempt_at
    log.info("export %s of study id %s to %s: %s%s%s", export_id, study_id, destination, status,
             f" ({error})" if error else "",
             f"; next attempt at {next_attempt:%H:%M:%S}" if status == ExportStatus.EXPORT_PENDING else "")
    log.info("export %s stages ms: send=%.1f objects=%d", export_id, sent_ms, len(keys))
    return str(status)


def result_keys(database: Database, study_id: int) -> list[str]:
    """The storage keys of the study's current result objects (never superseded ones)."""
    with database.session() as session:
        rows = session.scalars(
            select(ResultObject)
            .where(ResultObject.study_id == study_id, ResultObject.superseded_at.is_(None))
            .order_by(ResultObject.id)
        ).all()
        return [row.path for row in rows]
