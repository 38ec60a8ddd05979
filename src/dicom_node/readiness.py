"""Quiet-period detection: a study whose series have been quiet for N seconds becomes READY.

The enqueue callable is injected by the composition root (dicom_node does not import worker).
It runs only after the transaction that created the job has committed.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta, timezone
from typing import Callable

from sqlalchemy import select

from triage_core import audit
from triage_core.db import Database
from triage_core.models import Job, Study
from triage_core.states import AuditAction, JobStatus, StudyStatus

log = logging.getLogger(__name__)
ACTOR = audit.SYSTEM_ACTORS["node"]

Enqueue = Callable[[int], None]


def mark_quiet_studies_ready(database: Database, quiet_seconds: float, now: datetime | None = None) -> list[int]:
    """Move quiet RECEIVING studies to READY with a new QUEUED job. Returns the new job ids."""
    now = now or datetime.now(timezone.utc)
    cutoff = now - timedelta(seconds=quiet_seconds)
    job_ids: list[int] = []
    with database.session() as session:
        studies = session.scalars(
            select(Study)
            .where(Study.status == str(StudyStatus.RECEIVING), Study.last_instance_at <= cutoff)
            .with_for_update(skip_locked=True)
        ).all()
        for study in studies:
            audit.set_status(session, study, StudyStatus.READY, actor=ACTOR,
                             reason=f"series quiet for {quiet_seconds:g} s")
            job = Job(study_id=study.id, status=str(JobStatus.QUEUED))
            session.add(job)
            session.flush()
            job_ids.append(job.id)
    return job_ids


def send_pending_jobs(database: Database, enqueue: Enqueue) -> int:
    """Put every committed, not-yet-sent job on the queue. Safe to repeat (tasks are idempotent)."""
    with database.session() as session:
        pending = session.scalars(
            select(Job).where(Job.status == str(JobStatus.QUEUED), Job.enqueued_at.is_(None)).order_by(Job.id)
        ).all()
        pending_ids = [(job.id, job.study_id) for job in pending]
    sent = 0
    for job_id, study_id in pending_ids:
        try:
            enqueue(job_id)
        except Exception as exc:
            log.warning("enqueue of job %s (study id %s) failed, will retry: %s", job_id, study_id, exc)
            break
        with database.session() as session:
            job = session.get(Job, job_id)
            job.enqueued_at = datetime.now(timezone.utc)
            study = job.study
            audit.record(session, actor=ACTOR, action=AuditAction.JOB_ENQUEUED, study=study, job_id=job_id)
        log.info("enqueued job %s for study id %s", job_id, study_id)
        sent += 1
    return sent


class ReadinessLoop:
    """A background thread: every `interval` seconds, mark quiet studies ready and send their jobs."""

    def __init__(self, database: Database, quiet_seconds: float, enqueue: Enqueue, interval: float = 0.5) -> None:
        self.database = database
        self.quiet_seconds = quiet_seconds
        self.enqueue = enqueue
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="readiness", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def tick(self) -> None:
        mark_quiet_studies_ready(self.database, self.quiet_seconds)
        send_pending_jobs(self.database, self.enqueue)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:
                log.exception("readiness loop iteration failed; retrying")
            self._stop.wait(self.interval)
