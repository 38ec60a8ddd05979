"""Engine and session factory. SQLite (embedded default) and PostgreSQL (production)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.orm import Session, sessionmaker


def make_engine(database_url: str) -> Engine:
    if database_url.startswith("sqlite"):
        url = make_url(database_url)
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(database_url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record) -> None:  # pragma: no cover - trivial
            cursor = dbapi_connection.cursor()
            # WAL lets the node, the worker and the API read and write at once.
            cursor.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed row survives power loss (NORMAL may roll back the last commits),
            # because the node answers 0x0000 only after the commit.
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    return create_engine(database_url, pool_pre_ping=True)


class Database:
    """Owns an engine and hands out sessions that commit or roll back as a unit."""

    def __init__(self, database_url: str, audit_sink: Callable | None = None) -> None:
        """``audit_sink`` receives each committed batch of audit events (the syslog copy)."""
        self.url = database_url
        self.engine = make_engine(database_url)
        info = {"cxr_triage.audit.sink": audit_sink} if audit_sink is not None else {}
        self._factory = sessionmaker(self.engine, expire_on_commit=False, info=info)

    @contextmanager
    def session(self) -> Iterator[Session]:
        session = self._factory()
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def dispose(self) -> None:
        self.engine.dispose()
