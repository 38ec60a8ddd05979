"""The worklist's order is the database's: pages from SQL equal the policy applied in Python, on SQLite
and PostgreSQL, at several moments (age escalation moves studies without any row being written), with
every filter; and the query is answered from the worklist indexes, not by reading the table.
"""

from __future__ import annotations

import random
import re
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import event, select

from dashboard_api import crud
from tests.unit.test_api import database_url  # noqa: F401 - the sqlite/postgresql fixture
from triage_core import priority
from triage_core.db import Database
from triage_core.models import Base, Finding, Study
from triage_core.priority import Level, WorklistPolicy

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=timezone.utc)
POLICY = WorklistPolicy.from_minutes()
STATUSES = {Level.AWAITING_ANALYSIS: ["RECEIVING", "READY", "PROCESSING"], Level.NOT_ANALYSED: ["SKIPPED", "FAILED"]}
N = 400


@pytest.fixture
def database(database_url):  # noqa: F811
    db = Database(database_url)
    Base.metadata.create_all(db.engine)
    rng = random.Random(13)
    # Few distinct times, so that ties on waiting_since are common (the id breaks them).
    moments = [NOW - timedelta(minutes=rng.choice([0, 3, 9, 11, 25, 45, 70, 95, 130, 200, 300, 500, 700, 1300]))
               for _ in range(60)]
    with db.session() as session:
        for n in range(N):
            base = rng.choice(list(Level))
            waiting = rng.choice(moments)
            read_at = waiting + timedelta(minutes=rng.randint(1, 30)) if rng.random() < 0.2 else None
            status = rng.choice(STATUSES.get(base, ["DONE"]))
            row = Study(study_instance_uid=f"1.2.3.{n}", accession_number=f"A{n}", status=status,
                        received_at=waiting - timedelta(minutes=rng.choice([0, 0, 0, 60])), waiting_since=waiting,
                        last_instance_at=waiting, priority_level=int(base), read_at=read_at,
                        read_by="dr.house" if read_at else "")
            if base >= Level.MINOR and base != Level.NOT_ANALYSED:
                name = rng.choice(["Effusion", "Nodule", "Hernia", "Pneumothorax"])
                # Whatever the finding, its class is one whose level the base reaches (levels never drop).
                urgency = rng.choice([c for c, level in priority.URGENCY_LEVELS.items() if level <= base])
                row.findings = [Finding(sop_instance_uid=f"1.2.3.{n}.1", finding=name, probability=0.7,
                                        threshold=0.5, present=True, urgency=urgency)]
            session.add(row)
    yield db
    db.dispose()


def _reference(rows: list[Study], now: datetime, read: bool | None) -> list[tuple[str, int]]:
    """The policy of README "Worklist policy" applied in Python: (UID, level) in reading order."""
    waiting = [(priority.standing(r.priority_level, r.waiting_since, now, POLICY).level, r) for r in rows
               if r.read_at is None]
    waiting.sort(key=lambda pair: (-pair[0], pair[1].waiting_since, pair[1].id))
    done = sorted((r for r in rows if r.read_at is not None), key=lambda r: (r.read_at, r.id), reverse=True)
    out = []
    if read is not True:
        out += [(r.study_instance_uid, int(level)) for level, r in waiting]
    if read is not False:
        out += [(r.study_instance_uid, -1) for r in done]
    return out


def _pages(db: Database, now: datetime, limit: int, **filters) -> tuple[list[tuple[str, int]], int]:
    got, offset, count = [], 0, None
    while True:
        with db.session() as session:
            page = crud.list_worklist(session=session, policy=POLICY, now=now, limit=limit, offset=offset, **filters)
        got += [(s.study_instance_uid, level) for s, level in zip(page.studies, page.levels)]
        count = page.count
        assert page.count_exact
        if len(page.studies) < limit:
            return got, count
        offset += limit


@pytest.mark.parametrize("hours_later", [0, 1.5, 5, 30])
def test_pages_from_sql_follow_the_policy_at_every_moment(database, hours_later):
    now = NOW + timedelta(hours=hours_later)
    with database.session() as session:
        rows = list(session.scalars(select(Study)))
    expected = _reference(rows, now, None)
    got, count = _pages(database, now, 37)
    assert got == expected and count == N
    # The SQL's level is the policy's level, study by study.
    assert {level for _, level in got} >= ({-1, 4, 5} if hours_later else {-1, 5})
    if hours_later >= 30:  # everything waiting has reached urgent (or was critical)
        assert {level for _, level in got} == {-1, 4, 5}


@pytest.mark.parametrize(("filters", "keep"), [
    ({"statuses": ["SKIPPED", "FAILED"]}, lambda r: r.status in ("SKIPPED", "FAILED")),
    ({"finding": "Effusion"}, lambda r: any(f.finding == "Effusion" for f in r.findings)),
    ({"received_from": NOW - timedelta(hours=3), "received_to": NOW - timedelta(minutes=10)},
     lambda r: NOW - timedelta(hours=3) <= r.received_at <= NOW - timedelta(minutes=10)),
    ({"read": False}, lambda r: r.read_at is None),
    ({"read": True}, lambda r: r.read_at is not None),
    ({"read": False, "statuses": ["DONE"], "finding": "Nodule"},
     lambda r: r.read_at is None and r.status == "DONE" and any(f.finding == "Nodule" for f in r.findings)),
])
def test_every_filter_keeps_the_order(database, filters, keep):
    now = NOW + timedelta(hours=2)
    with database.session() as session:
        rows = [r for r in session.scalars(select(Study)) if keep(r)]
        for r in rows:
            _ = r.findings
    expected = _reference(rows, now, filters.get("read"))
    got, count = _pages(database, now, 25, **filters)
    assert got == expected and count == len(expected) and expected


def test_the_count_stops_at_its_cap(database, monkeypatch):
    monkeypatch.setattr(crud, "COUNT_CAP", 50)
    with database.session() as session:
        page = crud.list_worklist(session=session, policy=POLICY, now=NOW, limit=10, offset=0)
    assert (page.count, page.count_exact, len(page.studies)) == (50, False, 10)


def test_the_page_is_read_from_the_worklist_indexes(database):
    """Each member of the UNION is a range scan of ix_studies_waiting (or ix_studies_read): the cost of a
    page grows with offset + limit, not with the number of studies (bench/worklist_bench.py measures it)."""
    captured = []

    def capture(conn, cursor, statement, parameters, context, executemany):
        if "UNION ALL" in statement:
            captured.append((statement, parameters))

    event.listen(database.engine, "before_cursor_execute", capture)
    try:
        with database.session() as session:
            crud.list_worklist(session=session, policy=POLICY, now=NOW, limit=50, offset=0)
    finally:
        event.remove(database.engine, "before_cursor_execute", capture)
    [(statement, parameters)] = captured
    with database.engine.connect() as connection:
        if connection.dialect.name == "postgresql":
            # A table this small is cheapest to read whole; forbid that to see whether the indexes serve.
            connection.exec_driver_sql("SET enable_seqscan = off")
            connection.exec_driver_sql("SET enable_bitmapscan = off")
            plan = "\n".join(row[0] for row in connection.exec_driver_sql("EXPLAIN " + statement, parameters))
            assert len(re.findall(r"Index (Only )?Scan using ix_studies_waiting", plan)) == len(Level), plan
            assert re.search(r"Index (Only )?Scan Backward using ix_studies_read", plan), plan
            assert "Seq Scan" not in plan, plan
        else:
            plan = "\n".join(row[-1] for row in connection.exec_driver_sql("EXPLAIN QUERY PLAN " + statement,
                                                                            parameters))
            assert plan.count("ix_studies_waiting") == len(Level), plan
            assert "ix_studies_read" in plan, plan
            assert "SCAN studies\n" not in plan + "\n" and not any(
                line.strip() == "SCAN studies" for line in plan.splitlines()), plan
