"""Celery tasks: serialisation only; the work is in pipeline.py and export.py, the rules in triage_core.work.

Both tasks are idempotent: they claim their row in SQL first, so a duplicate, late or redelivered
message does nothing. Retries are not Celery's: a failed export is rescheduled in SQL
(`next_attempt_at`) and the node's sweeper publishes it when it is due, so that a restart or a
PACS that is down for hours loses nothing.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
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

    exporter = InlineExporter(settings, database, publisher)

    @app.task(name=PROCESS_STUDY, queue=QUEUE, acks_late=True, ignore_result=True)
    def process_study(job_id: int) -> str:
        outcomes = pipeline.run_jobs(int(job_id))
        for outcome in outcomes:
            metrics.worker().jobs_finished.labels(outcome.status).inc()
            if outcome.status == StudyStatus.DONE and outcome.job_id:
                observe_cstore_to_sr(database, outcome.job_id)
        exporter.submit([export_id for outcome in outcomes for export_id in outcome.export_ids])
        return outcomes[0].status

    @app.task(name=EXPORT_RESULTS, queue=QUEUE, acks_late=True, ignore_result=True)
    def export_results(export_id: int) -> str:
        return export_counted(settings, database, int(export_id))

    return pipeline


class InlineExporter:
    """The first attempt of a study's exports, right after its job, in a thread of the model process
    (no queue hop, and the process goes on to its next study meanwhile). An export that fails is
    rescheduled in SQL and the sweeper publishes its next attempt; one this thread could not take
    (the process died first) is published by the sweeper after CXR_TRIAGE_REQUEUE_AFTER_SECONDS.
    With CXR_TRIAGE_EXPORT_INLINE=false every export goes through the queue."""

    def __init__(self, settings: Settings, database: Database, publisher: Publisher) -> None:
        self.settings, self.database, self.publisher = settings, database, publisher
        self._pool: ThreadPoolExecutor | None = None

    def submit(self, export_ids: list[int]) -> None:
        if not export_ids:
            return
        if not self.settings.export_inline:
            publish_exports(self.database, self.publisher, export_ids)
            return
        with self.database.session() as session:  # in flight: the sweeper leaves them to us
            work.mark_published(session, export_ids=export_ids)
        if self._pool is None:  # made in the process that uses it (prefork children fork first)
            self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="export")
        for export_id in export_ids:
            self._pool.submit(self._run, export_id)

    def _run(self, export_id: int) -> None:
        try:
            export_counted(self.settings, self.database, export_id)
        except Exception:  # rescheduled or taken back by the sweeper: nothing is lost
            log.exception("inline export %s failed; the sweeper will take it up", export_id)


def export_counted(settings: Settings, database: Database, export_id: int) -> str:
    """One export attempt, queued or inline, counted in cxr_triage_export_attempts_total."""
    status = export_once(settings, database, export_id)
    if status == ExportStatus.EXPORTED:
        metrics.worker().export_attempts.labels("success").inc()
    elif status in (ExportStatus.EXPORT_PENDING, ExportStatus.EXPORT_FAILED):
        metrics.worker().export_attempts.labels("failure").inc()
    return status


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
