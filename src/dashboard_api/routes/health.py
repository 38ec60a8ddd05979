"""Liveness and database health."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request, status
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError

from .. import crud
from ..deps import DatabaseDep
from ..schemas import HealthPublic, ModelInfo

log = logging.getLogger(__name__)

router = APIRouter(tags=["health"])


def _error_text(exc: Exception) -> str:
    # The first line only: driver messages can run on with SQL and hints.
    original = getattr(exc, "orig", None) or exc
    message = str(original).strip().splitlines()
    return f"{type(original).__name__}: {message[0] if message else 'error'}"


@router.get(
    "/health",
    response_model=HealthPublic,
    responses={status.HTTP_503_SERVICE_UNAVAILABLE: {"model": HealthPublic, "description": "Database unreachable"}},
)
def health(request: Request, database: DatabaseDep) -> HealthPublic | JSONResponse:
    """``ok`` when the database answers ``SELECT 1``; 503 with the error text when it does not."""
    version = request.app.version
    try:
        with database.session() as session:
            crud.ping(session=session)
            model = crud.latest_model(session=session)
    except (SQLAlchemyError, OSError) as exc:
        log.warning("health check: database error: %s", _error_text(exc))
        body = HealthPublic(status="error", database=_error_text(exc), version=version)
        return JSONResponse(body.model_dump(mode="json"), status_code=status.HTTP_503_SERVICE_UNAVAILABLE)
    return HealthPublic(
        status="ok",
        database="ok",
        version=version,
        model=ModelInfo(name=model[0], version=model[1], demo=model[2]) if model else None,
    )
