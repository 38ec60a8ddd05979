"""Send a study's result objects to one destination and record the outcome."""

from __future__ import annotations

import logging

from pathlib import Path

from sqlalchemy import select

from dicom_node.scu import ExportError, send_files
from triage_core import audit
from triage_core.db import Database
from triage_core.models import Export, ResultObject
from triage_core.settings import Destination, Settings
from triage_core.states import AuditAction, ExportStatus


log = logging.getLogger(__name__)
ACTOR = audit.SYSTEM_ACTORS["worker"]


def export_once(settings: Settings, database: Database, export_id: int, *, final_attempt: bool) -> str:
    """One attempt. Returns the new status; raises ExportError when a retry should follow."""
    with database.session() as session:
        export = session.get(Export, export_id)
        if export is None:
            log.info("export %s is gone: nothing to do", export_id)
            return "GONE"
        if export.status == ExportStatus.EXPORTED:
            return export.status
        destination = Destination.parse(export.destination)
        study_id = export.study_id
    paths = result_paths(settings, database, study_id)
    error = ""
    try:
        if not paths:
            raise ExportError("no result objects to export")
        send_files(destination, paths, calling_ae_title=settings.ae_title, settings=settings)
        status = ExportStatus.EXPORTED
    except (ExportError, OSError) as exc:
        error = str(exc)
        status = ExportStatus.EXPORT_FAILED if final_attempt else ExportStatus.EXPORT_PENDING
    with database.session() as session:
        export = session.get(Export, export_id)
        export.attempts += 1
        export.status = str(status)
        export.last_error = error
        audit.record(session, actor=ACTOR, action=AuditAction.EXPORT_STATUS, study=export.study,
                     destination=export.destination, status=str(status), attempt=export.attempts, error=error)
    log.info("export %s of study id %s to %s: %s%s", export_id, study_id, destination, status,
             f" ({error})" if error else "")
    if status == ExportStatus.EXPORT_PENDING:
        raise ExportError(error)
    return str(status)


def result_paths(settings: Settings, database: Database, study_id: int) -> list[Path]:
    """The files of the study's current result objects (never superseded ones)."""
    with database.session() as session:
        rows = session.scalars(
            select(ResultObject)
            .where(ResultObject.study_id == study_id, ResultObject.superseded_at.is_(None))
            .order_by(ResultObject.id)
        ).all()
        return [settings.results_dir / row.path for row in rows]
