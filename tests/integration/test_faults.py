"""No study is ever stranded or lost: faults on a running `cxr-triage serve`, with real processes.

Each fault, on the embedded defaults (SQLite + kombu's SQLAlchemy transport, two forked model
processes) and on PostgreSQL + Redis (one solo model process): kill -9 of the worker mid-inference,
kill -9 of serve after the C-STORE success (no orphan may survive it), kill -9 of everything during
an export, the broker emptied with studies queued, a poison study that kills its worker every time,
and a PACS down for longer than the whole retry schedule of the old Celery retries (62 s), then
back. Each test ends by proving that every study has exactly one current result set in the PACS
(Orthanc) and nothing else, and prints how long recovery took.

The service runs with short bounds (lease 6 s, re-publish after 10 s, sweep every second, export
backoff 1 s up to 5 s) so that recovery is measured in seconds; the defaults and why they are what
they are are in the README.
"""

from __future__ import annotations

import copy
import os
import shutil
import signal
import sqlite3
import threading
import time
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from tests import dicom_fixtures as fx
from tests.conftest import need, wait_until
from tests.integration.test_end_to_end import TriageService, orthanc_post_find
from triage_core.db import Database
from triage_core.models import Job

pytestmark = pytest.mark.e2e

FAST_BOUNDS = {
    "CXR_TRIAGE_JOB_LEASE_SECONDS": "6",
    "CXR_TRIAGE_REQUEUE_AFTER_SECONDS": "10",
    "CXR_TRIAGE_SWEEP_INTERVAL_SECONDS": "1",
    "CXR_TRIAGE_EXPORT_BACKOFF_SECONDS": "1",
    "CXR_TRIAGE_EXPORT_MAX_DELAY_SECONDS": "5",
    "CXR_TRIAGE_JOB_MAX_ATTEMPTS": "3",
}


class Faults:
    """The service under test, its database, and the faults to inflict on it."""

    def __init__(self, service: TriageService, orthanc, backend: str, redis_url: str | None) -> None:
        self.service, self.orthanc, self.backend, self.redis_url = service, orthanc, backend, redis_url
        url = service.env.get("CXR_TRIAGE_DATABASE_URL") or f"sqlite:///{service.workdir / 'var' / 'triage.sqlite'}"
        self.database = Database(url)

    # -- inputs -----------------------------------------------------------------------------

    def study(self, name: str, images: int = 1) -> list[Path]:
        """A DX For Presentation study of `images` frontal images, written to files."""
        study_uid = fx.uid("fault-study", name)
        files = []
        for number in range(images):
            ds = copy.deepcopy(fx.dx_for_presentation(view="PA" if number % 2 == 0 else "AP",
                                                      uid_seed=f"{name}-{number}", instance_number=number + 1))
            ds.StudyInstanceUID = study_uid
            ds.AccessionNumber = f"F{abs(hash(name)) % 10**8}"
            files.append(fx.write(ds, self.service.workdir / f"{name}-{number}.dcm"))
        return files

    def send(self, files: list[Path]) -> str:
        sent = self.service.send(*files)
        assert sent.returncode == 0, sent.stderr
        return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)

    # -- observing ---------------------------------------------------------------------------

    def running_job_holder(self, study_uid: str) -> int | None:
        """The pid holding the study's running job, if it runs now."""
        from triage_core.models import Study

        with self.database.session() as session:
            holder = session.scalar(
                select(Job.locked_by).join(Study, Study.id == Job.study_id)
                .where(Study.study_instance_uid == study_uid, Job.status == "RUNNING")
            )
        return int(holder.rsplit(":", 2)[1]) if holder else None

    def exported(self, study_uid: str) -> bool:
        detail = self.service.study(study_uid)
        return detail["status"] == "DONE" and bool(detail["exports"]) and all(
            e["status"] == "EXPORTED" for e in detail["exports"])

    def assert_one_current_result_set_in_pacs(self, *study_uids: str) -> None:
        """Every study DONE, exported, and the PACS holding exactly its current result objects."""
        for study_uid in study_uids:
            detail = self.service.study(study_uid)
            assert detail["status"] == "DONE", detail["status_reason"]
            current = {r["sop_instance_uid"] for r in detail["results"]}
            assert sum(r["kind"] == "SR" for r in detail["results"]) == 1
            (found,) = orthanc_post_find(self.orthanc, study_uid)
            in_pacs = [instance["MainDicomTags"]["SOPInstanceUID"]
                       for instance in self.orthanc.get(f"/studies/{found}/instances")]
            assert sorted(in_pacs) == sorted(current), "the PACS must hold the current result set, once"
            srs = [s for s in self.orthanc.get(f"/studies/{found}/series")
                   if s["MainDicomTags"].get("Modality") == "SR"]
            assert len(srs) == 1 and len(srs[0]["Instances"]) == 1

    # -- processes ---------------------------------------------------------------------------

    def tree(self) -> list[int]:
        """serve and every process below it."""
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                ppid = int(stat[stat.rindex(")") + 2:].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
        found, todo = [], [self.service.process.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo.extend(children.get(pid, []))
        return found

    def worker_pids(self) -> list[int]:
        return [pid for pid in self.tree() if _cmdline(pid).endswith("cxr_triage.cli worker") or
                _cmdline_parent_is_worker(pid)]

    def kill9(self, pids: list[int]) -> None:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        self.database.dispose()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def _cmdline_parent_is_worker(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return _cmdline(int(stat[stat.rindex(")") + 2:].split()[1])).endswith("cxr_triage.cli worker")


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _recovered(what: str, started: float) -> float:
    took = time.monotonic() - started
    print(f"\nrecovery ({what}): {took:.1f} s")
    return took


@pytest.fixture(params=["embedded", "postgresql+redis"])
def faults(request, tmp_path, orthanc):
    need(shutil.which("storescu") is not None, "dcmtk is not installed (apt-get install dcmtk)")
    env = {"CXR_TRIAGE_EXPORT_DESTINATIONS": f"{orthanc.ae_title}@127.0.0.1:{orthanc.dicom_port}",
           "CXR_TRIAGE_WORKER_CONCURRENCY": "2", **FAST_BOUNDS}
    redis_url = None
    if request.param == "postgresql+redis":
        env["CXR_TRIAGE_DATABASE_URL"] = request.getfixturevalue("postgres_url")
        env["CXR_TRIAGE_BROKER_URL"] = redis_url = request.getfixturevalue("redis_url")
        env["CXR_TRIAGE_WORKER_CONCURRENCY"] = "1"
    service = TriageService(tmp_path, env).start()
    state = Faults(service, orthanc, request.param, redis_url)
    yield state
    state.close()
    if service.process.poll() is None:
        assert service.stop() == 0, service.log_text()[-4000:]
    else:
        service.log.close()
    leftovers = [pid for pid in state.tree() if pid != service.process.pid and _alive(pid)]
    assert not leftovers, f"processes outlived serve: {leftovers}"


def test_worker_killed_mid_inference(faults):
    study_uid = faults.send(faults.study("mid-inference", images=4))
    holder = wait_until(lambda: faults.running_job_holder(study_uid), 60, interval=0.02,
                        what="the study's job to run")
    faults.kill9([holder])
    started = time.monotonic()
    wait_until(lambda: faults.exported(study_uid), 180, what="the study to be done and exported again")
    _recovered(f"kill -9 of the model process mid-inference, {faults.backend}", started)
    jobs = faults.service.study(study_uid)["jobs"]
    assert len(jobs) == 1 and jobs[0]["attempts"] == 2
    faults.assert_one_current_result_set_in_pacs(study_uid)


def test_serve_killed_after_the_store_succeeded_leaves_no_orphan(faults):
    study_uid = faults.send(faults.study("after-store"))  # 0x0000: the study is ours now
    tree = faults.tree()
    faults.kill9([faults.service.process.pid])
    # Its children die with it (PR_SET_PDEATHSIG), so the ports are free for the next start.
    wait_until(lambda: not any(_alive(pid) for pid in tree), 30, what="serve's children to die with it")
    faults.service.log.close()
    started = time.monotonic()
    faults.service.start()
    wait_until(lambda: faults.exported(study_uid), 180, what="the study to be processed after the restart")
    _recovered(f"kill -9 of serve after the C-STORE success, {faults.backend}", started)
    faults.assert_one_current_result_set_in_pacs(study_uid)


def test_everything_killed_during_an_export(faults):
    faults.orthanc.process.send_signal(signal.SIGSTOP)  # the PACS hangs in the middle of the association
    try:
        study_uid = faults.send(faults.study("during-export"))

        def exporting():
            exports = faults.service.study(study_uid)["exports"]
            return exports and exports[0]["status"] == "EXPORT_PENDING" and "export" in faults.service.log_text()

        wait_until(exporting, 120, what="the export to start")
        time.sleep(2)  # inside the association
        os.killpg(faults.service.process.pid, signal.SIGKILL)  # serve and every process of its group
        faults.service.process.wait()
    finally:
        faults.orthanc.process.send_signal(signal.SIGCONT)
    faults.service.log.close()
    started = time.monotonic()
    faults.service.start()
    wait_until(lambda: faults.exported(study_uid), 180, what="the export to be taken back and done")
    _recovered(f"kill -9 of everything during an export, {faults.backend}", started)
    faults.assert_one_current_result_set_in_pacs(study_uid)


def test_sigterm_to_the_whole_group_stops_within_the_bound(faults):
    """systemd's KillMode=control-group: SIGTERM to every process at once, Celery's pool children
    included. All stop cleanly (exit 0) well within serve's 20 s bound, and nothing lingers."""
    study_uid = faults.send(faults.study("before-sigterm"))
    wait_until(lambda: faults.exported(study_uid), 120, what="the study to be exported")
    tree = faults.tree()
    started = time.monotonic()
    os.killpg(faults.service.process.pid, signal.SIGTERM)
    assert faults.service.process.wait(timeout=30) == 0, faults.service.log_text()[-3000:]
    wait_until(lambda: not any(_alive(pid) for pid in tree), 10, what="every process of the group to exit")
    took = time.monotonic() - started
    print(f"\nstop after SIGTERM to the whole group ({faults.backend}): {took:.1f} s")
    assert took < 20
    assert "did not stop in time" not in faults.service.log_text()
    faults.service.log.close()


def test_broker_emptied_with_studies_queued(faults):
    workers = faults.worker_pids()
    assert workers
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)  # nobody consumes: the messages wait on the broker
    try:
        study_uids = [faults.send(faults.study(f"queued-{n}")) for n in range(3)]

        def all_queued():
            with faults.database.session() as session:
                jobs = session.scalars(select(Job)).all()
            return len(jobs) == 3 and all(j.status == "QUEUED" and j.enqueued_at for j in jobs)

        wait_until(all_queued, 60, what="three queued jobs with their messages published")
        if faults.redis_url:
            import redis

            redis.Redis.from_url(faults.redis_url).flushdb()
        else:
            broker = sqlite3.connect(faults.service.workdir / "var" / "broker.sqlite")
            with broker:
                broker.execute("DELETE FROM kombu_message")
            broker.close()
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
    started = time.monotonic()
    wait_until(lambda: all(faults.exported(uid) for uid in study_uids), 180,
               what="the sweeper to publish the lost messages again")
    _recovered(f"broker emptied with 3 studies queued, {faults.backend}", started)
    faults.assert_one_current_result_set_in_pacs(*study_uids)


def test_a_poison_study_fails_after_the_cap_and_the_others_pass(faults):
    poison_uid = fx.uid("fault-study", "poison")
    stop = threading.Event()
    kills: list[int] = []

    def poison() -> None:
        # A study whose processing kills its worker, every time: what a decoder crash or an
        # out-of-memory kill does. The model process holding its job dies the moment it starts it.
        while not stop.is_set():
            holder = faults.running_job_holder(poison_uid)
            if holder and holder not in kills:
                faults.kill9([holder])
                kills.append(holder)
            time.sleep(0.01)

    killer = threading.Thread(target=poison, daemon=True)
    killer.start()
    try:
        started = time.monotonic()
        assert faults.send(faults.study("poison", images=2)) == poison_uid
        healthy = faults.send(faults.study("healthy"))

        def poison_failed():
            detail = faults.service.study(poison_uid)
            return detail["status"] == "FAILED" and detail

        detail = wait_until(poison_failed, 240, what="the poison study to end FAILED")
    finally:
        stop.set()
        killer.join(5)
    _recovered(f"poison study ended FAILED after {len(kills)} lost workers, {faults.backend}", started)
    assert "worker lost 3 times" in detail["status_reason"], detail["status_reason"]
    assert len(kills) == 3 and detail["results"] == []
    assert orthanc_post_find(faults.orthanc, poison_uid) == []
    if faults.backend == "postgresql+redis":  # one solo model process: serve itself started it again
        assert faults.service.log_text().count("worker exited with -9") == 3
    wait_until(lambda: faults.exported(healthy), 180, what="the healthy study to pass")
    faults.assert_one_current_result_set_in_pacs(healthy)


def test_pacs_down_longer_than_the_old_retry_schedule_then_back(faults):
    faults.orthanc.stop()
    try:
        study_uid = faults.send(faults.study("pacs-down"))
        wait_until(lambda: faults.service.study(study_uid)["status"] == "DONE", 120, what="the analysis")
        time.sleep(65)  # the old Celery retries gave up after about 62 s
        (export,) = faults.service.study(study_uid)["exports"]
        assert export["status"] == "EXPORT_PENDING" and export["attempts"] >= 5, export
    finally:
        faults.orthanc.start()
    started = time.monotonic()
    wait_until(lambda: faults.exported(study_uid), 60, what="the export once the PACS is back")
    _recovered(f"PACS back after 65 s down, {faults.backend}", started)
    faults.assert_one_current_result_set_in_pacs(study_uid)
