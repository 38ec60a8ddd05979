"""The work queue in SQL: jobs and exports, their leases, the export schedule and the sweeper.

The `jobs` and `exports` tables are the truth about the work; the broker only
carries wake-ups (ids). Every transition is a conditional UPDATE, so that any
number of workers, messages and sweepers can race for a row and exactly one
wins:

* A worker *claims* a job or export (QUEUED/due -> RUNNING with a lease:
  ``locked_by``, ``locked_until``) and renews the lease while it works. A
  duplicate or late message finds it claimed and does nothing.
* A worker that dies stops renewing. The *sweeper* (run by the node's
  scheduler, one at a time across hosts through a `Lease` row) takes back
  expired leases: the job is queued again, or FAILED ("worker lost N times")
  after `job_max_attempts` starts, so a study that kills its worker every
  time cannot loop. A redelivered message whose holder is a dead process on
  the same host takes the job back at once, without waiting for the lease.
* The sweeper also publishes again any queued work whose message is older
  than `requeue_after_seconds` (a broker restarted empty, a message lost),
  and every export whose next attempt is due.
* Each model worker process and each DICOM node *beats*: a `heartbeats` row renewed every
  `heartbeat_seconds`, saying whether its model is loaded (and why not). Readiness counts the
  fresh ones; the sweeper forgets rows a day old.
* An export that fails is rescheduled with exponential backoff and jitter
  (`next_attempt_at`); it ends EXPORT_FAILED only when the destination has
  refused for `export_give_up_hours`, and `request_export_retry` re-drives
  it by hand.

Functions take the caller's session and commit nothing themselves; `now` is
explicit so that the rules are tested without waiting.
"""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from functools import lru_cache

from sqlalchemy import and_, delete, or_, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from . import audit
from .models import Export, Heartbeat, Job, Lease, Study
from .settings import Settings
from .states import AuditAction, ExportStatus, JobStatus, StudyStatus

__all__ = [
    "SWEEPER_LEASE",
    "SweepResult",
    "WorkPolicy",
    "acquire_lease",
    "beat",
    "claim_export",
    "claim_job",
    "export_delay",
    "export_failed",
    "export_succeeded",
    "forget_heartbeat",
    "holder_id",
    "holder_is_dead",
    "live_heartbeats",
    "mark_published",
    "mark_unpublished",
    "owns_job",
    "queued_jobs",
    "release_job",
    "renew_export",
    "renew_job",
    "request_export_retry",
    "schedule_export",
    "sweep",
]

SWEEPER_LEASE = "sweeper"
#: Heartbeat rows not renewed for this long are deleted by the sweeper.
HEARTBEAT_FORGET = timedelta(days=1)
_SWEEPER_ACTOR = "system:sweeper"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class WorkPolicy:
    """The bounds of the work queue; see the settings of the same names."""

    lease: timedelta = timedelta(seconds=60)
    max_attempts: int = 3
    max_job: timedelta = timedelta(minutes=30)
    requeue_after: timedelta = timedelta(minutes=5)
    export_backoff_seconds: float = 10.0
    export_max_delay_seconds: float = 600.0
    export_give_up: timedelta = timedelta(hours=24)

    @classmethod
    def from_settings(cls, settings: Settings) -> "WorkPolicy":
        return cls(
            lease=timedelta(seconds=settings.job_lease_seconds),
            max_attempts=settings.job_max_attempts,
            max_job=timedelta(seconds=settings.job_max_seconds),
            requeue_after=timedelta(seconds=settings.requeue_after_seconds),
            export_backoff_seconds=settings.export_backoff_seconds,
            export_max_delay_seconds=settings.export_max_delay_seconds,
            export_give_up=timedelta(hours=settings.export_give_up_hours),
        )


# --- who holds a lease ---------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _start_ticks(pid: int) -> str:
    """The start time of process `pid` (clock ticks after boot, /proc/PID/stat field 22): with the
    pid it names one process, even after the pid is reused."""
    return _read_start_ticks(pid) or "0"


def _read_start_ticks(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read().decode("ascii", "replace")
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: count from its closing one.
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[19] if len(fields) > 19 else None


def holder_id() -> str:
    """This process as a lease holder: ``host:pid:start``."""
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_start_ticks(pid)}"[:128]


def holder_is_dead(holder: str) -> bool:
    """True when `holder` is a process of this host that no longer runs. A holder on another host
    is not known to be dead: its lease expires instead."""
    try:
        host, pid_text, start = holder.rsplit(":", 2)
        pid = int(pid_text)
    except ValueError:
        return False
    if host != socket.gethostname() or pid <= 0:
        return False
    current = _read_start_ticks(pid)
    return current is None or current != start


# --- jobs ----------------------------------------------------------------------------------------


def claim_job(session: Session, job_id: int, holder: str, policy: WorkPolicy, now: datetime | None = None) -> Job | None:
    """Take job `job_id` for `holder`: QUEUED, or RUNNING under an expired lease or a dead local
    holder, becomes RUNNING with a fresh lease and one more attempt. None when another holds it
    or it is finished (a duplicate or late message)."""
    now = now or utcnow()
    current = session.execute(select(Job.status, Job.locked_by).where(Job.id == job_id)).first()
    if current is None:
        return None
    takeable = [Job.status == str(JobStatus.QUEUED),
                and_(Job.status == str(JobStatus.RUNNING), Job.locked_until < now)]
    if current.status == JobStatus.RUNNING and current.locked_by and holder_is_dead(current.locked_by):
        takeable.append(and_(Job.status == str(JobStatus.RUNNING), Job.locked_by == current.locked_by))
    claimed = session.execute(
        update(Job)
        .where(Job.id == job_id, or_(*takeable))
        .values(status=str(JobStatus.RUNNING), locked_by=holder, locked_until=now + policy.lease,
                attempts=Job.attempts + 1, started_at=now)
        .execution_options(synchronize_session=False)
    ).rowcount
    if claimed != 1:
        return None
    job = session.get(Job, job_id, populate_existing=True)
    return job


def queued_jobs(session: Session, limit: int, exclude: Sequence[int] = ()) -> list[int]:
    """Up to `limit` queued job ids, oldest first (for a worker that claims several at once)."""
    query = select(Job.id).where(Job.status == str(JobStatus.QUEUED)).order_by(Job.id).limit(limit)
    if exclude:
        query = query.where(Job.id.not_in(list(exclude)))
    return list(session.scalars(query))


def renew_job(session: Session, job_id: int, holder: str, policy: WorkPolicy, now: datetime | None = None) -> bool:
    """Extend the lease of a job `holder` still holds; False when it was taken back."""
    now = now or utcnow()
    return session.execute(
        update(Job)
        .where(Job.id == job_id, Job.locked_by == holder, Job.status == str(JobStatus.RUNNING))
        .values(locked_until=now + policy.lease)
        .execution_options(synchronize_session=False)
    ).rowcount == 1


def owns_job(session: Session, job_id: int, holder: str) -> Job | None:
    """The job, locked for this transaction, if `holder` still holds it; else None."""
    job = session.scalar(select(Job).where(Job.id == job_id).with_for_update().execution_options(populate_existing=True))
    if job is None or job.status != JobStatus.RUNNING or job.locked_by != holder:
        return None
    return job


def release_job(job: Job, status: JobStatus, error: str = "", now: datetime | None = None) -> None:
    """End a job the caller owns."""
    job.status = str(status)
    job.error = error
    job.finished_at = now or utcnow()
    job.locked_until = None


# --- exports -------------------------------------------------------------------------------------


def schedule_export(session: Session, study: Study, destination: str, now: datetime | None = None) -> Export:
    """The study's (new) results are to go to `destination`: pending, due now, to be published."""
    now = now or utcnow()
    export = session.scalar(select(Export).where(Export.study_id == study.id, Export.destination == destination))
    if export is None:
        export = Export(study_id=study.id, destination=destination)
        session.add(export)
    export.status = str(ExportStatus.EXPORT_PENDING)
    export.attempts = 0
    export.last_error = ""
    export.pending_since = now
    export.next_attempt_at = now
    export.enqueued_at = None
    export.locked_by = ""
    export.locked_until = None
    session.flush()
    audit.record(session, actor=audit.SYSTEM_ACTORS["worker"], action=AuditAction.EXPORT_STATUS, study=study,
                 destination=destination, status=str(ExportStatus.EXPORT_PENDING))
    return export


def claim_export(
    session: Session, export_id: int, holder: str, policy: WorkPolicy, now: datetime | None = None
) -> Export | None:
    """Take a due, pending export for `holder`; None when it is not due, finished or held."""
    now = now or utcnow()
    current = session.execute(select(Export.locked_by).where(Export.id == export_id)).first()
    if current is None:
        return None
    free = [Export.locked_until.is_(None), Export.locked_until < now]
    if current.locked_by and holder_is_dead(current.locked_by):
        free.append(Export.locked_by == current.locked_by)
    claimed = session.execute(
        update(Export)
        .where(Export.id == export_id, Export.status == str(ExportStatus.EXPORT_PENDING),
               or_(Export.next_attempt_at.is_(None), Export.next_attempt_at <= now), or_(*free))
        .values(locked_by=holder, locked_until=now + policy.lease)
        .execution_options(synchronize_session=False)
    ).rowcount
    if claimed != 1:
        return None
    return session.get(Export, export_id, populate_existing=True)


def renew_export(session: Session, export_id: int, holder: str, policy: WorkPolicy, now: datetime | None = None) -> bool:
    now = now or utcnow()
    return session.execute(
        update(Export)
        .where(Export.id == export_id, Export.locked_by == holder, Export.status == str(ExportStatus.EXPORT_PENDING))
        .values(locked_until=now + policy.lease)
        .execution_options(synchronize_session=False)
    ).rowcount == 1


def export_delay(attempts: int, policy: WorkPolicy, rng: random.Random | None = None) -> float:
    """Seconds to wait after the `attempts`-th failure: base x 2^(attempts-1), at most the maximum,
    with equal jitter (half fixed, half random) so that many exports to one PACS spread out."""
    ceiling = min(policy.export_max_delay_seconds, policy.export_backoff_seconds * 2 ** max(0, attempts - 1))
    return ceiling / 2 + (rng or random).uniform(0, ceiling / 2)


def export_succeeded(export: Export, now: datetime | None = None) -> None:
    export.attempts += 1
    export.status = str(ExportStatus.EXPORTED)
    export.last_error = ""
    export.next_attempt_at = None
    export.locked_until = None


def export_failed(
    export: Export, error: str, policy: WorkPolicy, now: datetime | None = None, rng: random.Random | None = None
) -> None:
    """Count a failed attempt: try again after the backoff, or give up after the window."""
    now = now or utcnow()
    export.attempts += 1
    export.last_error = error[:2000]
    export.locked_until = None
    export.enqueued_at = None
    since = export.pending_since or now
    if now - since >= policy.export_give_up:
        export.status = str(ExportStatus.EXPORT_FAILED)
        export.next_attempt_at = None
    else:
        export.status = str(ExportStatus.EXPORT_PENDING)
        export.next_attempt_at = now + timedelta(seconds=export_delay(export.attempts, policy, rng))


def request_export_retry(
    session: Session, *, actor: str, study_instance_uid: str | None = None, failed: bool = False,
    now: datetime | None = None,
) -> list[Export]:
    """Re-drive exports by hand: those of one study (any status) or every EXPORT_FAILED one.
    Each is pending and due now, with a new give-up window; every one is audited."""
    if (study_instance_uid is None) == (not failed):
        raise ValueError("name a study or ask for the failed exports, not both")
    now = now or utcnow()
    query = select(Export).join(Study, Study.id == Export.study_id)
    if study_instance_uid is not None:
        query = query.where(Study.study_instance_uid == study_instance_uid)
    else:
        query = query.where(Export.status == str(ExportStatus.EXPORT_FAILED))
    exports = list(session.scalars(query.order_by(Export.id)))
    for export in exports:
        previous = export.status
        export.status = str(ExportStatus.EXPORT_PENDING)
        export.pending_since = now
        export.next_attempt_at = now
        export.enqueued_at = None
        export.locked_until = None
        audit.record(session, actor=actor, action=AuditAction.EXPORT_RETRY_REQUESTED, study=export.study,
                     destination=export.destination, previous=previous, attempts=export.attempts)
    return exports


# --- heartbeats ----------------------------------------------------------------------------------


def beat(session: Session, *, holder: str, service: str, version: str = "", model: dict | None = None,
         model_error: str = "", now: datetime | None = None) -> None:
    """Create or renew `holder`'s heartbeat row. `model` is {name, version, runtime, device} once loaded."""
    now = now or utcnow()
    host = holder.rsplit(":", 2)[0] if holder.count(":") >= 2 else ""
    values = {
        "service": service, "hostname": host or socket.gethostname(), "pid": os.getpid(), "version": version,
        "seen_at": now, "model_name": (model or {}).get("name", ""), "model_version": (model or {}).get("version", ""),
        "model_runtime": (model or {}).get("runtime", ""), "model_device": (model or {}).get("device", ""),
        "model_loaded": model is not None, "model_error": model_error[:2000],
    }
    dialect = session.get_bind().dialect.name
    if dialect in ("sqlite", "postgresql"):
        insert = sqlite_insert if dialect == "sqlite" else postgresql_insert
        statement = insert(Heartbeat).values(holder=holder, started_at=now, **values)
        session.execute(statement.on_conflict_do_update(index_elements=["holder"], set_=values))
        return
    row = session.get(Heartbeat, holder)
    if row is None:
        session.add(Heartbeat(holder=holder, started_at=now, **values))
    else:
        for key, value in values.items():
            setattr(row, key, value)


def forget_heartbeat(session: Session, holder: str) -> None:
    """A process that stops cleanly removes its row (a crashed one's goes stale)."""
    session.execute(delete(Heartbeat).where(Heartbeat.holder == holder))


def live_heartbeats(session: Session, service: str, max_age: timedelta, now: datetime | None = None) -> list[Heartbeat]:
    """The rows of `service` renewed within `max_age`, newest first."""
    now = now or utcnow()
    return list(session.scalars(
        select(Heartbeat).where(Heartbeat.service == service, Heartbeat.seen_at >= now - max_age)
        .order_by(Heartbeat.seen_at.desc())
    ))


# --- the sweeper ---------------------------------------------------------------------------------


def acquire_lease(session: Session, name: str, holder: str, ttl: timedelta, now: datetime | None = None) -> bool:
    """Hold lease `name` for `ttl` (taking or renewing it); False when another holder has it."""
    now = now or utcnow()
    dialect = session.get_bind().dialect.name
    if dialect in ("sqlite", "postgresql"):
        insert = sqlite_insert if dialect == "sqlite" else postgresql_insert
        session.execute(insert(Lease).values(name=name, holder="", until=now).on_conflict_do_nothing())
    elif session.get(Lease, name) is None:
        session.add(Lease(name=name, holder="", until=now))
        session.flush()
    return session.execute(
        update(Lease)
        .where(Lease.name == name, or_(Lease.holder == holder, Lease.until <= now))
        .values(holder=holder, until=now + ttl)
        .execution_options(synchronize_session=False)
    ).rowcount == 1


@dataclass
class SweepResult:
    """What one sweep did, and the work whose message the caller is to publish."""

    publish_jobs: list[int] = field(default_factory=list)
    publish_exports: list[int] = field(default_factory=list)
    jobs_requeued: list[int] = field(default_factory=list)
    jobs_failed: list[int] = field(default_factory=list)
    exports_reclaimed: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return any((self.publish_jobs, self.publish_exports, self.jobs_requeued, self.jobs_failed,
                    self.exports_reclaimed))


def sweep(session: Session, policy: WorkPolicy, now: datetime | None = None) -> SweepResult:
    """Take back expired leases, fail jobs that lost their worker too often, and list the work whose
    message is to be published (never sent, lost, or due); marks that work as published now."""
    now = now or utcnow()
    result = SweepResult()
    session.execute(delete(Heartbeat).where(Heartbeat.seen_at < now - HEARTBEAT_FORGET))
    for job in session.scalars(
        select(Job).where(Job.status == str(JobStatus.RUNNING), Job.locked_until < now).with_for_update(skip_locked=True)
    ):
        study = session.get(Study, job.study_id)
        if job.attempts >= policy.max_attempts:
            reason = f"worker lost {job.attempts} times"
            release_job(job, JobStatus.FAILED, reason, now)
            if study.status in (StudyStatus.READY, StudyStatus.PROCESSING):
                audit.set_status(session, study, StudyStatus.FAILED, actor=_SWEEPER_ACTOR,
                                 reason=f"{reason} (job {job.id})")
            result.jobs_failed.append(job.id)
        else:
            job.status = str(JobStatus.QUEUED)
            job.locked_until = None
            job.enqueued_at = None
            if study.status == StudyStatus.PROCESSING:
                audit.set_status(session, study, StudyStatus.READY, actor=_SWEEPER_ACTOR,
                                 reason=f"worker lost (attempt {job.attempts} of {policy.max_attempts}); queued again")
            result.jobs_requeued.append(job.id)
    # A message older than requeue_after may have been lost. When a worker was just found lost, the
    # messages it had reserved (and the broker may hold back for a long visibility timeout) are too:
    # then anything published before the lease began is sent again at once. Duplicates are harmless.
    lost_worker = bool(result.jobs_requeued or result.jobs_failed)
    stale = now - (policy.lease if lost_worker else policy.requeue_after)
    for job in session.scalars(
        select(Job)
        .where(Job.status == str(JobStatus.QUEUED), or_(Job.enqueued_at.is_(None), Job.enqueued_at < stale))
        .order_by(Job.id)
        .with_for_update(skip_locked=True)
    ):
        job.enqueued_at = now
        result.publish_jobs.append(job.id)
    for export in session.scalars(
        select(Export)
        .where(Export.status == str(ExportStatus.EXPORT_PENDING), Export.locked_until < now)
        .with_for_update(skip_locked=True)
    ):
        export.locked_until = None
        export.enqueued_at = None
        result.exports_reclaimed.append(export.id)
    for export in session.scalars(
        select(Export)
        .where(Export.status == str(ExportStatus.EXPORT_PENDING),
               or_(Export.next_attempt_at.is_(None), Export.next_attempt_at <= now),
               or_(Export.locked_until.is_(None), Export.locked_until < now),
               or_(Export.enqueued_at.is_(None), Export.enqueued_at < stale))
        .order_by(Export.id)
        .with_for_update(skip_locked=True)
    ):
        export.enqueued_at = now
        result.publish_exports.append(export.id)
    return result


def mark_unpublished(session: Session, *, job_ids: Sequence[int] = (), export_ids: Sequence[int] = ()) -> None:
    """These messages did not reach the broker: publish them at the next sweep."""
    if job_ids:
        session.execute(update(Job).where(Job.id.in_(list(job_ids))).values(enqueued_at=None)
                        .execution_options(synchronize_session=False))
    if export_ids:
        session.execute(update(Export).where(Export.id.in_(list(export_ids))).values(enqueued_at=None)
                        .execution_options(synchronize_session=False))


def mark_published(session: Session, *, job_ids: Sequence[int] = (), export_ids: Sequence[int] = (),
                   now: datetime | None = None) -> None:
    """Record that messages for these jobs and exports are on the broker."""
    now = now or utcnow()
    if job_ids:
        session.execute(update(Job).where(Job.id.in_(list(job_ids))).values(enqueued_at=now)
                        .execution_options(synchronize_session=False))
    if export_ids:
        session.execute(update(Export).where(Export.id.in_(list(export_ids))).values(enqueued_at=now)
                        .execution_options(synchronize_session=False))
