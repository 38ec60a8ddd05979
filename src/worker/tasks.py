"""Celery tasks: serialisation and retries only; the work is in pipeline.py and export.py."""

from __future__ import annotations

import logging
from typing import Callable

from celery import Celery

from dicom_node.scu import ExportError
from triage_core.db import Database
from triage_core.settings import Settings

from .celery_app import EXPORT_RESULTS, PROCESS_STUDY, QUEUE
from .export import export_once
from .pipeline import Pipeline

log = logging.getLogger(__name__)


def register_tasks(app: Celery, settings: Settings, database: Database, model_loader: Callable[[], object]) -> Pipeline:
    """Bind the tasks to `app` with their dependencies. Returns the pipeline (its model loads lazily)."""
    pipeline = Pipeline(settings, database, model_loader)

    @app.task(name=PROCESS_STUDY, queue=QUEUE, acks_late=True, ignore_result=True)
    def process_study(job_id: int) -> str:
        outcome = pipeline.run_job(int(job_id))
        for export_id in outcome.export_ids:
            app.send_task(EXPORT_RESULTS, args=[export_id], queue=QUEUE)
        return outcome.status

    @app.task(name=EXPORT_RESULTS, queue=QUEUE, bind=True, acks_late=True, ignore_result=True,
              max_retries=settings.export_retries)
    def export_results(self, export_id: int) -> str:
        final = self.request.retries >= settings.export_retries
        try:
            return export_once(settings, database, int(export_id), final_attempt=final)
        except ExportError as exc:
            countdown = settings.export_backoff_seconds * (2 ** self.request.retries)
            raise self.retry(exc=exc, countdown=countdown)

    return pipeline
