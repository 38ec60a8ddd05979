"""Holding a lease while working: a thread that renews it, for a bounded time."""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from sqlalchemy.orm import Session

from triage_core.db import Database
from triage_core.work import WorkPolicy

log = logging.getLogger(__name__)


class LeaseKeeper:
    """Renews a lease every third of its length while the work runs, for at most
    `policy.max_job`: work that hangs longer loses its lease, and the sweeper gives it to
    another worker. `renew(session)` returns False once the lease was taken back."""

    def __init__(self, database: Database, renew: Callable[[Session], bool], policy: WorkPolicy, what: str) -> None:
        self.database, self.renew, self.policy, self.what = database, renew, policy, what
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease {what}", daemon=True)

    def __enter__(self) -> "LeaseKeeper":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        interval = self.policy.lease.total_seconds() / 3
        deadline = time.monotonic() + self.policy.max_job.total_seconds()
        while not self._stop.wait(interval):
            if time.monotonic() > deadline:
                log.error("%s has run longer than %s: no longer renewing its lease", self.what, self.policy.max_job)
                return
            try:
                with self.database.session() as session:
                    renewed = self.renew(session)
                if not renewed:
                    if not self._stop.is_set():  # (a lease released by finishing is not taken back)
                        log.warning("%s: its lease was taken back", self.what)
                    return
            except Exception:  # the database is away for a moment: try again next time
                log.warning("renewing the lease of %s failed", self.what, exc_info=True)
