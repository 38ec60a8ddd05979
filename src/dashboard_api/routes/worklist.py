"""The radiologist's worklist: studies in priority order."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from triage_core import audit
from triage_core.states import AuditAction

from .. import crud
from ..auth import ReaderDep, read_studies
from ..deps import SessionDep
from ..schemas import WorklistItemPublic, WorklistPublic, WorklistQuery, disclaimer
from .views import export_summary, study_fields

router = APIRouter(tags=["worklist"], dependencies=[Depends(read_studies)])


@router.get("/worklist", response_model=WorklistPublic)
def read_worklist(session: SessionDep, principal: ReaderDep, query: Annotated[WorklistQuery, Query()]) -> WorklistPublic:
    """Studies by priority (highest first, then oldest first), with their top findings and export state.

    SKIPPED and FAILED studies are listed with their reason: nothing is dropped silently.
    """
    studies, count = crud.list_worklist(session=session, statuses=query.status, limit=query.limit, offset=query.offset)
    ids = [s.id for s in studies]
    top = crud.top_findings(session=session, study_ids=ids)
    exports = crud.export_counts(session=session, study_ids=ids)
    items = [
        WorklistItemPublic.model_validate(
            {
                **study_fields(study),
                "top_findings": top.get(study.id, []),
                "export": export_summary(exports.get(study.id, crud.ExportCounts())),
            }
        )
        for study in studies
    ]
    audit.record(
        session,
        actor=principal.name,
        client_address=principal.client_address,
        action=AuditAction.READ_WORKLIST,
        status=[str(s) for s in query.status],
        limit=query.limit,
        offset=query.offset,
        study_instance_uids=[s.study_instance_uid for s in studies],
    )
    return WorklistPublic(
        data=items, count=count, disclaimer=disclaimer(demo=any(s.model_demo for s in studies))
    )
