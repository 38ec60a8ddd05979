"""Readiness: what must hold for the service to do its work, checked, never assumed.

One function per check, each answering ``ok``, ``degraded`` (working, but a person should look)
or ``fail`` (the service cannot do its work), with a one-line detail free of patient data. The
API's ``/health/ready`` and ``cxr-triage health`` both call :func:`readiness`.

| check | fail | degraded |
|---|---|---|
| database | ``SELECT 1`` fails | |
| broker | no connection within the timeout | |
| workers | no model worker reported in the last 3 heartbeats with its model loaded | |
| nodes | no DICOM node reported in the last 3 heartbeats | |
| disk | less than ``min_free_disk_mb`` free under the data directory | |
| exports | | an export waited longer than ``export_backlog_minutes``, or gave up |

The worker and the node report through heartbeat rows (``triage_core.work.beat``), written by
:class:`HeartbeatThread`; a model that failed to load is reported with its reason.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Literal

from sqlalchemy import func, select, text

from . import work
from .db import Database
from .models import Export
from .settings import Settings
from .states import ExportStatus

log = logging.getLogger(__name__)

Status = Literal["ok", "degraded", "fail"]
#: A heartbeat older than this many intervals is a process that is gone or stuck.
HEARTBEATS_MISSED = 3
BROKER_TIMEOUT_SECONDS = 3.0


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    data: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Readiness:
    checks: tuple[Check, ...]

    @property
    def status(self) -> str:
        """``ready``, ``degraded`` or ``not_ready``."""
        statuses = {check.status for check in self.checks}
        return "not_ready" if "fail" in statuses else "degraded" if "degraded" in statuses else "ready"

    @property
    def ready(self) -> bool:
        return self.status != "not_ready"


def _first_line(exc: BaseException) -> str:
    original = getattr(exc, "orig", None) or exc
    lines = str(original).strip().splitlines()
    return f"{type(original).__name__}: {lines[0] if lines else 'error'}"[:300]


def check_database(database: Database) -> Check:
    try:
        with database.session() as session:
            session.execute(text("SELECT 1"))
    except Exception as exc:  # any driver error is the answer
        return Check("database", "fail", _first_line(exc))
    return Check("database", "ok", f"{database.engine.dialect.name} answers")


def check_broker(broker_url: str, timeout: float = BROKER_TIMEOUT_SECONDS) -> Check:
    """A connection to the broker (kombu, as Celery uses it)."""
    from kombu import Connection

    scheme = broker_url.split("://", 1)[0]
    try:
        with Connection(broker_url, connect_timeout=timeout,
                        transport_options={"socket_timeout": timeout, "socket_connect_timeout": timeout}) as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=timeout)
    except Exception as exc:
        return Check("broker", "fail", f"{scheme}: {_first_line(exc)}")
    return Check("broker", "ok", f"{scheme} answers")


def _max_age(settings: Settings) -> timedelta:
    return timedelta(seconds=HEARTBEATS_MISSED * settings.heartbeat_seconds)


def check_workers(database: Database, settings: Settings, now: datetime | None = None) -> Check:
    """At least one model worker process alive with its model loaded."""
    try:
        with database.session() as session:
            beats = work.live_heartbeats(session, "worker", _max_age(settings), now)
    except Exception as exc:
        return Check("workers", "fail", f"heartbeats cannot be read: {_first_line(exc)}")
    loaded = [b for b in beats if b.model_loaded]
    rows = [{"holder": b.holder, "model": f"{b.model_name} {b.model_version}".strip(), "runtime": b.model_runtime,
             "device": b.model_device, "model_loaded": b.model_loaded, "error": b.model_error,
             "seen_at": b.seen_at.isoformat(timespec="seconds")} for b in beats]
    if loaded:
        first = loaded[0]
        return Check("workers", "ok", f"{len(loaded)} model process(es) ready ({first.model_name} "
                                      f"{first.model_version}, {first.model_runtime} on {first.model_device})",
                     {"processes": rows})
    if beats:
        return Check("workers", "fail", f"{len(beats)} model process(es) alive, none with its model loaded: "
                                        f"{beats[0].model_error or 'still loading'}"[:500], {"processes": rows})
    return Check("workers", "fail", f"no model worker reported in the last {_max_age(settings).total_seconds():g} s",
                 {"processes": []})


def check_nodes(database: Database, settings: Settings, now: datetime | None = None) -> Check:
    try:
        with database.session() as session:
            beats = work.live_heartbeats(session, "node", _max_age(settings), now)
    except Exception as exc:
        return Check("nodes", "fail", f"heartbeats cannot be read: {_first_line(exc)}")
    if not beats:
        return Check("nodes", "fail", f"no DICOM node reported in the last {_max_age(settings).total_seconds():g} s")
    return Check("nodes", "ok", f"{len(beats)} DICOM node(s) alive", {"nodes": [b.holder for b in beats]})


def check_disk(path: Path, min_free_mb: int) -> Check:
    try:
        usage = shutil.disk_usage(path)
    except OSError as exc:
        return Check("disk", "fail", f"{path}: {_first_line(exc)}")
    free_mb = usage.free // (1 << 20)
    data = {"path": str(path), "free_bytes": usage.free, "total_bytes": usage.total}
    if free_mb < min_free_mb:
        return Check("disk", "fail", f"{free_mb} MiB free under the data directory, below the {min_free_mb} MiB "
                                     "watermark (CXR_TRIAGE_MIN_FREE_DISK_MB)", data)
    return Check("disk", "ok", f"{free_mb} MiB free", data)


def check_exports(database: Database, settings: Settings, now: datetime | None = None) -> Check:
    now = now or datetime.now(timezone.utc)
    try:
        with database.session() as session:
            pending, oldest = session.execute(
                select(func.count(Export.id), func.min(Export.pending_since))
                .where(Export.status == str(ExportStatus.EXPORT_PENDING))
            ).one()
            failed = session.scalar(select(func.count(Export.id)).where(Export.status == str(ExportStatus.EXPORT_FAILED)))
    except Exception as exc:
        return Check("exports", "fail", f"exports cannot be read: {_first_line(exc)}")
    if oldest is not None and oldest.tzinfo is None:
        oldest = oldest.replace(tzinfo=timezone.utc)
    age = (now - oldest).total_seconds() if oldest is not None else 0.0
    data = {"pending": int(pending), "failed": int(failed or 0), "oldest_pending_seconds": round(age, 1)}
    problems = []
    if failed:
        problems.append(f"{failed} export(s) gave up (EXPORT_FAILED; cxr-triage export retry --failed)")
    if age > settings.export_backlog_minutes * 60:
        problems.append(f"{pending} export(s) pending, the oldest for {age / 60:.0f} min")
    if problems:
        return Check("exports", "degraded", "; ".join(problems), data)
    return Check("exports", "ok", f"{pending} export(s) pending", data)


def readiness(settings: Settings, database: Database, now: datetime | None = None) -> Readiness:
    return Readiness((
        check_database(database),
        check_broker(settings.broker_url),
        check_workers(database, settings, now),
        check_nodes(database, settings, now),
        check_disk(settings.data_dir, settings.min_free_disk_mb),
        check_exports(database, settings, now),
    ))


class HeartbeatThread:
    """Renews this process's heartbeat row every `interval` seconds until stopped (then removes it).

    ``describe()`` returns ``(model, error)``: the loaded model's {name, version, runtime, device}
    or None, and why it is not loaded. A database that is away for a moment is tried again.
    """

    def __init__(self, database: Database, service: str, interval: float, version: str = "",
                 describe: Callable[[], tuple[dict | None, str]] | None = None) -> None:
        self.database, self.service, self.interval, self.version = database, service, interval, version
        self.describe = describe or (lambda: (None, ""))
        self.holder = work.holder_id()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat {service}", daemon=True)

    def beat(self) -> None:
        model, error = self.describe()
        with self.database.session() as session:
            work.beat(session, holder=self.holder, service=self.service, version=self.version, model=model,
                      model_error=error)

    def start(self) -> "HeartbeatThread":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        try:
            with self.database.session() as session:
                work.forget_heartbeat(session, self.holder)
        except Exception:  # the row goes stale instead
            log.warning("heartbeat of %s could not be removed", self.holder, exc_info=True)

    def _run(self) -> None:
        while True:
            try:
                self.beat()
            except Exception:
                log.warning("heartbeat of %s failed; trying again", self.holder, exc_info=True)
            if self._stop.wait(self.interval):
                return
