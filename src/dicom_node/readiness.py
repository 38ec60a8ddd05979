"""The node's scheduler: quiet-period detection and the sweeper.

A study whose series have been quiet for N seconds becomes READY with a QUEUED job, whose id is
published once the transaction has committed. Every `sweep_interval`, the one process across hosts
that holds the sweeper's lease runs `triage_core.work.sweep`: expired leases taken back, jobs that
lost their worker too often FAILED, lost messages and due exports published again.

The publish callables are injected by the composition root (dicom_node does not import worker).
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Callable

from sqlalchemy import and_, or_, select, update

from triage_core import audit, work
from triage_core.db import Database
from triage_core.models import Job, Study
from triage_core.states import AuditAction, JobStatus, StudyStatus

log = logging.getLogger(__name__)
ACTOR = audit.SYSTEM_ACTORS["node"]

Enqueue = Callable[[int], None]
_PUBLISH_ERROR = "publishing to the broker failed, will retry"


def mark_quiet_studies_ready(database: Database, quiet_seconds: float, now: datetime | None = None) -> list[int]:
    """Move RECEIVING studies that are quiet, or whose sending association was released after their
    last instance, to READY with a new QUEUED job. Returns the new job ids."""
    now = now or datetime.now(timezone.utc)
    cutoff = now - timedelta(seconds=quiet_seconds)
    job_ids: list[int] = []
    with database.session() as session:
        studies = session.scalars(
            select(Study)
            .where(Study.status == str(StudyStatus.RECEIVING),
                   or_(Study.last_instance_at <= cutoff,
                       and_(Study.released_at.is_not(None), Study.released_at >= Study.last_instance_at)))
            .with_for_update(skip_locked=True)
        ).all()
        for study in studies:
            released = study.released_at is not None and study.released_at >= study.last_instance_at
            audit.set_status(session, study, StudyStatus.READY, actor=ACTOR,
                             reason="the sending association was released" if released and
                             study.last_instance_at > cutoff else f"series quiet for {quiet_seconds:g} s")
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


def mark_released(database: Database, study_ids: set[int], now: datetime | None = None) -> int:
    """The association that sent these studies' instances was released: their quiet period ends now
    (for those still receiving). Returns how many studies it concerned."""
    if not study_ids:
        return 0
    with database.session() as session:
        return session.execute(
            update(Study)
            .where(Study.id.in_(sorted(study_ids)), Study.status == str(StudyStatus.RECEIVING))
            .values(released_at=now or datetime.now(timezone.utc))
            .execution_options(synchronize_session=False)
        ).rowcount


def run_sweeper(database: Database, policy: work.WorkPolicy, holder: str, publish_job: Enqueue,
                publish_export: Enqueue, lease_ttl: timedelta) -> work.SweepResult | None:
    """One sweep if this process holds (or takes) the sweeper's lease; None when another does."""
    with database.session() as session:
        if not work.acquire_lease(session, work.SWEEPER_LEASE, holder, lease_ttl):
            return None
    with database.session() as session:
        result = work.sweep(session, policy)
    if result.jobs_requeued or result.jobs_failed or result.exports_reclaimed:
        log.warning("sweeper: jobs queued again %s, jobs failed (worker lost too often) %s, exports taken back %s",
                    result.jobs_requeued, result.jobs_failed, result.exports_reclaimed)
    unsent_jobs = _publish(result.publish_jobs, publish_job, "job")
    unsent_exports = _publish(result.publish_exports, publish_export, "export")
    if unsent_jobs or unsent_exports:
        with database.session() as session:  # to be published again at the next sweep
            work.mark_unpublished(session, job_ids=unsent_jobs, export_ids=unsent_exports)
    return result


def _publish(ids: list[int], publish: Enqueue, what: str) -> list[int]:
    """Publish each id; the ids that could not be (the broker is away) are returned."""
    for index, item in enumerate(ids):
        try:
            publish(item)
        except Exception as exc:
            log.warning("%s: %s %s: %s", _PUBLISH_ERROR, what, item, exc)
            return ids[index:]
    if ids:
        log.info("sweeper published %s(s) %s", what, ids)
    return []


class Scheduler:
    """A background thread: every `interval` seconds, mark quiet studies ready and send their jobs;
    every `sweep_interval` seconds, sweep (when this process holds the sweeper's lease)."""

    def __init__(self, database: Database, quiet_seconds: float, publish_job: Enqueue, publish_export: Enqueue,
                 policy: work.WorkPolicy, sweep_interval: float, interval: float = 0.1) -> None:
        self.database = database
        self.quiet_seconds = quiet_seconds
        self.publish_job = publish_job
        self.publish_export = publish_export
        self.policy = policy
        self.sweep_interval = sweep_interval
        self.interval = interval
        self.holder = work.holder_id()
        self._next_sweep = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def tick(self) -> None:
        mark_quiet_studies_ready(self.database, self.quiet_seconds)
        send_pending_jobs(self.database, self.publish_job)
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + self.sweep_interval
            run_sweeper(self.database, self.policy, self.holder, self.publish_job, self.publish_export,
                        lease_ttl=timedelta(seconds=3 * self.sweep_interval))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:
                log.exception("scheduler iteration failed; retrying")
            self._stop.wait(self.interval)
