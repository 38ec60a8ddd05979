"""The Celery app: one house configuration, explicit task names, no result backend."""

from __future__ import annotations

from celery import Celery
from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import sqlalchemy as kombu_sqlalchemy

from triage_core.settings import Settings

QUEUE = "cxr_triage"
PROCESS_STUDY = "cxr_triage.process_study"
EXPORT_RESULTS = "cxr_triage.export_results"


class PollingSQLAlchemyTransport(kombu_sqlalchemy.Transport):
    """kombu's SQLAlchemy transport, polled every 0.25 s instead of 1 s.

    The interval cannot go through ``broker_transport_options``: this transport hands
    every option it does not know to ``create_engine``, which rejects ``polling_interval``.
    """

    polling_interval = 0.25


_EMBEDDED_ALIAS = "cxr-sqla"
TRANSPORT_ALIASES.setdefault(_EMBEDDED_ALIAS, f"{__name__}:PollingSQLAlchemyTransport")


def make_celery(settings: Settings) -> Celery:
    broker_url = settings.broker_url
    if settings.uses_embedded_broker:
        settings.ensure_dirs()
        if broker_url.startswith("sqla+"):
            broker_url = f"{_EMBEDDED_ALIAS}+{broker_url.removeprefix('sqla+')}"
    app = Celery("cxr_triage", broker=broker_url, set_as_current=False)
    # The SQL job and export tables are the truth (triage_core.work): a message only says "look at
    # job N / export N", and the task claims the row under a lease before doing anything. So every
    # delivery rule below may err towards delivering twice; none may lose the work.
    transport_options: dict = {}
    if broker_url.startswith(("redis://", "rediss://", "redis+socket://")):
        # An unacknowledged message comes back after this long. Longer than the longest job (which
        # stops renewing its lease after CXR_TRIAGE_JOB_MAX_SECONDS), so that a slow job is never
        # handed to a second worker while the first still works on it.
        transport_options["visibility_timeout"] = int(settings.job_max_seconds + 600)
    app.conf.update(
        task_default_queue=QUEUE,
        task_ignore_result=True,
        result_backend=None,
        # Acknowledge after the task ran, not before: a worker that dies mid-task leaves the message
        # to be delivered again...
        task_acks_late=True,
        # ...also when the worker process itself is lost (kill -9, OOM): the message goes back on the
        # queue. The redelivery finds the job's holder dead, takes the job back and counts the lost
        # attempt; after CXR_TRIAGE_JOB_MAX_ATTEMPTS the study ends FAILED instead of looping.
        task_reject_on_worker_lost=True,
        # Each model process reserves at most one message beyond the one it runs.
        worker_prefetch_multiplier=1,
        # A hung task is killed (prefork pool) a minute after its lease stopped being renewed.
        task_time_limit=int(settings.job_max_seconds + 60),
        task_serializer="json",
        accept_content=["json"],
        # A broker that is down at start or goes away later is waited for, forever, not given up on.
        broker_connection_retry_on_startup=True,
        broker_connection_retry=True,
        broker_connection_max_retries=None,
        broker_transport_options=transport_options,
        worker_hijack_root_logger=False,
        # Task events for Flower or `celery events` on a real broker (the embedded transport has no
        # fan-out exchange to carry them); the worker is started with --task-events there too.
        worker_send_task_events=not settings.uses_embedded_broker,
        task_send_sent_event=not settings.uses_embedded_broker,
        enable_utc=True,
    )
    return app


class Publisher:
    """Puts wake-ups on the broker (ids only) and records in SQL that they are there."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    def job(self, job_id: int) -> None:
        self.app.send_task(PROCESS_STUDY, args=[int(job_id)], queue=QUEUE)

    def export(self, export_id: int) -> None:
        self.app.send_task(EXPORT_RESULTS, args=[int(export_id)], queue=QUEUE)
