"""Export operations (administrators): send a study's results to PACS again, or every export that gave up."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Depends, HTTPException, status

from triage_core import work

from ..auth import AdminDep, operate
from ..deps import SessionDep
from ..schemas import ExportRetried, ExportRetry, ExportRetryStudy, ExportsRetried, error_response

router = APIRouter(prefix="/exports", tags=["exports"], dependencies=[Depends(operate)])


@router.post("/retry", response_model=ExportsRetried,
             responses={status.HTTP_404_NOT_FOUND: error_response("No export matched")})
def retry_exports(session: SessionDep, principal: AdminDep, body: Annotated[ExportRetry, Body()]) -> ExportsRetried:
    """As ``cxr-triage export retry``: the exports of one study (any status), or every EXPORT_FAILED
    one, become pending and due now, each audited with the caller as actor. The node's sweeper
    publishes them within its interval (CXR_TRIAGE_SWEEP_INTERVAL_SECONDS)."""
    if isinstance(body, ExportRetryStudy):
        exports = work.request_export_retry(session, actor=principal.name, study_instance_uid=body.study_instance_uid)
    else:
        exports = work.request_export_retry(session, actor=principal.name, failed=True)
    if not exports:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no export matched")
    data = [ExportRetried(study_instance_uid=e.study.study_instance_uid, destination=e.destination,
                          status=e.status) for e in exports]
    return ExportsRetried(data=data, count=len(data))
