"""The radiologist's worklist: studies in priority order (triage_core.priority), ordered and paged in SQL."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated

from fastapi import APIRouter, Depends, Query

from triage_core import audit
from triage_core.states import AuditAction

from .. import crud
from ..auth import ReaderDep, read_studies
from ..deps import PolicyDep, SessionDep
from ..schemas import WorklistItemPublic, WorklistPublic, WorklistQuery, disclaimer
from .views import export_summary, policy_public, study_fields

router = APIRouter(tags=["worklist"], dependencies=[Depends(read_studies)])


@router.get("/worklist", response_model=WorklistPublic)
def read_worklist(session: SessionDep, principal: ReaderDep, policy: PolicyDep,
                  query: Annotated[WorklistQuery, Query()]) -> WorklistPublic:
    """Studies waiting to be read by level (highest first, age raising a waiting study one level per wait),
    then longest waiting first; then read studies, most recently read first.

    Each item's ``priority`` says why it stands where it does. SKIPPED and FAILED studies are listed
    (as "not analysed") with their reason: nothing is dropped silently.
    """
    now = datetime.now(timezone.utc)
    page = crud.list_worklist(session=session, policy=policy, now=now, statuses=query.status,
                              finding=query.finding, received_from=query.received_from,
                              received_to=query.received_to, read=query.read, limit=query.limit,
                              offset=query.offset)
    ids = [s.id for s in page.studies]
    top = crud.top_findings(session=session, study_ids=ids)
    exports = crud.export_counts(session=session, study_ids=ids)
    items = [
        WorklistItemPublic.model_validate(
            {
                **study_fields(study, now=now, policy=policy),
                "top_findings": top.get(study.id, []),
                "export": export_summary(exports.get(study.id, crud.ExportCounts())),
            }
        )
        for study in page.studies
    ]
    audit.record(
        session,
        actor=principal.name,
        client_address=principal.client_address,
        action=AuditAction.READ_WORKLIST,
        filter=query.model_dump(mode="json", exclude_defaults=True),
        status=[str(s) for s in query.status],
        limit=query.limit,
        offset=query.offset,
        study_instance_uids=[s.study_instance_uid for s in page.studies],
    )
    return WorklistPublic(
        data=items, count=page.count, count_exact=page.count_exact, as_of=now, policy=policy_public(policy),
        disclaimer=disclaimer(demo=any(s.model_demo for s in page.studies)),
    )
