"""Request dependencies as ``Annotated`` aliases: the session, the settings, the study (the caller: ``auth``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Request, status
from sqlalchemy.orm import Session

from triage_core.db import Database
from triage_core.priority import WorklistPolicy
from triage_core.models import Study
from triage_core.settings import Settings
from triage_core.storage import is_valid_uid

from . import crud
from .schemas import UID_PATTERN

# A DICOM UID (PS3.5 9.1): declared in the OpenAPI schema as UID_PATTERN; the check itself is
# ``is_valid_uid``, which answers with a readable message.


def uid_path(description: str):
    return Path(description=description, max_length=64, json_schema_extra={"pattern": UID_PATTERN})


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_policy(request: Request) -> WorklistPolicy:
    return request.app.state.worklist_policy


def get_database(request: Request) -> Database:
    return request.app.state.database


def get_session(database: Annotated[Database, Depends(get_database)]) -> Iterator[Session]:
    """One transaction per request: commits (audit events included) before the response is sent."""
    with database.session() as session:
        yield session


def valid_study_instance_uid(
    study_instance_uid: Annotated[str, uid_path("Study Instance UID")],
) -> str:
    if not is_valid_uid(study_instance_uid):
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, f"{study_instance_uid!r} is not a valid Study Instance UID"
        )
    return study_instance_uid


SettingsDep = Annotated[Settings, Depends(get_settings)]
DatabaseDep = Annotated[Database, Depends(get_database)]
PolicyDep = Annotated[WorklistPolicy, Depends(get_policy)]
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
StudyInstanceUidDep = Annotated[str, Depends(valid_study_instance_uid)]


def get_study(session: SessionDep, study_instance_uid: StudyInstanceUidDep) -> Study:
    study = crud.get_study(session=session, study_instance_uid=study_instance_uid)
    if study is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"study {study_instance_uid} not found")
    return study


StudyDep = Annotated[Study, Depends(get_study)]
