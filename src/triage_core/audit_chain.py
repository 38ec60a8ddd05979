"""The audit trail's hash chain: canonical event bytes, the append-only triggers, and verification.

Format ``cxr-audit-v1`` (README "Audit trail"; DESIGN.md section 7):

* Every event row carries ``seq`` (1, 2, 3... in commit order), ``prev_hash`` (the
  ``hash`` of event ``seq - 1``; 64 zeros before the first) and ``hash``.
* ``hash = SHA-256(canonical bytes)``, lower-case hex. The canonical bytes are the
  UTF-8 JSON object of the fields below, keys sorted, no whitespace, no ASCII escaping
  (the shape of RFC 8785 for the values we store: strings, integers, lists, objects)::

      {"action", "actor", "at", "client_address", "detail", "outcome", "patient_id",
       "prev_hash", "study_id", "study_instance_uid", "v": 1}

  ``at`` is ISO 8601 UTC with microseconds (``2024-05-01T08:00:00.000000+00:00``).
  ``seq`` and the surrogate ``id`` are not hashed: the ``prev_hash`` links alone fix the
  order, which is how ``verify`` tells a reordering from an edit.
* ``audit_chain_head`` (one row) holds the last ``seq`` and ``hash``. Each writer locks it
  (PostgreSQL: ``SELECT ... FOR UPDATE``; SQLite: the database's single write lock),
  computes its events' hashes from it and inserts them; a trigger refuses an insert
  that does not extend the head and moves the head forward. Other triggers refuse
  UPDATE and DELETE (and TRUNCATE) of events, and any move of the head backwards.

``verify`` walks the events in ``seq`` order and recomputes every hash: the first
event whose bytes no longer give its hash was altered; an event whose ``prev_hash``
is not its predecessor's hash follows a removed event (no event has that hash) or
was reordered (another event has it); a head beyond the last event means events were
removed from the end.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping

from sqlalchemy import Connection, select, text
from sqlalchemy.orm import Session

FORMAT_VERSION = 1
GENESIS_HASH = "0" * 64
HEAD_ID = 1


def json_safe(detail: Mapping[str, Any]) -> dict[str, Any]:
    """``detail`` as it will read back from the JSON column (so that what is hashed is what is stored)."""
    return json.loads(json.dumps(dict(detail), default=str, ensure_ascii=False, allow_nan=False))


def format_at(at: datetime) -> str:
    if at.tzinfo is None:
        at = at.replace(tzinfo=timezone.utc)
    return at.astimezone(timezone.utc).isoformat(timespec="microseconds")


def canonical_bytes(
    *, prev_hash: str, at: datetime, actor: str, action: str, outcome: int, study_id: int | None,
    study_instance_uid: str, patient_id: str, client_address: str, detail: Mapping[str, Any],
) -> bytes:
    document = {
        "v": FORMAT_VERSION,
        "prev_hash": prev_hash,
        "at": format_at(at),
        "actor": actor,
        "action": action,
        "outcome": int(outcome),
        "study_id": study_id,
        "study_instance_uid": study_instance_uid,
        "patient_id": patient_id,
        "client_address": client_address,
        "detail": detail,
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def event_hash(event: Any, prev_hash: str | None = None) -> str:
    """SHA-256 of an event row's canonical bytes (with its own ``prev_hash`` unless given)."""
    data = canonical_bytes(
        prev_hash=event.prev_hash if prev_hash is None else prev_hash, at=event.at, actor=event.actor,
        action=event.action, outcome=event.outcome, study_id=event.study_id,
        study_instance_uid=event.study_instance_uid, patient_id=event.patient_id,
        client_address=event.client_address, detail=event.detail,
    )
    return hashlib.sha256(data).hexdigest()


# --- the append-only triggers, per dialect ------------------------------------------------------

_SQLITE_DDL = [
    """CREATE TRIGGER audit_events_no_update BEFORE UPDATE ON audit_events
       BEGIN SELECT RAISE(ABORT, 'audit_events is append-only: UPDATE refused'); END""",
    """CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events
       BEGIN SELECT RAISE(ABORT, 'audit_events is append-only: DELETE refused'); END""",
    """CREATE TRIGGER audit_events_extend_head BEFORE INSERT ON audit_events
       WHEN NEW.seq IS NOT (SELECT seq + 1 FROM audit_chain_head WHERE id = 1)
         OR NEW.prev_hash IS NOT (SELECT hash FROM audit_chain_head WHERE id = 1)
       BEGIN SELECT RAISE(ABORT, 'audit event does not extend the chain head'); END""",
    """CREATE TRIGGER audit_events_move_head AFTER INSERT ON audit_events
       BEGIN UPDATE audit_chain_head SET seq = NEW.seq, hash = NEW.hash WHERE id = 1; END""",
    """CREATE TRIGGER audit_chain_head_no_delete BEFORE DELETE ON audit_chain_head
       BEGIN SELECT RAISE(ABORT, 'audit_chain_head cannot be deleted'); END""",
    """CREATE TRIGGER audit_chain_head_forward_only BEFORE UPDATE ON audit_chain_head
       WHEN NEW.seq < OLD.seq OR NEW.id IS NOT OLD.id
       BEGIN SELECT RAISE(ABORT, 'audit_chain_head only moves forward'); END""",
]
_SQLITE_DROP = [
    "DROP TRIGGER IF EXISTS audit_events_no_update", "DROP TRIGGER IF EXISTS audit_events_no_delete",
    "DROP TRIGGER IF EXISTS audit_events_extend_head", "DROP TRIGGER IF EXISTS audit_events_move_head",
    "DROP TRIGGER IF EXISTS audit_chain_head_no_delete", "DROP TRIGGER IF EXISTS audit_chain_head_forward_only",
]

_POSTGRESQL_DDL = [
    """CREATE OR REPLACE FUNCTION audit_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
       BEGIN RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP; END $$""",
    """CREATE OR REPLACE FUNCTION audit_extend_head() RETURNS trigger LANGUAGE plpgsql AS $$
       DECLARE head_seq bigint; head_hash varchar(64);
       BEGIN
         SELECT seq, hash INTO head_seq, head_hash FROM audit_chain_head WHERE id = 1 FOR UPDATE;
         IF head_seq IS NULL OR NEW.seq IS DISTINCT FROM head_seq + 1 OR NEW.prev_hash IS DISTINCT FROM head_hash THEN
           RAISE EXCEPTION 'audit event does not extend the chain head';
         END IF;
         UPDATE audit_chain_head SET seq = NEW.seq, hash = NEW.hash WHERE id = 1;
         RETURN NEW;
       END $$""",
    """CREATE OR REPLACE FUNCTION audit_head_forward_only() RETURNS trigger LANGUAGE plpgsql AS $$
       BEGIN
         IF NEW.seq < OLD.seq OR NEW.id IS DISTINCT FROM OLD.id THEN
           RAISE EXCEPTION 'audit_chain_head only moves forward';
         END IF;
         RETURN NEW;
       END $$""",
    """CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE ON audit_events
       FOR EACH ROW EXECUTE FUNCTION audit_refuse_change()""",
    """CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events
       FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change()""",
    """CREATE TRIGGER audit_events_extend_head BEFORE INSERT ON audit_events
       FOR EACH ROW EXECUTE FUNCTION audit_extend_head()""",
    """CREATE TRIGGER audit_chain_head_no_delete BEFORE DELETE ON audit_chain_head
       FOR EACH ROW EXECUTE FUNCTION audit_refuse_change()""",
    """CREATE TRIGGER audit_chain_head_no_truncate BEFORE TRUNCATE ON audit_chain_head
       FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change()""",
    """CREATE TRIGGER audit_chain_head_forward_only BEFORE UPDATE ON audit_chain_head
       FOR EACH ROW EXECUTE FUNCTION audit_head_forward_only()""",
]
_POSTGRESQL_DROP = [
    "DROP TRIGGER IF EXISTS audit_events_append_only ON audit_events",
    "DROP TRIGGER IF EXISTS audit_events_no_truncate ON audit_events",
    "DROP TRIGGER IF EXISTS audit_events_extend_head ON audit_events",
    "DROP TRIGGER IF EXISTS audit_chain_head_no_delete ON audit_chain_head",
    "DROP TRIGGER IF EXISTS audit_chain_head_no_truncate ON audit_chain_head",
    "DROP TRIGGER IF EXISTS audit_chain_head_forward_only ON audit_chain_head",
    "DROP FUNCTION IF EXISTS audit_refuse_change()",
    "DROP FUNCTION IF EXISTS audit_extend_head()",
    "DROP FUNCTION IF EXISTS audit_head_forward_only()",
]


def _statements(dialect: str, kind: str) -> list[str]:
    table = {("sqlite", "create"): _SQLITE_DDL, ("sqlite", "drop"): _SQLITE_DROP,
             ("postgresql", "create"): _POSTGRESQL_DDL, ("postgresql", "drop"): _POSTGRESQL_DROP}
    try:
        return table[(dialect, kind)]
    except KeyError:
        raise RuntimeError(f"the audit trail's triggers are written for SQLite and PostgreSQL, not {dialect}") from None


def install(connection: Connection, head_seq: int = 0, head_hash: str = GENESIS_HASH) -> None:
    """Create the head row and the append-only triggers (after the tables exist)."""
    connection.execute(text("INSERT INTO audit_chain_head (id, seq, hash) VALUES (:id, :seq, :hash)"),
                       {"id": HEAD_ID, "seq": head_seq, "hash": head_hash})
    _run(connection, _statements(connection.dialect.name, "create"))


def uninstall(connection: Connection) -> None:
    """Drop the triggers (a migration's downgrade; never used by the application)."""
    _run(connection, _statements(connection.dialect.name, "drop"))


def _run(connection: Connection, statements: list[str]) -> None:
    # On the DBAPI cursor without parameters: PL/pgSQL's '%' placeholders are not driver format codes.
    cursor = connection.connection.cursor()
    try:
        for statement in statements:
            cursor.execute(statement)
    finally:
        cursor.close()


# --- verification -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """The first break in the chain: what happened, to which event."""

    kind: str  # "altered" | "removed" | "reordered"
    seq: int
    event_id: int | None
    message: str


@dataclass(frozen=True)
class Verification:
    events: int
    head_seq: int
    head_hash: str
    problem: Problem | None

    @property
    def intact(self) -> bool:
        return self.problem is None


def _describe(event: Any) -> str:
    return f"event seq={event.seq} (id {event.id}, {event.action} by {event.actor} at {format_at(event.at)})"


def verify(session: Session, batch: int = 2000) -> Verification:
    """Walk the whole trail in ``seq`` order; stop at the first altered, removed or reordered event."""
    from .models import AuditChainHead, AuditEvent

    head = session.get(AuditChainHead, HEAD_ID)
    expected_prev, expected_seq, count, last = GENESIS_HASH, 1, 0, None

    def found(kind: str, event: Any, message: str) -> Verification:
        return Verification(count, head.seq if head else 0, head.hash if head else "",
                            Problem(kind, event.seq, event.id, message))

    after = 0
    while True:
        rows: Iterable[AuditEvent] = session.scalars(
            select(AuditEvent).where(AuditEvent.seq > after).order_by(AuditEvent.seq).limit(batch)
        ).all()
        if not rows:
            break
        for event in rows:
            if event_hash(event) != event.hash:
                return found("altered", event, f"{_describe(event)} was altered: its content no longer gives its hash")
            if event.prev_hash != expected_prev:
                if event.seq != expected_seq:
                    return found("removed", event, f"event(s) seq={expected_seq}..{event.seq - 1} were removed "
                                                   f"before {_describe(event)}")
                before = session.execute(
                    select(AuditEvent.seq, AuditEvent.id).where(AuditEvent.hash == event.prev_hash)).first()
                if before is None:
                    return found("removed", event, f"an event was removed before {_describe(event)}: "
                                                   f"its predecessor {event.prev_hash[:16]}... is not in the trail")
                return found("reordered", event, f"{_describe(event)} was reordered: it was written after "
                                                 f"the event now at seq={before[0]} (id {before[1]}), not after "
                                                 f"seq={expected_seq - 1}")
            if event.seq != expected_seq:
                return found("reordered", event, f"{_describe(event)} was renumbered: it follows seq="
                                                 f"{expected_seq - 1} in the chain")
            expected_prev, expected_seq, count, last = event.hash, event.seq + 1, count + 1, event
            after = event.seq
        for event in rows:  # bounded memory over millions of events
            session.expunge(event)
    if head is None:
        problem = Problem("removed", 0, None, "the chain head row is missing")
        return Verification(count, 0, "", problem)
    if head.seq != (last.seq if last else 0) or head.hash != (last.hash if last else GENESIS_HASH):
        if head.seq > (last.seq if last else 0):
            message = (f"event(s) seq={(last.seq if last else 0) + 1}..{head.seq} were removed from the end "
                       f"of the trail (the chain head names seq={head.seq})")
        else:
            message = f"the chain head (seq={head.seq}) does not match the last event (seq={last.seq if last else 0})"
        return Verification(count, head.seq, head.hash, Problem("removed", head.seq, None, message))
    return Verification(count, head.seq, head.hash, None)
