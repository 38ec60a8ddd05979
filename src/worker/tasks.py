"""Celery tasks: serialisation only; the work is in pipeline.py and export.py, the rules in triage_core.work.

Both tasks are idempotent: they claim their row in SQL first, so a duplicate, late or redelivered
message does nothing. Retries are not Celery's: a failed export is rescheduled in SQL
(`next_attempt_at`) and the node's sweeper publishes it when it is due, so that a restart or a
PACS that is down for hours loses nothing.
"""

from __future__ import annotations

import logging
from typing import Callable

from celery import Celery

from sqlalchemy import select

from triage_core import metrics, work
from triage_core.db import Database
from triage_core.models import Job, ResultObject, Study
from triage_core.settings import Settings
from triage_core.states import ExportStatus, ResultKind, StudyStatus

from .celery_app import EXPORT_RESULTS, PROCESS_STUDY, QUEUE, Publisher
from .export import export_once
from .pipeline import Pipeline

log = logging.getLogger(__name__)


def register_tasks(app: Celery, settings: Settings, database: Database, model_loader: Callable[[], object]) -> Pipeline:
    """Bind the tasks to `app` with their dependencies. Returns the pipeline (its model loads lazily)."""
    pipeline = Pipeline(settings, database, model_loader)
    publisher = Publisher(app)

    @app.task(name=PROCESS_STUDY, queue=QUEUE, acks_late=True, ignore_result=True)
    def process_study(job_id: int) -> str:
        outcome = pipeline.run_job(int(job_id))
        metrics.worker().jobs_finished.labels(outcome.status).inc()
        if outcome.status == StudyStatus.DONE:
            observe_cstore_to_sr(database, int(job_id))
        publish_exports(database, publisher, outcome.export_ids)
        return outcome.status

    @app.task(name=EXPORT_RESULTS, queue=QUEUE, acks_late=True, ignore_result=True)
    def export_results(export_id: int) -> str:
        status = export_once(settings, database, int(export_id))
        if status == ExportStatus.EXPORTED:
            metrics.worker().export_attempts.labels("success").inc()
        elif status in (ExportStatus.EXPORT_PENDING, ExportStatus.EXPORT_FAILED):
            metrics.worker().export_attempts.labels("failure").inc()
        return status

    return pipeline


def publish_exports(database: Database, publisher: Publisher, export_ids: tuple[int, ...] | list[int]) -> None:
    """Wake-ups for the study's exports, right after their rows committed. One that cannot be sent
    (the broker is away) is left unpublished in SQL, and the sweeper sends it."""
    sent = []
    for export_id in export_ids:
        try:
            publisher.export(export_id)
        except Exception as exc:
            log.warning("publishing export %s failed; the sweeper will: %s", export_id, exc)
            break
        sent.append(export_id)
    if sent:
        with database.session() as session:
            work.mark_published(session, export_ids=sent)


def observe_cstore_to_sr(database: Database, job_id: int) -> None:
    """cxr_triage_cstore_to_sr_seconds: from the study's last received instance to its SR stored."""
    try:
        with database.session() as session:
            row = session.execute(
                select(Study.last_instance_at, ResultObject.created_at)
                .join(Job, Job.study_id == Study.id)
                .join(ResultObject, ResultObject.study_id == Study.id)
                .where(Job.id == job_id, ResultObject.kind == str(ResultKind.SR), ResultObject.superseded_at.is_(None))
                .order_by(ResultObject.created_at.desc()).limit(1)
            ).first()
    except Exception:  # a metric never fails a job
        log.warning("C-STORE-to-SR latency of job %s not recorded", job_id, exc_info=True)
        return
    if row is not None and row[0] is not None and row[1] is not None:
        metrics.worker().cstore_to_sr_seconds.observe(max(0.0, (row[1] - row[0]).total_seconds()))
