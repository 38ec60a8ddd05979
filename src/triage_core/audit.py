"""The audit writer: every state change and every read of study data becomes an event row."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from .models import AuditEvent, Study
from .states import AuditAction, StudyStatus

SYSTEM_ACTORS = {"node": "system:dicom_node", "worker": "system:worker"}


def record(
    session: Session,
    *,
    actor: str,
    action: AuditAction,
    study: Study | None = None,
    **detail: Any,
) -> AuditEvent:
    """Add an audit event to the session (committed with the caller's transaction)."""
    event = AuditEvent(
        actor=actor,
        action=str(action),
        study_id=study.id if study is not None else None,
        study_instance_uid=study.study_instance_uid if study is not None else "",
        detail=detail,
    )
    session.add(event)
    return event


def set_status(
    session: Session, study: Study, status: StudyStatus, *, actor: str, reason: str = ""
) -> None:
    """Change a study's status and write the transition as an event row."""
    previous = study.status
    study.status = str(status)
    study.status_reason = reason
    session.flush()
    record(
        session,
        actor=actor,
        action=AuditAction.STATUS_CHANGED,
        study=study,
        previous=previous,
        status=str(status),
        reason=reason,
    )
