"""The audit trail is append-only and hash-chained, on SQLite and PostgreSQL, under concurrent writers.

Real databases built by the migrations; tampering is done as an attacker with the
database owner's rights would (dropping the triggers first); `cxr-triage audit verify`
must exit 1 and name the first altered, removed or reordered event.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError

from cxr_triage import cli
from cxr_triage.runtime import upgrade_database
from triage_core import audit, audit_chain
from triage_core.db import Database
from triage_core.models import AuditChainHead, AuditEvent, Study
from triage_core.settings import Settings
from triage_core.states import AuditAction, StudyStatus


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'audit.sqlite'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def db(database_url, tmp_path, monkeypatch):
    settings = Settings(data_dir=tmp_path / "var", database_url=database_url)
    upgrade_database(settings)
    monkeypatch.setenv("CXR_TRIAGE_DATABASE_URL", database_url)
    monkeypatch.setenv("CXR_TRIAGE_DATA_DIR", str(tmp_path / "var"))
    database = Database(database_url)
    yield database
    database.dispose()


def write_events(database: Database, n: int, actor: str = "dr.house") -> None:
    with database.session() as session:
        study = Study(study_instance_uid="1.2.3.4", status=str(StudyStatus.RECEIVING), patient_id="PID-7")
        session.add(study)
    for i in range(n):
        with database.session() as session:
            study = session.scalar(select(Study))
            audit.record(session, actor=actor, action=AuditAction.READ_STUDY, study=study, n=i)


def verify_cli(capsys) -> tuple[int, str]:
    rc = cli.main(["audit", "verify"])
    return rc, capsys.readouterr().out


def tamper(database: Database, *statements: str) -> None:
    """What an attacker with the owner's rights does: drop the triggers, then edit."""
    with database.engine.begin() as connection:
        audit_chain.uninstall(connection)
        for statement in statements:
            connection.execute(text(statement))


def test_events_are_chained_and_verify(db, capsys):
    write_events(db, 5)
    with db.session() as session:
        events = session.scalars(select(AuditEvent).order_by(AuditEvent.seq)).all()
        head = session.get(AuditChainHead, 1)
    assert [e.seq for e in events] == [1, 2, 3, 4, 5]
    assert events[0].prev_hash == audit_chain.GENESIS_HASH
    assert all(b.prev_hash == a.hash for a, b in zip(events, events[1:]))
    assert all(audit_chain.event_hash(e) == e.hash for e in events)
    assert (head.seq, head.hash) == (5, events[-1].hash)
    assert events[0].patient_id == "PID-7" and events[0].detail == {"n": 0}
    rc, out = verify_cli(capsys)
    assert rc == 0 and "audit trail intact: 5 events" in out and events[-1].hash in out


def test_update_delete_and_head_rewinds_are_refused(db):
    write_events(db, 2)
    for statement in ("UPDATE audit_events SET actor = 'mallory'", "DELETE FROM audit_events WHERE seq = 2",
                      "DELETE FROM audit_chain_head", "UPDATE audit_chain_head SET seq = 1"):
        with pytest.raises(DBAPIError, match="append-only|cannot be deleted|only moves forward"):
            with db.engine.begin() as connection:
                connection.execute(text(statement))
    if db.engine.dialect.name == "postgresql":
        with pytest.raises(DBAPIError, match="append-only"):
            with db.engine.begin() as connection:
                connection.execute(text("TRUNCATE audit_events"))
    # An insert that does not extend the head (a forged or forked event) is refused too.
    with pytest.raises(DBAPIError, match="does not extend the chain head"):
        with db.engine.begin() as connection:
            connection.execute(text(
                "INSERT INTO audit_events (at, actor, action, study_instance_uid, detail, outcome, client_address, "
                "patient_id, seq, prev_hash, hash) VALUES (CURRENT_TIMESTAMP, 'x', 'READ_STUDY', '', '{}', 0, '', '', "
                f"5, '{audit_chain.GENESIS_HASH}', '{'f' * 64}')"))
    with db.session() as session:
        assert session.scalar(select(func.count()).select_from(AuditEvent)) == 2
        assert audit_chain.verify(session).intact


def test_verify_names_an_altered_event(db, capsys):
    write_events(db, 6)
    tamper(db, "UPDATE audit_events SET actor = 'somebody.else' WHERE seq = 3")
    rc, out = verify_cli(capsys)
    assert rc == 1, out
    assert "BROKEN (altered)" in out and "event seq=3 " in out and "2 events verified before it" in out


def test_verify_names_a_removed_event(db, capsys):
    write_events(db, 6)
    tamper(db, "DELETE FROM audit_events WHERE seq = 4")
    rc, out = verify_cli(capsys)
    assert rc == 1 and "BROKEN (removed)" in out and "seq=4..4 were removed before event seq=5 " in out, out


def test_verify_names_a_removed_and_renumbered_event(db, capsys):
    write_events(db, 6)
    tamper(db, "DELETE FROM audit_events WHERE seq = 2", "UPDATE audit_events SET seq = seq - 1 WHERE seq > 2")
    rc, out = verify_cli(capsys)
    assert rc == 1 and "BROKEN (removed)" in out and "an event was removed before event seq=2 " in out, out


def test_verify_names_a_reordered_event(db, capsys):
    write_events(db, 6)
    tamper(db, "UPDATE audit_events SET seq = 100 WHERE seq = 3", "UPDATE audit_events SET seq = 3 WHERE seq = 4",
           "UPDATE audit_events SET seq = 4 WHERE seq = 100")
    rc, out = verify_cli(capsys)
    assert rc == 1 and "BROKEN (reordered)" in out, out
    assert "event seq=3 " in out and "written after the event now at seq=4 (id 3), not after seq=2" in out, out


def test_verify_names_events_removed_from_the_end(db, capsys):
    write_events(db, 4)
    tamper(db, "DELETE FROM audit_events WHERE seq >= 3")
    rc, out = verify_cli(capsys)
    assert rc == 1 and "seq=3..4 were removed from the end" in out, out


def test_a_rolled_back_transaction_leaves_no_event_and_no_gap(db):
    with pytest.raises(RuntimeError):
        with db.session() as session:
            audit.record(session, actor="x", action=AuditAction.READ_WORKLIST)
            raise RuntimeError("the request failed")
    write_events(db, 1)
    with db.session() as session:
        assert session.scalars(select(AuditEvent.seq)).all() == [1]
        assert audit_chain.verify(session).intact


WRITER = textwrap.dedent("""
    import sys
    from sqlalchemy import select
    from triage_core import audit
    from triage_core.db import Database
    from triage_core.models import Study
    from triage_core.states import AuditAction, StudyStatus

    url, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    database = Database(url)
    for i in range(n):
        with database.session() as session:
            if i % 3 == 0:
                # as the node and the worker do: a study row locked and changed in the same transaction
                study = session.scalars(select(Study).where(Study.study_instance_uid == "1.2.3.4")
                                        .with_for_update()).one()
                audit.set_status(session, study, StudyStatus.RECEIVING, actor=name, reason=str(i))
            elif i % 3 == 1:
                # as the API does: a read, then one event about the study
                study = session.scalars(select(Study)).first()
                audit.record(session, actor=name, action=AuditAction.READ_STUDY, study=study, n=i)
            else:
                audit.record(session, actor=name, action=AuditAction.READ_WORKLIST, n=i)
                audit.record(session, actor=name, action=AuditAction.QUERY, n=i)
    database.dispose()
""")


def test_concurrent_writers_in_several_processes_keep_one_linear_chain(db, database_url):
    with db.session() as session:
        session.add(Study(study_instance_uid="1.2.3.4", status=str(StudyStatus.RECEIVING)))
    writers, per_writer = 4, 30
    processes = [subprocess.Popen([sys.executable, "-c", WRITER, database_url, f"writer{w}", str(per_writer)],
                                  stderr=subprocess.PIPE, text=True) for w in range(writers)]
    for process in processes:
        _, err = process.communicate(timeout=240)
        assert process.returncode == 0, err
    with db.session() as session:
        result = audit_chain.verify(session)
        by_writer = dict(session.execute(select(AuditEvent.actor, func.count()).group_by(AuditEvent.actor)).all())
    assert result.intact, result.problem
    # 30 transactions each: 10 status changes, 10 reads, 10 with two events.
    assert by_writer == {f"writer{w}": per_writer + per_writer // 3 for w in range(writers)}
    assert result.events == result.head_seq == writers * (per_writer + per_writer // 3)


def test_migration_chains_events_written_before_it(tmp_path):
    """Upgrading an 0002 database with audit rows chains them in id order; verify accepts the result."""
    from alembic import command

    from cxr_triage.runtime import alembic_config

    url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    config = alembic_config(url)
    command.upgrade(config, "0002")
    database = Database(url)
    with database.engine.begin() as connection:
        connection.execute(text("INSERT INTO studies (id, study_instance_uid, accession_number, patient_id, "
                                "patient_name, study_date, study_description, status, status_reason, priority, "
                                "received_at, last_instance_at, updated_at, model_name, model_version, model_demo) "
                                "VALUES (1, '1.2.3', '', 'PID-OLD', 'Old^Patient', '', '', 'DONE', '', 0, "
                                "'2024-01-01 00:00:00', '2024-01-01 00:00:00', '2024-01-01 00:00:00', '', '', 0)"))
        for i in range(3):
            connection.execute(text("INSERT INTO audit_events (at, actor, action, study_id, study_instance_uid, "
                                    "detail) VALUES (:at, 'old-user', 'READ_STUDY', 1, '1.2.3', :detail)"),
                               {"at": f"2024-01-0{i + 1} 08:00:00.000000", "detail": f'{{"n": {i}}}'})
    command.upgrade(config, "head")
    write_events(database, 1, actor="new-user")
    with database.session() as session:
        events = session.scalars(select(AuditEvent).order_by(AuditEvent.seq)).all()
        assert [(e.seq, e.actor, e.patient_id) for e in events[:3]] == [(1, "old-user", "PID-OLD"),
                                                                         (2, "old-user", "PID-OLD"),
                                                                         (3, "old-user", "PID-OLD")]
        assert events[3].seq == 4 and events[3].prev_hash == events[2].hash
        assert audit_chain.verify(session).intact
    command.downgrade(config, "0002")  # and back: the downgrade drops the triggers and columns
    database.dispose()
