"""Read-side data access for the API: keyword-only functions over a session, no HTTP here."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
import dataclasses
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache

from sqlalchemy import Integer, bindparam, case, exists, false, func, literal, select, text, union_all
from sqlalchemy.orm import Session, selectinload

from triage_core import priority
from triage_core.models import AuditEvent, AwareDateTime, Export, Finding, ResultObject, Study
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


#: The worklist counts matching studies up to this many: counting a million rows would be most of a page's time.
COUNT_CAP = 1_000


@dataclass(frozen=True)
class WorklistPage:
    studies: list[Study]
    #: The level each study was ordered by (the SQL's own verdict; -1 for read studies).
    levels: list[int]
    count: int
    count_exact: bool


@dataclass(frozen=True)
class _Shape:
    """What decides the worklist statement's text; the values ride in bound parameters."""

    read: bool | None
    #: How many statuses the filter names (each gets members of its own: see list_worklist).
    statuses: int
    finding: bool
    received_from: bool
    received_to: bool
    #: (base, ((level, step number), ...)) for every base level: the policy's structure, not its minutes.
    steps: tuple


def _filters(shape: _Shape) -> list:
    where = []
    if shape.finding:
        # Bare ``present`` (not IS TRUE), the predicate of the partial index ix_findings_flagged.
        where.append(exists().where(Finding.study_id == Study.id, Finding.finding == bindparam("finding"),
                                    Finding.present))
    if shape.received_from:
        where.append(Study.received_at >= bindparam("received_from", type_=AwareDateTime))
    if shape.received_to:
        where.append(Study.received_at <= bindparam("received_to", type_=AwareDateTime))
    return where


def _bound(base: int, step: int) -> str:
    return f"reached_{base + 1}_{step}"  # base -1 (awaiting analysis) -> reached_0_...


@lru_cache(maxsize=128)
def _statements(shape: _Shape):
    """(page, count) statements for one shape, built once: SQLAlchemy's compiled cache then serves them."""
    where = _filters(shape)
    n = bindparam("n", type_=Integer)
    # A status filter splits every member by status, so that each stays one ordered range of an index
    # (ix_studies_waiting, or ix_studies_status_waiting / ix_studies_status_read with the status first)
    # instead of a scan of a base level's whole range for the few rows in that status.
    by_status = [[Study.status == bindparam(f"status_{i}")] for i in range(shape.statuses)] or [[]]
    members = []
    if shape.read is not True:
        for base, steps in shape.steps:
            # The level an unread study of this base stands at: waiting_since against one bound per step
            # (now minus the wait that step needs), highest first.
            whens = [(Study.waiting_since <= bindparam(_bound(base, step), type_=AwareDateTime), level)
                     for level, step in reversed(steps[1:])]
            level = case(*whens, else_=steps[0][0]) if whens else literal(steps[0][0], Integer)
            could_flag = []
            if shape.finding:
                # A study whose finding of class c is flagged has a base level of at least c's (levels never
                # drop): a base below every class the finding was ever flagged with cannot match, and this
                # uncorrelated test (evaluated once, from ix_findings_flagged) spares its whole range.
                classes = [c for c, lvl in priority.URGENCY_LEVELS.items() if lvl <= base]
                if base >= priority.URGENCY_LEVELS[priority.UNKNOWN_URGENCY]:
                    classes.append("")  # rows written before classes existed count as urgent
                could_flag.append(exists().where(Finding.finding == bindparam("finding"), Finding.present,
                                                 Finding.urgency.in_(classes)) if classes else false())
            for status in by_status:
                members.append(
                    select(Study.id.label("id"), literal(0, Integer).label("grp"), level.label("lvl"),
                           Study.waiting_since.label("at"))
                    .where(*where, *could_flag, *status, Study.read_at.is_(None), Study.priority_level == base)
                    .order_by(Study.waiting_since, Study.id)
                    .limit(n)
                )
    if shape.read is not False:
        for status in by_status:
            members.append(
                select(Study.id.label("id"), literal(1, Integer).label("grp"), literal(-1, Integer).label("lvl"),
                       Study.read_at.label("at"))
                .where(*where, *status, Study.read_at.is_not(None))
                .order_by(Study.read_at.desc(), Study.id.desc())
                .limit(n)
            )
    # SQLite wants a compound member with its own ORDER BY/LIMIT inside a subquery.
    page = union_all(*(select(*member.subquery().c) for member in members)).subquery("page")
    unread, read_rows = page.c.grp == 0, page.c.grp == 1
    page_statement = (
        select(page.c.id, page.c.lvl)
        .order_by(page.c.grp, page.c.lvl.desc(), case((unread, page.c.at)), case((read_rows, page.c.at)).desc(),
                  case((unread, page.c.id)), case((read_rows, page.c.id)).desc())
        .limit(bindparam("limit", type_=Integer))
        .offset(bindparam("offset", type_=Integer))
    )
    read_where = [] if shape.read is None else [Study.read_at.is_not(None) if shape.read else Study.read_at.is_(None)]
    if shape.statuses:
        read_where.append(Study.status.in_([bindparam(f"status_{i}") for i in range(shape.statuses)]))
    if shape.finding:
        # Counted from the finding's side (ix_findings_flagged): the studies where it is flagged, capped,
        # rather than every study tested for it until the cap is reached.
        others = _filters(dataclasses.replace(shape, finding=False))
        counted = (select(Study.id).join(Finding, Finding.study_id == Study.id)
                   .where(Finding.finding == bindparam("finding"), Finding.present, *others, *read_where)
                   .distinct())
    else:
        counted = select(Study.id).where(*where, *read_where)
    count_statement = select(func.count()).select_from(counted.limit(bindparam("cap", type_=Integer)).subquery())
    return page_statement, count_statement


_STUDIES_BY_ID = select(Study).where(Study.id.in_(bindparam("ids", expanding=True)))


def list_worklist(
    *,
    session: Session,
    policy: priority.WorklistPolicy,
    now: datetime,
    statuses: Sequence[StudyStatus] = (),
    finding: str | None = None,
    received_from: datetime | None = None,
    received_to: datetime | None = None,
    read: bool | None = None,
    limit: int,
    offset: int,
) -> WorklistPage:
    """A page of the worklist in the order of ``triage_core.priority``, ordered and paged by the database.

    Unread studies first, by level (highest first) then longest waiting first; then read studies,
    most recently read first. A study's level depends on ``now`` (age escalation), so no column can
    hold it; but for one base level it only grows with the time waited, so that base's studies in
    ``waiting_since`` order are already in worklist order. Hence one member per base level, each a
    range scan of ``ix_studies_waiting`` (priority_level, waiting_since, id) WHERE read_at IS NULL
    that stops after offset + limit rows, its level a CASE over ``waiting_since`` against bounds
    (now minus each step's wait) bound as parameters; plus one member for read studies
    (``ix_studies_read``). UNION ALL, ORDER BY, LIMIT/OFFSET: the database sorts at most
    8 x (offset + limit) rows, whatever the table holds. The count stops at COUNT_CAP.
    """
    all_steps = {base: policy.steps(base) for base in priority.Level}
    statuses = list(dict.fromkeys(str(s) for s in statuses))
    shape = _Shape(read=read, statuses=len(statuses), finding=finding is not None,
                   received_from=received_from is not None, received_to=received_to is not None,
                   steps=tuple((int(base), tuple((int(level), i) for i, (level, _) in enumerate(steps)))
                               for base, steps in all_steps.items()))
    params = {"n": offset + limit, "limit": limit, "offset": offset, "cap": COUNT_CAP + 1}
    params.update({f"status_{i}": status for i, status in enumerate(statuses)})
    if finding is not None:
        params["finding"] = finding
    if received_from is not None:
        params["received_from"] = _utc(received_from)
    if received_to is not None:
        params["received_to"] = _utc(received_to)
    if read is not True:
        for base, steps in all_steps.items():
            for i, (_, wait) in enumerate(steps[1:], start=1):
                params[_bound(int(base), i)] = now - wait
    page_statement, count_statement = _statements(shape)
    rows = session.execute(page_statement, params).all()
    by_id = {s.id: s for s in session.scalars(_STUDIES_BY_ID, {"ids": [r.id for r in rows]})}
    counted = session.execute(count_statement, params).scalar_one()
    return WorklistPage(
        studies=[by_id[r.id] for r in rows],
        levels=[int(r.lvl) for r in rows],
        count=min(counted, COUNT_CAP),
        count_exact=counted <= COUNT_CAP,
    )


def top_findings(*, session: Session, study_ids: Iterable[int], n: int = TOP_FINDINGS) -> dict[int, list[Finding]]:
    """Per study, up to ``n`` flagged findings, most urgent class first, then highest probability
    (one per finding name: the image where it scored highest)."""
    ids = list(study_ids)
    if not ids:
        return {}
    rows = session.execute(
        select(Finding)
        .where(Finding.study_id.in_(ids), Finding.present.is_(True))
        .order_by(Finding.study_id, Finding.probability.desc(), Finding.id)
    ).scalars()
    best: dict[int, dict[str, Finding]] = defaultdict(dict)
    for finding in rows:
        best[finding.study_id].setdefault(finding.finding, finding)

    def rank(f: Finding):
        return (-priority.URGENCY_LEVELS.get(f.urgency, priority.URGENCY_LEVELS[priority.UNKNOWN_URGENCY]),
                -f.probability, f.finding)

    return {study_id: sorted(found.values(), key=rank)[:n] for study_id, found in best.items()}


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
