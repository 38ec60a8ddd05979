"""Request dependencies as ``Annotated`` aliases: the session, the settings, the acting user, the study."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, HTTPException, Path, Request, status
from sqlalchemy.orm import Session

from triage_core.db import Database
from triage_core.models import Study
from triage_core.settings import Settings
from triage_core.storage import is_valid_uid

from . import crud

MAX_ACTOR_LENGTH = 128
RESERVED_ACTOR_PREFIX = "system:"


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_database(request: Request) -> Database:
    return request.app.state.database


def get_session(database: Annotated[Database, Depends(get_database)]) -> Iterator[Session]:
    """One transaction per request: commits (audit events included) before the response is sent."""
    with database.session() as session:
        yield session


def _header_text(raw: str) -> str:
    # HTTP header values arrive decoded as latin-1; accept UTF-8 user names too.
    try:
        return raw.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return raw


def get_actor(
    request: Request,
    x_user: Annotated[
        str | None,
        Header(
            alias="X-User",
            description="Who is reading (recorded in the audit trail); printable, at most 128 characters",
        ),
    ] = None,
) -> str:
    """The audit actor: the ``X-User`` header, or ``anonymous@<client host>`` without one."""
    if x_user is None:
        host = request.client.host if request.client is not None else "unknown"
        return f"anonymous@{host}"[:MAX_ACTOR_LENGTH]
    actor = _header_text(x_user).strip()
    if not actor:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "X-User header must not be empty")
    if len(actor) > MAX_ACTOR_LENGTH:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, f"X-User header is longer than {MAX_ACTOR_LENGTH} characters"
        )
    if not actor.isprintable():
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "X-User header must be printable text")
    if actor.lower().startswith(RESERVED_ACTOR_PREFIX):
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, f"X-User header must not claim a {RESERVED_ACTOR_PREFIX} actor"
        )
    return actor


def valid_study_instance_uid(
    study_instance_uid: Annotated[str, Path(description="Study Instance UID", max_length=200)],
) -> str:
    if not is_valid_uid(study_instance_uid):
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, f"{study_instance_uid!r} is not a valid Study Instance UID"
        )
    return study_instance_uid


SettingsDep = Annotated[Settings, Depends(get_settings)]
DatabaseDep = Annotated[Database, Depends(get_database)]
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
ActorDep = Annotated[str, Depends(get_actor)]
StudyInstanceUidDep = Annotated[str, Depends(valid_study_instance_uid)]


def get_study(session: SessionDep, study_instance_uid: StudyInstanceUidDep) -> Study:
    study = crud.get_study(session=session, study_instance_uid=study_instance_uid)
    if study is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"study {study_instance_uid} not found")
    return study


StudyDep = Annotated[Study, Depends(get_study)]
