"""triage_core.work: the rules of jobs, exports, leases and the sweeper, on SQLite and PostgreSQL.

Time is passed explicitly, so the rules are tested without waiting; concurrency is tested with
real processes racing for the same rows.
"""

from __future__ import annotations

import multiprocessing
import random
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select

from triage_core import work
from triage_core.db import Database
from triage_core.models import AuditEvent, Base, Export, Job, Study
from triage_core.states import ExportStatus, JobStatus, StudyStatus

T0 = datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc)
POLICY = work.WorkPolicy(lease=timedelta(seconds=60), max_attempts=3, requeue_after=timedelta(minutes=5),
                         export_backoff_seconds=10, export_max_delay_seconds=600,
                         export_give_up=timedelta(hours=24))


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path):
    url = f"sqlite:///{tmp_path / 'work.sqlite'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    db = Database(url)
    Base.metadata.create_all(db.engine)
    yield db
    db.dispose()


def _study_with_job(database: Database, uid: str = "1.2.3", status: StudyStatus = StudyStatus.READY) -> tuple[int, int]:
    with database.session() as session:
        study = Study(study_instance_uid=uid, status=str(status), received_at=T0, last_instance_at=T0)
        session.add(study)
        session.flush()
        job = Job(study_id=study.id, status=str(JobStatus.QUEUED), enqueued_at=T0)
        session.add(job)
        session.flush()
        return study.id, job.id


def _job(database: Database, job_id: int) -> Job:
    with database.session() as session:
        return session.get(Job, job_id)


def _study(database: Database, study_id: int) -> Study:
    with database.session() as session:
        return session.get(Study, study_id)


def test_a_job_is_claimed_once_and_held_under_its_lease(database):
    _, job_id = _study_with_job(database)
    with database.session() as session:
        job = work.claim_job(session, job_id, "host-a:1:1", POLICY, T0)
        assert job.status == "RUNNING" and job.attempts == 1 and job.locked_by == "host-a:1:1"
    with database.session() as session:  # a duplicate message while it is held
        assert work.claim_job(session, job_id, "host-b:2:2", POLICY, T0 + timedelta(seconds=30)) is None
    with database.session() as session:  # the holder renews
        assert work.renew_job(session, job_id, "host-a:1:1", POLICY, T0 + timedelta(seconds=50))
        assert not work.renew_job(session, job_id, "host-b:2:2", POLICY, T0 + timedelta(seconds=50))
    with database.session() as session:  # renewed: still held after the first lease would have run out
        assert work.claim_job(session, job_id, "host-b:2:2", POLICY, T0 + timedelta(seconds=100)) is None
    with database.session() as session:  # expired: another worker takes it, one more attempt
        job = work.claim_job(session, job_id, "host-b:2:2", POLICY, T0 + timedelta(seconds=111))
        assert job.locked_by == "host-b:2:2" and job.attempts == 2
    with database.session() as session:
        assert work.owns_job(session, job_id, "host-a:1:1") is None
        job = work.owns_job(session, job_id, "host-b:2:2")
        work.release_job(job, JobStatus.DONE, now=T0 + timedelta(seconds=120))
    with database.session() as session:  # a late message for a finished job
        assert work.claim_job(session, job_id, "host-c:3:3", POLICY, T0 + timedelta(hours=2)) is None


def test_a_dead_local_holder_is_taken_over_at_once(database):
    _, job_id = _study_with_job(database)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = work.holder_id().split(":")[0]
    dead = f"{host}:{int(gone.stdout)}:12345"
    assert work.holder_is_dead(dead) and not work.holder_is_dead(work.holder_id())
    assert not work.holder_is_dead(f"another-host:{int(gone.stdout)}:12345")  # unknown: wait for the lease
    with database.session() as session:
        assert work.claim_job(session, job_id, dead, POLICY, T0)
    with database.session() as session:  # long before the lease runs out
        job = work.claim_job(session, job_id, work.holder_id(), POLICY, T0 + timedelta(seconds=1))
        assert job is not None and job.attempts == 2


def test_sweeper_queues_a_lost_job_again_then_fails_it_after_the_cap(database):
    study_id, job_id = _study_with_job(database)
    now = T0
    for attempt in range(1, POLICY.max_attempts + 1):
        with database.session() as session:
            job = work.claim_job(session, job_id, f"worker:{attempt}:1", POLICY, now)
            assert job.attempts == attempt
            session.get(Study, study_id).status = "PROCESSING"
        now += POLICY.lease + timedelta(seconds=1)  # the worker died: its lease runs out
        with database.session() as session:
            result = work.sweep(session, POLICY, now)
        if attempt < POLICY.max_attempts:
            assert result.jobs_requeued == [job_id] and result.publish_jobs == [job_id]
            assert _job(database, job_id).status == "QUEUED"
            assert _study(database, study_id).status == "READY"
        else:
            assert result.jobs_failed == [job_id] and result.publish_jobs == []
    job, study = _job(database, job_id), _study(database, study_id)
    assert job.status == "FAILED" and job.error == "worker lost 3 times"
    assert study.status == "FAILED" and study.status_reason.startswith("worker lost 3 times")
    with database.session() as session:
        actors = session.scalars(select(AuditEvent.actor).where(AuditEvent.study_id == study_id)).all()
    assert "system:sweeper" in actors


def test_sweeper_publishes_lost_messages_after_the_bound_and_at_once_after_a_worker_loss(database):
    _, fresh = _study_with_job(database, "1.2.3")
    _, old = _study_with_job(database, "1.2.4")
    with database.session() as session:
        session.get(Job, fresh).enqueued_at = T0 + timedelta(minutes=4)
        session.get(Job, old).enqueued_at = T0
    with database.session() as session:
        assert work.sweep(session, POLICY, T0 + timedelta(minutes=4, seconds=30)).publish_jobs == []
    with database.session() as session:  # the old message may be lost: sent again, once
        assert work.sweep(session, POLICY, T0 + timedelta(minutes=5, seconds=1)).publish_jobs == [old]
    with database.session() as session:
        assert work.sweep(session, POLICY, T0 + timedelta(minutes=5, seconds=2)).publish_jobs == []
    # A worker is lost (an expired lease): what it may have reserved is sent again without waiting.
    _, running = _study_with_job(database, "1.2.5")
    with database.session() as session:
        work.claim_job(session, running, "w:1:1", POLICY, T0 + timedelta(minutes=5))
    with database.session() as session:
        result = work.sweep(session, POLICY, T0 + timedelta(minutes=6, seconds=30))
    assert result.jobs_requeued == [running] and set(result.publish_jobs) == {fresh, old, running}


def _export(database: Database, study_id: int, now: datetime) -> int:
    with database.session() as session:
        return work.schedule_export(session, session.get(Study, study_id), "PACS@pacs:104", now).id


def test_export_backoff_grows_with_jitter_to_its_maximum():
    rng = random.Random(7)
    delays = [work.export_delay(n, POLICY, rng) for n in range(1, 12)]
    for n, delay in enumerate(delays, start=1):
        ceiling = min(600, 10 * 2 ** (n - 1))
        assert ceiling / 2 <= delay <= ceiling
    assert max(delays) <= 600 and delays[-1] >= 300
    assert len({round(d, 6) for d in delays[-4:]}) == 4  # jittered, not in lockstep


def test_an_export_is_retried_on_its_schedule_until_the_give_up_window(database):
    study_id, _ = _study_with_job(database)
    export_id = _export(database, study_id, T0)
    now = T0
    with database.session() as session:
        assert work.sweep(session, POLICY, now).publish_exports == [export_id]
    attempts = 0
    while True:
        with database.session() as session:
            export = work.claim_export(session, export_id, "w:1:1", POLICY, now)
            assert export is not None, f"not due at {now}"
            work.export_failed(export, "association rejected", POLICY, now, random.Random(attempts))
            attempts += 1
            status, due = export.status, export.next_attempt_at
        if status == ExportStatus.EXPORT_FAILED:
            break
        with database.session() as session:  # not before it is due
            assert work.claim_export(session, export_id, "w:1:1", POLICY, due - timedelta(seconds=1)) is None
            assert work.sweep(session, POLICY, due - timedelta(seconds=1)).publish_exports == []
        with database.session() as session:
            assert work.sweep(session, POLICY, due).publish_exports == [export_id]
        now = due
    assert now - T0 >= POLICY.export_give_up and attempts > 100  # hours of attempts, every ~10 minutes at most
    # By hand: pending and due again, audited; the PACS is back.
    with database.session() as session:
        (retried,) = work.request_export_retry(session, actor="cli:ops", failed=True, now=now)
        assert retried.id == export_id
    with database.session() as session:
        export = work.claim_export(session, export_id, "w:2:2", POLICY, now)
        work.export_succeeded(export, now)
    with database.session() as session:
        export = session.get(Export, export_id)
        assert export.status == "EXPORTED" and export.attempts == attempts + 1
        audit = session.scalars(select(AuditEvent).where(AuditEvent.action == "EXPORT_RETRY_REQUESTED")).one()
        assert audit.actor == "cli:ops" and audit.detail["previous"] == "EXPORT_FAILED"


def test_an_export_whose_worker_died_is_taken_back(database):
    study_id, _ = _study_with_job(database)
    export_id = _export(database, study_id, T0)
    with database.session() as session:
        assert work.claim_export(session, export_id, "w:1:1", POLICY, T0)
        work.mark_published(session, export_ids=[export_id], now=T0)
    with database.session() as session:
        assert work.claim_export(session, export_id, "w:2:2", POLICY, T0 + timedelta(seconds=10)) is None
        assert work.sweep(session, POLICY, T0 + timedelta(seconds=10)).publish_exports == []
    with database.session() as session:
        result = work.sweep(session, POLICY, T0 + timedelta(seconds=61))
    assert result.exports_reclaimed == [export_id] and result.publish_exports == [export_id]


def test_export_retry_by_study_or_failed_only(database):
    study_id, _ = _study_with_job(database)
    _export(database, study_id, T0)
    with database.session() as session:
        with pytest.raises(ValueError):
            work.request_export_retry(session, actor="x", study_instance_uid="1.2.3", failed=True)
        with pytest.raises(ValueError):
            work.request_export_retry(session, actor="x")
        assert work.request_export_retry(session, actor="x", failed=True) == []
        assert len(work.request_export_retry(session, actor="x", study_instance_uid="1.2.3")) == 1
        assert work.request_export_retry(session, actor="x", study_instance_uid="9.9") == []


def test_one_sweeper_at_a_time(database):
    ttl = timedelta(seconds=15)
    with database.session() as session:
        assert work.acquire_lease(session, work.SWEEPER_LEASE, "node-a", ttl, T0)
    with database.session() as session:
        assert not work.acquire_lease(session, work.SWEEPER_LEASE, "node-b", ttl, T0 + timedelta(seconds=5))
        assert work.acquire_lease(session, work.SWEEPER_LEASE, "node-a", ttl, T0 + timedelta(seconds=5))
    with database.session() as session:  # node-a is gone: its lease runs out and node-b takes over
        assert work.acquire_lease(session, work.SWEEPER_LEASE, "node-b", ttl, T0 + timedelta(seconds=21))


def _race(url: str, job_id: int, name: str, start, queue) -> None:
    db = Database(url)
    start.wait()
    with db.session() as session:
        claimed = work.claim_job(session, job_id, f"{name}:1:1", POLICY)
    queue.put(name if claimed is not None else None)
    db.dispose()


def test_processes_racing_for_one_job_claim_it_once(database):
    _, job_id = _study_with_job(database)
    context = multiprocessing.get_context("spawn")
    start, queue = context.Event(), context.Queue()
    racers = [context.Process(target=_race, args=(database.url, job_id, f"racer{n}", start, queue)) for n in range(6)]
    for racer in racers:
        racer.start()
    start.set()
    for racer in racers:
        racer.join(60)
    winners = [name for name in (queue.get(timeout=10) for _ in racers) if name]
    assert len(winners) == 1
    assert _job(database, job_id).locked_by == f"{winners[0]}:1:1"
