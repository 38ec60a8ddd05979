"""The audit writer: every state change, every read of study data and every refused access becomes an event.

Every package writes through ``record`` (and ``set_status``); nothing else inserts audit rows.
An event joins the caller's transaction: it is held on the session and appended to the hash
chain (``triage_core.audit_chain``) just before that transaction commits, so that the chain
head is locked only for the last moment of the transaction:

1. the session's other changes are flushed (outside the chain lock);
2. on PostgreSQL the studies the events name are locked ``FOR KEY SHARE`` (what the foreign
   key check would take), then the head row ``FOR UPDATE``; on SQLite the head row is
   updated in place first, which takes the database's single write lock;
3. each event gets ``seq`` = head + 1..n, ``prev_hash`` and ``hash``, and is inserted; a
   trigger checks that it extends the head and moves the head;
4. the transaction commits, releasing the lock. Afterwards the events go to the session's
   audit sink, if any (``Database(audit_sink=...)``: the RFC 5424 syslog copy).

Taking the head lock last, after every other lock the transaction needs, is what keeps
concurrent writers (node, worker, API, on several processes) free of deadlocks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import event as sa_event
from sqlalchemy import text
from sqlalchemy.orm import Session

from . import priority
from .audit_chain import HEAD_ID, event_hash, json_safe
from .models import AuditEvent, Study
from .states import AuditAction, AuditOutcome, StudyStatus

log = logging.getLogger(__name__)

SYSTEM_ACTORS = {"node": "system:dicom_node", "worker": "system:worker", "api": "system:api", "cli": "system:cli"}

#: session.info keys
_PENDING = "cxr_triage.audit.pending"
_COMMITTED = "cxr_triage.audit.committed"
SINK = "cxr_triage.audit.sink"

AuditSink = Callable[[Sequence[AuditEvent]], None]


def record(
    session: Session,
    *,
    actor: str,
    action: AuditAction,
    study: Study | None = None,
    outcome: AuditOutcome = AuditOutcome.SUCCESS,
    client_address: str = "",
    **detail: Any,
) -> AuditEvent:
    """Add an audit event to the session's transaction; it is chained and written when the session commits.

    ``detail`` must be JSON values (it is stored and hashed as JSON): UIDs, ids, statuses,
    never patient names or birth dates. The returned event may still be amended until commit.
    """
    event = AuditEvent(
        at=datetime.now(timezone.utc),
        actor=actor[:128],
        action=str(action),
        study_id=study.id if study is not None else None,
        study_instance_uid=study.study_instance_uid if study is not None else "",
        patient_id=(study.patient_id or "") if study is not None else "",
        outcome=int(outcome),
        client_address=(client_address or "")[:64],
        detail=json_safe(detail),
    )
    session.info.setdefault(_PENDING, []).append((event, study))
    return event


def set_status(
    session: Session, study: Study, status: StudyStatus, *, actor: str, reason: str = ""
) -> None:
    """Change a study's status and write the transition as an event row.

    The worklist priority follows (``priority.record_status``): SKIPPED and FAILED count as not
    analysed, and new images for a study that was read make it wait again.
    """
    previous = study.status
    study.status = str(status)
    study.status_reason = reason
    priority.record_status(study, str(status), reason, datetime.now(timezone.utc))
    session.flush()
    record(
        session,
        actor=actor,
        action=AuditAction.STATUS_CHANGED,
        study=study,
        previous=previous,
        status=str(status),
        reason=reason,
    )


def pending(session: Session) -> list[AuditEvent]:
    """Events recorded in the session's transaction and not yet written."""
    return [event for event, _ in session.info.get(_PENDING, [])]


@sa_event.listens_for(Session, "before_commit")
def _append_to_chain(session: Session) -> None:
    items = session.info.pop(_PENDING, None)
    if not items:
        return
    session.flush()  # the transaction's other writes first, outside the chain lock
    events: list[AuditEvent] = []
    for event, study in items:
        if study is not None and event.study_id is None:
            event.study_id = study.id  # a study created in this transaction has its id now
        events.append(event)
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        study_ids = sorted({e.study_id for e in events if e.study_id is not None})
        if study_ids:
            connection.execute(text("SELECT id FROM studies WHERE id = ANY(:ids) FOR KEY SHARE"), {"ids": study_ids})
        head = connection.execute(
            text("SELECT seq, hash FROM audit_chain_head WHERE id = :id FOR UPDATE"), {"id": HEAD_ID}
        ).one()
    else:
        # SQLite: a write first, so the transaction holds the write lock (waiting its turn under
        # busy_timeout) before it reads the head; a read first could be overtaken by another writer.
        connection.execute(text("UPDATE audit_chain_head SET seq = seq WHERE id = :id"), {"id": HEAD_ID})
        head = connection.execute(text("SELECT seq, hash FROM audit_chain_head WHERE id = :id"), {"id": HEAD_ID}).one()
    seq, prev_hash = int(head[0]), head[1]
    for event in events:
        seq += 1
        event.seq = seq
        event.prev_hash = prev_hash
        event.hash = prev_hash = event_hash(event)
    session.add_all(events)
    session.flush()
    if session.info.get(SINK) is not None:
        session.info.setdefault(_COMMITTED, []).extend(events)


@sa_event.listens_for(Session, "after_commit")
def _forward(session: Session) -> None:
    events = session.info.pop(_COMMITTED, None)
    sink = session.info.get(SINK)
    if events and sink is not None:
        try:
            sink(events)
        except Exception:  # the database row is the record; the copy must not fail the caller
            log.exception("audit events %s..%s could not be handed to the audit sink", events[0].seq, events[-1].seq)


@sa_event.listens_for(Session, "after_soft_rollback")
def _forget(session: Session, previous_transaction: Any) -> None:
    if previous_transaction.parent is None:  # the outermost transaction: its events are gone with it
        session.info.pop(_PENDING, None)
        session.info.pop(_COMMITTED, None)
