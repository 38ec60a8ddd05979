"""The audit trail: who did what to which study, and when."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from triage_core import audit
from triage_core.states import AuditAction

from .. import crud
from ..deps import ActorDep, SessionDep
from ..schemas import AuditEventPublic, AuditEventsPublic, AuditQuery

router = APIRouter(tags=["audit"])


@router.get("/audit", response_model=AuditEventsPublic)
def read_audit(session: SessionDep, actor: ActorDep, query: Annotated[AuditQuery, Query()]) -> AuditEventsPublic:
    """Audit events, newest first. Reading the trail is itself recorded (after this answer's query)."""
    events, count = crud.list_audit(
        session=session,
        study_instance_uid=query.study_instance_uid,
        action=query.action,
        actor=query.actor,
        since=query.since,
        until=query.until,
        limit=query.limit,
        offset=query.offset,
    )
    data = [AuditEventPublic.model_validate(e) for e in events]
    study = (
        crud.get_study(session=session, study_instance_uid=query.study_instance_uid)
        if query.study_instance_uid
        else None
    )
    event = audit.record(
        session,
        actor=actor,
        action=AuditAction.READ_AUDIT,
        study=study,
        filter=query.model_dump(mode="json", exclude_none=True),
    )
    if study is None and query.study_instance_uid:
        event.study_instance_uid = query.study_instance_uid
    return AuditEventsPublic(data=data, count=count)
