"""The audit trail: who did what to which study, and when."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from triage_core import audit, audit_chain
from triage_core.states import AuditAction

from .. import crud
from ..auth import AuditorDep, read_audit
from ..deps import SessionDep
from ..schemas import AuditEventPublic, AuditEventsPublic, AuditProblemPublic, AuditQuery, AuditVerificationPublic

router = APIRouter(tags=["audit"], dependencies=[Depends(read_audit)])


@router.get("/audit", response_model=AuditEventsPublic)
def list_audit(session: SessionDep, principal: AuditorDep, query: Annotated[AuditQuery, Query()]) -> AuditEventsPublic:
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
        actor=principal.name,
        client_address=principal.client_address,
        action=AuditAction.READ_AUDIT,
        study=study,
        filter=query.model_dump(mode="json", exclude_none=True),
    )
    if study is None and query.study_instance_uid:
        event.study_instance_uid = query.study_instance_uid
    return AuditEventsPublic(data=data, count=count)


@router.get("/audit/verify", response_model=AuditVerificationPublic)
def verify_audit(session: SessionDep, principal: AuditorDep) -> AuditVerificationPublic:
    """Walk the whole hash chain (as ``cxr-triage audit verify`` does); the check is itself recorded.

    ``intact`` is false with the first altered, removed or reordered event named in ``problem``.
    """
    result = audit_chain.verify(session)
    problem = result.problem
    audit.record(session, actor=principal.name, client_address=principal.client_address,
                 action=AuditAction.VERIFY_AUDIT, intact=result.intact, events=result.events,
                 head_seq=result.head_seq, problem=problem.kind if problem else None)
    return AuditVerificationPublic(
        intact=result.intact, events=result.events, head_seq=result.head_seq, head_hash=result.head_hash,
        problem=AuditProblemPublic(kind=problem.kind, seq=problem.seq, event_id=problem.event_id,
                                   message=problem.message) if problem else None,
    )
