"""Read-side data access for the API: keyword-only functions over a session, no HTTP here."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, selectinload

from triage_core.models import AuditEvent, Export, Finding, ResultObject, Study
from triage_core.states import AuditAction, ExportStatus, ResultKind, StudyStatus

TOP_FINDINGS = 3


@dataclass(frozen=True)
class ExportCounts:
    total: int = 0
    exported: int = 0
    pending: int = 0
    failed: int = 0

    @property
    def status(self) -> ExportStatus | None:
        if self.failed:
            return ExportStatus.EXPORT_FAILED
        if self.pending:
            return ExportStatus.EXPORT_PENDING
        if self.exported:
            return ExportStatus.EXPORTED
        return None


def ping(*, session: Session) -> None:
    """Raise if the database does not answer."""
    session.execute(text("SELECT 1")).scalar_one()


def latest_model(*, session: Session) -> tuple[str, str, bool] | None:
    """Name, version and demo flag of the model of the most recently processed study."""
    row = session.execute(
        select(Study.model_name, Study.model_version, Study.model_demo)
        .where(Study.model_name != "")
        .order_by(Study.updated_at.desc(), Study.id.desc())
        .limit(1)
    ).first()
    return (row[0], row[1], bool(row[2])) if row else None


def list_worklist(
    *, session: Session, statuses: Sequence[StudyStatus], limit: int, offset: int
) -> tuple[list[Study], int]:
    """A page of studies in priority order (priority DESC, then received_at ASC) and the total count."""
    where = [Study.status.in_([str(s) for s in statuses])] if statuses else []
    count = session.execute(select(func.count()).select_from(Study).where(*where)).scalar_one()
    studies = (
        session.execute(
            select(Study)
            .where(*where)
            .order_by(Study.priority.desc(), Study.received_at.asc(), Study.id.asc())
            .limit(limit)
            .offset(offset)
        )
        .scalars()
        .all()
    )
    return list(studies), count


def top_findings(*, session: Session, study_ids: Iterable[int], n: int = TOP_FINDINGS) -> dict[int, list[Finding]]:
    """Per study, up to ``n`` present findings, highest probability first (one per finding name)."""
    ids = list(study_ids)
    if not ids:
        return {}
    rows = session.execute(
        select(Finding)
        .where(Finding.study_id.in_(ids), Finding.present.is_(True))
        .order_by(Finding.study_id, Finding.probability.desc(), Finding.id)
    ).scalars()
    best: dict[int, list[Finding]] = defaultdict(list)
    seen: dict[int, set[str]] = defaultdict(set)
    for finding in rows:
        # Several images of a study may report the same finding: keep its highest probability.
        if len(best[finding.study_id]) < n and finding.finding not in seen[finding.study_id]:
            seen[finding.study_id].add(finding.finding)
            best[finding.study_id].append(finding)
    return dict(best)


def export_counts(*, session: Session, study_ids: Iterable[int]) -> dict[int, ExportCounts]:
    ids = list(study_ids)
    if not ids:
        return {}
    rows = session.execute(
        select(Export.study_id, Export.status, func.count())
        .where(Export.study_id.in_(ids))
        .group_by(Export.study_id, Export.status)
    ).all()
    tallies: dict[int, dict[str, int]] = defaultdict(dict)
    for study_id, status, n in rows:
        tallies[study_id][status] = n
    return {
        study_id: ExportCounts(
            total=sum(t.values()),
            exported=t.get(ExportStatus.EXPORTED, 0),
            pending=t.get(ExportStatus.EXPORT_PENDING, 0),
            failed=t.get(ExportStatus.EXPORT_FAILED, 0),
        )
        for study_id, t in tallies.items()
    }


def get_study(*, session: Session, study_instance_uid: str, full: bool = False) -> Study | None:
    """One study by its UID; ``full`` loads instances, findings, results, exports and jobs too."""
    query = select(Study).where(Study.study_instance_uid == study_instance_uid)
    if full:
        query = query.options(
            selectinload(Study.instances),
            selectinload(Study.findings),
            selectinload(Study.results),
            selectinload(Study.exports),
            selectinload(Study.jobs),
        )
    return session.execute(query).scalars().first()


def get_results(
    *, session: Session, study: Study, kind: ResultKind, sop_instance_uid: str | None = None
) -> list[ResultObject]:
    """The study's current result objects of a kind (never superseded ones), newest first."""
    query = select(ResultObject).where(
        ResultObject.study_id == study.id, ResultObject.kind == str(kind), ResultObject.superseded_at.is_(None)
    )
    if sop_instance_uid is not None:
        query = query.where(ResultObject.sop_instance_uid == sop_instance_uid)
    return list(session.execute(query.order_by(ResultObject.created_at.desc(), ResultObject.id.desc())).scalars())


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value


def list_audit(
    *,
    session: Session,
    study_instance_uid: str | None = None,
    action: AuditAction | None = None,
    actor: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int,
    offset: int,
) -> tuple[list[AuditEvent], int]:
    """A page of audit events, newest first, and the total count."""
    where = []
    if study_instance_uid is not None:
        where.append(AuditEvent.study_instance_uid == study_instance_uid)
    if action is not None:
        where.append(AuditEvent.action == str(action))
    if actor is not None:
        where.append(AuditEvent.actor == actor)
    if since is not None:
        where.append(AuditEvent.at >= _utc(since))
    if until is not None:
        where.append(AuditEvent.at <= _utc(until))
    count = session.execute(select(func.count()).select_from(AuditEvent).where(*where)).scalar_one()
    events = session.execute(
        select(AuditEvent).where(*where).order_by(AuditEvent.at.desc(), AuditEvent.id.desc()).limit(limit).offset(offset)
    ).scalars()
    return list(events), count
