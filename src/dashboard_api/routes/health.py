"""Health without credentials and without patient data: ``/health`` (database and the last model,
kept for existing callers), ``/health/live``, ``/health/ready`` (triage_core.health) and ``/metrics``."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request, status
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4 as CONTENT_TYPE
from sqlalchemy.exc import SQLAlchemyError

from triage_core import health as checks
from triage_core.metrics import DatabaseCollector, DiskCollector

from .. import crud
from ..deps import DatabaseDep, SettingsDep
from ..schemas import CheckPublic, HealthPublic, LivePublic, ModelInfo, ReadinessPublic

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


@router.get("/health/live", response_model=LivePublic)
def live(request: Request) -> LivePublic:
    """The API process answers (for a liveness probe: restart it when this fails). Checks nothing else."""
    return LivePublic(status="alive", version=request.app.version)


@router.get(
    "/health/ready",
    response_model=ReadinessPublic,
    responses={status.HTTP_503_SERVICE_UNAVAILABLE: {"model": ReadinessPublic,
                                                     "description": "A check failed: not ready"}},
)
def ready(request: Request, database: DatabaseDep, settings: SettingsDep) -> ReadinessPublic | JSONResponse:
    """Whether the service can do its work: database, broker, at least one model worker with its model
    loaded, at least one DICOM node, free disk above the watermark, export backlog. 200 when ready or
    degraded (a person should look: exports waiting or given up), 503 when a check fails."""
    result = checks.readiness(settings, database)
    body = ReadinessPublic(status=result.status, version=request.app.version,
                           checks=[CheckPublic(name=c.name, status=c.status, detail=c.detail, data=c.data)
                                   for c in result.checks])
    if not result.ready:
        failed = [f"{c.name}: {c.detail}" for c in result.checks if c.status == "fail"]
        log.warning("readiness: not ready (%s)", "; ".join(failed))
        return JSONResponse(body.model_dump(mode="json"), status_code=status.HTTP_503_SERVICE_UNAVAILABLE)
    return body


def metrics_registry(settings, database) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(DatabaseCollector(database, settings.heartbeat_seconds))
    registry.register(DiskCollector(settings.data_dir))
    ProcessCollector(registry=registry)
    return registry


@router.get(
    "/metrics",
    response_class=Response,
    responses={status.HTTP_200_OK: {"content": {CONTENT_TYPE.split(";")[0]: {"schema": {"type": "string"}}},
                                    "description": "Prometheus text exposition format"}},
)
def metrics(request: Request) -> Response:
    """Prometheus metrics of the deployment, read from the database at each scrape (studies by state, jobs,
    queue depth, exports, live workers and nodes, stored bytes) and the data directory's disk. No patient
    data. The node and the worker serve their own counters (CXR_TRIAGE_NODE_METRICS_PORT, _WORKER_)."""
    registry = getattr(request.app.state, "metrics_registry", None)
    if registry is None:
        registry = request.app.state.metrics_registry = metrics_registry(request.app.state.settings,
                                                                         request.app.state.database)
    return Response(generate_latest(registry), media_type=CONTENT_TYPE)
