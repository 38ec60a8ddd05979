"""User management (administrators): the API keys of people and programs."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Depends, HTTPException, Path, status

from triage_core import users

from ..auth import AdminDep, operate
from ..deps import SessionDep
from ..schemas import UserCreate, UserCreated, UserPublic, UsersPublic, error_response

router = APIRouter(prefix="/users", tags=["users"], dependencies=[Depends(operate)])

_NAME = Path(description="User name", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


@router.get("", response_model=UsersPublic)
def list_users(session: SessionDep, principal: AdminDep) -> UsersPublic:
    """Every user, revoked ones included (they stay as the actors of their audit events)."""
    rows = users.list_users(session)
    return UsersPublic(data=[UserPublic.model_validate(u) for u in rows], count=len(rows))


@router.post("", response_model=UserCreated, status_code=status.HTTP_201_CREATED,
             responses={status.HTTP_409_CONFLICT: error_response("The name is taken")})
def create_user(session: SessionDep, principal: AdminDep, body: Annotated[UserCreate, Body()]) -> UserCreated:
    """Create a user and answer its API key once (as ``cxr-triage user add`` prints it)."""
    try:
        new = users.create_user(session, name=body.name, role=body.role, actor=principal.name)
    except users.UserError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    return UserCreated(**UserPublic.model_validate(new.user).model_dump(), api_key=new.key)


@router.post("/{name}/revoke", response_model=UserPublic,
             responses={status.HTTP_404_NOT_FOUND: error_response("No such user")})
def revoke_user(session: SessionDep, principal: AdminDep, name: Annotated[str, _NAME]) -> UserPublic:
    """Revoke a user's key at once; the user stays listed (revoking twice changes nothing)."""
    try:
        user = users.revoke_user(session, name=name, actor=principal.name)
    except users.UserError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    return UserPublic.model_validate(user)
