"""How long a worklist page takes with many studies: the SQL of dashboard_api.crud.list_worklist alone, and
GET /worklist through the whole app (authentication, the page, its top findings and exports, the
READ_WORKLIST audit event and its hash chain, JSON). Prints p50/p95/max per case (and writes JSON with --json).

    python bench/worklist_bench.py --database-url postgresql+psycopg2://postgres@127.0.0.1:5432/DB --n 1000000
    python bench/worklist_bench.py --n 100000            # SQLite file in a temporary directory

The database must be empty (a throwaway one: --create makes and drops one on the local PostgreSQL).
Studies are spread over a year with the level mix below; --read-fraction of them (the oldest) are
marked read, as in a deployment where radiologists read their worklist (0 = every study waiting,
the worst case for the query). Flagged studies get one present finding each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from sqlalchemy import text  # noqa: E402

from dashboard_api import crud  # noqa: E402
from triage_core.db import Database  # noqa: E402
from triage_core.models import Base  # noqa: E402
from triage_core.priority import WorklistPolicy  # noqa: E402
from triage_core.settings import Settings  # noqa: E402

#: (level, share of studies): mostly nothing flagged and routine, few critical.
MIX = [(-1, 0.01), (0, 0.40), (1, 0.10), (2, 0.25), (3, 0.05), (4, 0.15), (5, 0.04)]
FINDING = {1: "Hernia", 2: "Nodule", 4: "Effusion", 5: "Pneumothorax"}
URGENCY = {1: "minor", 2: "routine", 4: "urgent", 5: "critical"}
CHUNK = 50_000


def _level_case(column: str) -> str:
    """SQL mapping a uniform random number in [0, 1) to a level with the shares of MIX (one draw per row:
    random() in each WHEN would draw again)."""
    parts, edge = [], 0.0
    for level, share in MIX[:-1]:
        edge += share
        parts.append(f"WHEN {column} < {edge:.4f} THEN {level}")
    return f"CASE {' '.join(parts)} ELSE {MIX[-1][0]} END"


def seed_postgresql(database: Database, n: int, read_fraction: float) -> None:
    with database.engine.begin() as connection:
        for start in range(0, n, CHUNK):
            stop = min(n, start + CHUNK)
            # g / n spreads arrivals evenly over a year, oldest first; the oldest read_fraction are read.
            connection.execute(text(f"""
                INSERT INTO studies (study_instance_uid, accession_number, patient_id, patient_name, study_date,
                    study_description, status, status_reason, received_at, last_instance_at, updated_at, model_name,
                    model_version, model_demo, priority_level, priority_detail, waiting_since, read_at, read_by)
                SELECT '2.25.' || g, 'ACC' || g, 'P' || (g % 50000), 'Bench^Patient', '20260101', 'XR CHEST',
                       CASE WHEN lvl = 3 THEN 'SKIPPED' WHEN lvl = -1 THEN 'READY' ELSE 'DONE' END, '',
                       t, t, t, 'bench', '1', false, lvl, '{{}}'::json, t,
                       CASE WHEN g < :read_below THEN t + interval '30 minutes' END,
                       CASE WHEN g < :read_below THEN 'bench' ELSE '' END
                FROM (SELECT g, t, {_level_case('r')} AS lvl
                      FROM (SELECT g, now() - (1 - g::float / :n) * interval '365 days' AS t, random() AS r
                            FROM generate_series(:start, :stop - 1) AS g) AS drawn) AS s"""),
                {"n": n, "start": start, "stop": stop, "read_below": int(n * read_fraction)})
        connection.execute(text("""
            INSERT INTO findings (study_id, sop_instance_uid, finding, probability, threshold, present, urgency)
            SELECT id, study_instance_uid || '.1', CASE priority_level WHEN 1 THEN 'Hernia' WHEN 2 THEN 'Nodule'
                   WHEN 4 THEN 'Effusion' ELSE 'Pneumothorax' END, 0.8, 0.5, true,
                   CASE priority_level WHEN 1 THEN 'minor' WHEN 2 THEN 'routine' WHEN 4 THEN 'urgent' ELSE 'critical' END
            FROM studies WHERE priority_level IN (1, 2, 4, 5)"""))
    with database.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("VACUUM ANALYZE studies"))
        connection.execute(text("VACUUM ANALYZE findings"))


def seed_sqlite(database: Database, n: int, read_fraction: float) -> None:
    import random

    rng = random.Random(1)
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    levels = [level for level, _ in MIX]
    weights = [share for _, share in MIX]
    with database.engine.begin() as connection:
        for start in range(0, n, CHUNK):
            rows, findings = [], []
            for g in range(start, min(n, start + CHUNK)):
                t = now - timedelta(days=365) * (1 - g / n)
                level = rng.choices(levels, weights)[0]
                read = g < n * read_fraction
                rows.append({"id": g + 1, "uid": f"2.25.{g}", "acc": f"ACC{g}", "pid": f"P{g % 50000}", "t": t,
                             "status": "SKIPPED" if level == 3 else "READY" if level == -1 else "DONE",
                             "level": level, "read_at": t + timedelta(minutes=30) if read else None,
                             "read_by": "bench" if read else ""})
                if level in FINDING:
                    findings.append({"id": g + 1, "sop": f"2.25.{g}.1", "finding": FINDING[level],
                                     "urgency": URGENCY[level]})
            connection.execute(text(
                "INSERT INTO studies (id, study_instance_uid, accession_number, patient_id, patient_name, study_date, "
                "study_description, status, status_reason, received_at, last_instance_at, updated_at, model_name, "
                "model_version, model_demo, priority_level, priority_detail, waiting_since, read_at, read_by) VALUES "
                "(:id, :uid, :acc, :pid, 'Bench^Patient', '20260101', 'XR CHEST', :status, '', :t, :t, :t, 'bench', "
                "'1', 0, :level, '{}', :t, :read_at, :read_by)"), rows)
            if findings:
                connection.execute(text(
                    "INSERT INTO findings (study_id, sop_instance_uid, finding, probability, threshold, present, "
                    "urgency) VALUES (:id, :sop, :finding, 0.8, 0.5, 1, :urgency)"), findings)
        connection.execute(text("ANALYZE"))


CASES = {
    "page 1 (50), all studies": {},
    "page 1 (50), waiting only": {"read": False},
    "page 21 (offset 1000)": {"offset": 1000},
    "status FAILED/SKIPPED": {"statuses": ["SKIPPED", "FAILED"]},
    "finding Pneumothorax (critical)": {"finding": "Pneumothorax"},
    "finding Nodule (routine)": {"finding": "Nodule"},
    "received in the last 24 h": {"received_from": "24h"},
}


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"p50_ms": statistics.median(ordered) * 1000, "p95_ms": ordered[int(0.95 * (len(ordered) - 1))] * 1000,
            "max_ms": ordered[-1] * 1000}


def _time_query(database: Database, policy: WorklistPolicy, case: dict, repeat: int) -> dict[str, float]:
    samples = []
    for _ in range(repeat):
        now = datetime.now(timezone.utc)
        filters = dict(case)
        offset = filters.pop("offset", 0)
        if filters.get("received_from") == "24h":
            filters["received_from"] = now - timedelta(hours=24)
        start = time.perf_counter()
        with database.session() as session:
            crud.list_worklist(session=session, policy=policy, now=now, limit=50, offset=offset, **filters)
        samples.append(time.perf_counter() - start)
    return _percentiles(samples)


def _time_http(database: Database, url: str, case: dict, repeat: int) -> dict[str, float]:
    from fastapi.testclient import TestClient

    from dashboard_api.app import create_app
    from triage_core.states import Role
    from triage_core.users import create_user

    with database.session() as session:
        key = create_user(session, name=f"bench-{uuid.uuid4().hex[:8]}", role=Role.RADIOLOGIST, actor="cli:bench").key
    params: list[tuple[str, str]] = [("limit", "50"), ("offset", str(case.get("offset", 0)))]
    params += [("status", s) for s in case.get("statuses", [])]
    if "read" in case:
        params.append(("read", str(case["read"]).lower()))
    if "finding" in case:
        params.append(("finding", case["finding"]))
    if case.get("received_from") == "24h":
        params.append(("received_from", (datetime.now(timezone.utc) - timedelta(hours=24)).isoformat()))
    samples = []
    settings = Settings(database_url=url, data_dir=Path(tempfile.mkdtemp()))
    with TestClient(create_app(settings, database), headers={"Authorization": f"Bearer {key}"}) as client:
        client.get("/worklist", params=params)
        for _ in range(repeat):
            start = time.perf_counter()
            response = client.get("/worklist", params=params)
            samples.append(time.perf_counter() - start)
            assert response.status_code == 200, response.text
    return _percentiles(samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", default="")
    parser.add_argument("--create", action="store_true", help="make (and drop) a database on local PostgreSQL")
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--read-fraction", type=float, default=0.0)
    parser.add_argument("--repeat", type=int, default=100)
    parser.add_argument("--json", default="")
    args = parser.parse_args()

    admin, url = None, args.database_url
    if args.create:
        import psycopg2

        name = f"cxr_bench_{uuid.uuid4().hex[:10]}"
        admin = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres")
        admin.autocommit = True
        admin.cursor().execute(f'CREATE DATABASE "{name}"')
        url = f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"
    if not url:
        url = f"sqlite:///{Path(tempfile.mkdtemp()) / 'bench.sqlite'}"
    database = Database(url)
    try:
        Base.metadata.create_all(database.engine)
        start = time.perf_counter()
        (seed_postgresql if database.engine.dialect.name == "postgresql" else seed_sqlite)(
            database, args.n, args.read_fraction)
        print(f"seeded {args.n:,} studies ({args.read_fraction:.0%} read) into {database.engine.dialect.name} "
              f"in {time.perf_counter() - start:.0f} s")
        policy = WorklistPolicy.from_minutes()
        results = {}
        for name, case in CASES.items():
            query = _time_query(database, policy, case, args.repeat)
            http = _time_http(database, url, case, args.repeat)
            results[name] = {"query": query, "http": http}
            print(f"{name:32s} query p50 {query['p50_ms']:6.1f} p95 {query['p95_ms']:6.1f} max {query['max_ms']:6.1f} ms"
                  f" | GET /worklist p50 {http['p50_ms']:6.1f} p95 {http['p95_ms']:6.1f} max {http['max_ms']:6.1f} ms")
        if args.json:
            Path(args.json).write_text(json.dumps({"n": args.n, "read_fraction": args.read_fraction,
                                                   "dialect": database.engine.dialect.name, "cases": results},
                                                  indent=2))
    finally:
        database.dispose()
        if admin is not None:
            cursor = admin.cursor()
            cursor.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
                           "AND pid <> pg_backend_pid()", (name,))
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}"')
            admin.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
