"""Association policy: who may connect, how many at once, and the record of every refusal.

`Admission` decides at accept time, before a byte is read: the source network
allow-list, then the association limits in all and per source address. The
AE title checks (strict Called AE Title, the Calling AE allow-list) need the
A-ASSOCIATE-RQ and are pynetdicom's (`scp.build_ae`), reported through
`handlers.handle_rejected`.

`RefusalLog` writes each refusal as a log line and an ASSOCIATION_REJECTED or
ASSOCIATION_ABORTED audit event (source address, AE titles, reason: never
patient data) from a background thread, so that a refusal never waits on the
database, and at most once a minute per source and reason, so that a flood of
connections cannot flood the log or the audit trail: the next event counts
what was left out.
"""

from __future__ import annotations

import ipaddress
import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from triage_core import audit, metrics
from triage_core.db import Database
from triage_core.states import AuditAction, AuditOutcome

from .batching import take_batch

log = logging.getLogger(__name__)
ACTOR = audit.SYSTEM_ACTORS["node"]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class RefusalKind(StrEnum):
    NETWORK_NOT_ALLOWED = "network-not-allowed"
    TOO_MANY_ASSOCIATIONS = "too-many-associations"
    TOO_MANY_FROM_SOURCE = "too-many-from-source"


@dataclass(frozen=True)
class Refusal:
    kind: RefusalKind
    reason: str

    @property
    def answers_with_reject(self) -> bool:
        """Limits get an A-ASSOCIATE-RJ (transient, local limit exceeded) so that the peer retries
        later; a source outside the allowed networks gets its connection closed unanswered."""
        return self.kind is not RefusalKind.NETWORK_NOT_ALLOWED


def source_address(client_address: Any) -> str:
    """The peer's IP address as text; IPv4-mapped IPv6 addresses become IPv4."""
    host = client_address[0] if isinstance(client_address, tuple) else str(client_address)
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return str(address.ipv4_mapped)
    return str(address)


class Admission:
    """Counts the connections in progress and decides on new ones. Thread-safe."""

    def __init__(self, *, networks: list[IPNetwork], max_total: int, max_per_source: int) -> None:
        if max_total < 1 or max_per_source < 1:
            raise ValueError("association limits must be at least 1")
        self.networks = list(networks)
        self.max_total = max_total
        self.max_per_source = max_per_source
        self._lock = threading.Lock()
        self._by_source: Counter[str] = Counter()
        self._total = 0

    def admit(self, source: str) -> Refusal | None:
        """None (and the connection counted) when `source` may open one more; else why not."""
        if self.networks and not self._in_allowed_network(source):
            return Refusal(RefusalKind.NETWORK_NOT_ALLOWED, f"source {source} is not in the allowed networks")
        with self._lock:
            if self._total >= self.max_total:
                return Refusal(RefusalKind.TOO_MANY_ASSOCIATIONS,
                               f"{self._total} associations in progress, the limit is {self.max_total}")
            if self._by_source[source] >= self.max_per_source:
                return Refusal(RefusalKind.TOO_MANY_FROM_SOURCE,
                               f"{self._by_source[source]} associations from {source} in progress, "
                               f"the limit per source is {self.max_per_source}")
            self._by_source[source] += 1
            self._total += 1
        return None

    def release(self, source: str) -> None:
        with self._lock:
            if self._by_source[source] > 0:
                self._by_source[source] -= 1
                self._total -= 1
                if not self._by_source[source]:
                    del self._by_source[source]

    @property
    def in_progress(self) -> int:
        with self._lock:
            return self._total

    def _in_allowed_network(self, source: str) -> bool:
        try:
            address = ipaddress.ip_address(source)
        except ValueError:
            return False
        return any(address.version == network.version and address in network for network in self.networks)


class RefusalLog:
    """Log lines and audit events for refused or aborted associations, throttled per source and reason."""

    WINDOW = 60.0
    QUEUE_LIMIT = 1000

    def __init__(self, database: Database | None) -> None:
        self.database = database
        self._queue: queue.Queue = queue.Queue(maxsize=self.QUEUE_LIMIT)
        self._lock = threading.Lock()
        self._windows: dict[tuple[str, str, str], tuple[float, int]] = {}
        self._dropped = 0
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._pending = 0
        self._written = threading.Condition()

    def rejected(self, reason: str, *, kind: str, source: str, **detail: Any) -> None:
        """An association refused before it was established."""
        metrics.node().associations_rejected.inc()
        self._report(AuditAction.ASSOCIATION_REJECTED, reason, kind=kind, source=source, **detail)

    def aborted(self, reason: str, *, kind: str, source: str, **detail: Any) -> None:
        """An association or connection ended by us because the peer broke a bound."""
        self._report(AuditAction.ASSOCIATION_ABORTED, reason, kind=kind, source=source, **detail)

    def _report(self, action: AuditAction, reason: str, *, kind: str, source: str, **detail: Any) -> None:
        now = time.monotonic()
        key = (str(action), kind, source)
        with self._lock:
            started, left_out = self._windows.get(key, (0.0, 0))
            if started and now - started < self.WINDOW:
                self._windows[key] = (started, left_out + 1)
                return
            self._windows[key] = (now, 0)
            if len(self._windows) > 10_000:  # many sources: forget the old windows
                self._windows = {k: v for k, v in self._windows.items() if now - v[0] < self.WINDOW}
        verb = "refused" if action is AuditAction.ASSOCIATION_REJECTED else "aborted"
        extra = f" ({left_out} more like it in the last minute not logged)" if left_out else ""
        names = " ".join(f"{k}={v}" for k, v in detail.items() if v not in ("", None))
        log.warning("association from %s %s (%s): %s%s%s", source, verb, kind, reason,
                    f" [{names}]" if names else "", extra)
        if self.database is None:
            return
        event = dict(detail, kind=kind, source=source, reason=reason)
        if left_out:
            event["left_out_since_last"] = left_out
        with self._written:
            self._pending += 1
        try:
            self._queue.put_nowait((action, event))
        except queue.Full:
            self._dropped += 1
            self._done(1)
            return
        self._ensure_thread()

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None and not self._stopped:
                self._thread = threading.Thread(target=self._run, name="refusal-audit", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = take_batch(self._queue, item, 100)
            try:
                assert self.database is not None
                with self.database.session() as session:
                    for action, event in batch:
                        if self._dropped:
                            event["audit_queue_overflowed"] = self._dropped
                            self._dropped = 0
                        # The peer is the actor of a security alert (PS3.15 A.5.3.11), named by AE title and
                        # address only: no patient data reaches this far.
                        peer = f"dicom:{event.get('calling_ae_title') or '?'}@{event.get('source') or '?'}"
                        audit.record(session, actor=peer[:128], action=action, outcome=AuditOutcome.MINOR_FAILURE,
                                     client_address=str(event.get("source") or ""), **event)
            except Exception:
                log.exception("audit of %d refused association(s) could not be written", len(batch))
            self._done(len(batch))

    def _done(self, count: int) -> None:
        with self._written:
            self._pending -= count
            self._written.notify_all()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until what was reported so far is written (tests, shutdown). False on timeout."""
        with self._written:
            return self._written.wait_for(lambda: self._pending <= 0, timeout)

    def close(self) -> None:
        with self._lock:
            self._stopped = True
            thread = self._thread
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout=10)
