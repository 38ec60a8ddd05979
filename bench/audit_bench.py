"""What the audit hash chain costs: commits per second with and without an audit event, one and several
writer processes, and `audit verify`'s rate. Prints numbers (and writes JSON with --json).

    python bench/audit_bench.py [--database-url postgresql+psycopg2://...] [--n 500] [--writers 4]

Without --database-url it uses a SQLite file in a temporary directory (synchronous=FULL, as the service).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from sqlalchemy import select  # noqa: E402

from triage_core import audit  # noqa: E402

try:
    from triage_core import audit_chain  # noqa: E402
except ImportError:  # the code before the chain (PYTHONPATH=<old checkout>/src): the same bench as a baseline
    audit_chain = None
from triage_core.db import Database  # noqa: E402
from triage_core.models import Base, Study  # noqa: E402
from triage_core.states import AuditAction, StudyStatus  # noqa: E402


def _transactions(url: str, n: int, with_event: bool, barrier=None) -> float:
    """n transactions like the node's C-STORE: touch the study row, and (with_event) one audit event."""
    database = Database(url)
    if barrier is not None:
        barrier.wait()
    start = time.perf_counter()
    for i in range(n):
        with database.session() as session:
            study = session.scalar(select(Study).where(Study.study_instance_uid == "1.2.826.0.1.3680043.8.498.1"))
            study.status_reason = f"bench {i}"
            if with_event:
                audit.record(session, actor="system:dicom_node", action=AuditAction.INSTANCE_RECEIVED, study=study,
                             sop_instance_uid=f"1.2.826.0.1.3680043.8.498.1.{i}", calling_ae_title="BENCH",
                             size_bytes=1234567)
    elapsed = time.perf_counter() - start
    database.dispose()
    return elapsed


def _worker(url, n, barrier, out):
    out.put(_transactions(url, n, True, barrier))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", default="")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    tmp = tempfile.TemporaryDirectory()
    url = args.database_url or f"sqlite:///{tmp.name}/bench.sqlite"
    database = Database(url)
    if args.database_url:
        if audit_chain is not None:
            with database.engine.begin() as connection:
                audit_chain.uninstall(connection)
        Base.metadata.drop_all(database.engine)
    Base.metadata.create_all(database.engine)
    with database.session() as session:
        session.add(Study(study_instance_uid="1.2.826.0.1.3680043.8.498.1", status=str(StudyStatus.RECEIVING)))

    results: dict[str, float] = {}
    without = [args.n / _transactions(url, args.n, False) for _ in range(args.rounds)]
    with_event = [args.n / _transactions(url, args.n, True) for _ in range(args.rounds)]
    results["commits_per_s_without_audit"] = statistics.median(without)
    results["commits_per_s_with_audit_event"] = statistics.median(with_event)
    per = args.n // args.writers
    context = multiprocessing.get_context("spawn")
    barrier, out = context.Barrier(args.writers), context.Queue()
    processes = [context.Process(target=_worker, args=(url, per, barrier, out)) for _ in range(args.writers)]
    for p in processes:
        p.start()
    elapsed = [out.get() for _ in processes]  # each from the barrier on: all writing at once
    for p in processes:
        p.join()
    results[f"commits_per_s_with_audit_event_{args.writers}_processes"] = per * args.writers / max(elapsed)
    if audit_chain is not None:
        with database.session() as session:
            start = time.perf_counter()
            verification = audit_chain.verify(session)
            seconds = time.perf_counter() - start
        assert verification.intact, verification.problem
        results["events_in_chain"] = verification.events
        results["verify_events_per_s"] = verification.events / seconds
    database.dispose()
    backend = "postgresql" if url.startswith("postgresql") else "sqlite"
    print(f"backend: {backend}")
    print(f"  commits/s, study row only:          {results['commits_per_s_without_audit']:8.1f}")
    print(f"  commits/s, study row + audit event: {results['commits_per_s_with_audit_event']:8.1f} "
          f"({results['commits_per_s_with_audit_event'] / results['commits_per_s_without_audit']:.2f}x)")
    print(f"  same, {args.writers} writer processes at once:   "
          f"{results[f'commits_per_s_with_audit_event_{args.writers}_processes']:8.1f}")
    if audit_chain is not None:
        print(f"  audit verify: {results['verify_events_per_s']:.0f} events/s over {results['events_in_chain']} "
              "events (chain intact)")
    else:
        print("  (no hash chain in this checkout)")
    if args.json:
        args.json.write_text(json.dumps({"backend": backend, **results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
