"""The processes' own Prometheus metrics (triage_core.metrics)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_RACE = textwrap.dedent("""
    import sys, threading
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can: the race shows at once
    from triage_core import metrics
    made, errors = [], []
    barrier = threading.Barrier(8)

    def first_use():
        barrier.wait()
        try:
            made.append((metrics.node(), metrics.worker()))
        except Exception as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=first_use) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len({id(n) for n, _ in made}) == 1 and len({id(w) for _, w in made}) == 1
    print("ok")
""")


def test_metrics_made_by_many_threads_at_once_are_made_once() -> None:
    """Two associations' first C-STOREs in a fresh receiving process used to make the node's metrics
    twice; the second registration raised DuplicateTimeseries and the C-STORE was answered 0xC211."""
    for _ in range(3):  # a fresh interpreter (registry) each time
        run = subprocess.run([sys.executable, "-c", _RACE], capture_output=True, text=True, timeout=60,
                             cwd=ROOT, env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})
        assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]
