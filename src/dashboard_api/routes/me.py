"""Who the caller is: what the worklist page asks after logging in (any role may ask)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from triage_core.states import Permission

from ..auth import Principal, authenticate
from ..schemas import PrincipalPublic

router = APIRouter(tags=["session"], dependencies=[Depends(authenticate)])


@router.get("/me", response_model=PrincipalPublic)
def read_me(principal: Annotated[Principal, Depends(authenticate)]) -> PrincipalPublic:
    """The authenticated principal's name (as the audit trail names it), roles and permissions.
    Reads no study data, so it is not an audit event."""
    return PrincipalPublic(name=principal.name, roles=sorted(principal.roles), method=principal.method,
                           permissions=sorted(p.value for p in Permission if principal.may(p)))
