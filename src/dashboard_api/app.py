"""The FastAPI app factory (the composition root of the API service is the CLI)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from triage_core.db import Database
from triage_core.priority import WorklistPolicy
from triage_core.settings import Settings

from . import page
from .auth import Authenticator
from .routes import api_router

log = logging.getLogger(__name__)

TITLE = "CXR Triage API"
DESCRIPTION = (
    "Worklist, study results (TID 1500 SR, heatmaps, Parametric Maps), DICOMweb (QIDO-RS, WADO-RS) and the "
    "audit trail of the CXR Triage service. Every route but `/health` needs `Authorization: Bearer <API key or "
    "OpenID Connect token>`; roles: radiologist (worklist, studies, results, DICOMweb), auditor (audit trail), "
    "admin (both, and users). Every read of study data is audited with the authenticated caller as its actor. "
    "Not for diagnostic use."
)


def package_version() -> str:
    try:
        return version("cxr-triage")
    except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0+unknown"


def _location(loc: Sequence[Any]) -> str:
    if not loc:
        return "request"
    where, *rest = loc
    name = ".".join(str(part) for part in rest)
    if where in {"query", "path", "header", "cookie"}:
        return f"{where} parameter {name!r}" if name else f"{where} parameters"
    if where == "body":
        return f"body field {name!r}" if name else "body"
    return ".".join(str(part) for part in loc)


def validation_message(exc: RequestValidationError) -> str:
    """One readable line per problem, e.g. ``query parameter 'limit': Input should be ...``."""
    messages = []
    for error in exc.errors():
        text = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
        messages.append(f"{_location(error.get('loc', ()))}: {text}")
    return "; ".join(messages) or "invalid request"


async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(
        {
            "detail": validation_message(exc),
            # Structured form for programs; without the rejected input, which may carry PHI.
            "errors": [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in exc.errors()],
        },
        status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
    )


async def _unhandled_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"detail": "internal server error"}, status_code=status.HTTP_500_INTERNAL_SERVER_ERROR)


def create_app(
    settings: Settings | None = None, database: Database | None = None, authenticator: Authenticator | None = None
) -> FastAPI:
    """Build the API. Without ``database`` it opens one from ``settings`` and disposes of it at shutdown.

    The schema is not created here: migrations (``cxr-triage db upgrade``) run before start.
    """
    settings = settings if settings is not None else Settings()
    owns_database = database is None
    database = database if database is not None else Database(settings.database_url)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            if owns_database:
                database.dispose()

    # Swagger UI and ReDoc come from the package (page.py), never from a CDN.
    app = FastAPI(title=TITLE, version=package_version(), description=DESCRIPTION, lifespan=lifespan, docs_url=None,
                  redoc_url=None)
    app.state.settings = settings
    app.state.database = database
    app.state.worklist_policy = WorklistPolicy.from_settings(settings)
    app.state.authenticator = authenticator if authenticator is not None else Authenticator(settings, database)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unhandled_error)
    app.include_router(api_router)
    app.include_router(page.router)
    page.mount_static(app)
    return app
