"""Small ORM -> schema conversions shared by the routers."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from triage_core import priority
from triage_core.models import Study
from triage_core.settings import Settings

from ..crud import ExportCounts
from ..schemas import ExportSummary, ModelInfo, PolicyPublic, PriorityFinding, PriorityPublic, StudyBase


def model_info(study: Study) -> ModelInfo | None:
    if not study.model_name:
        return None
    return ModelInfo(name=study.model_name, version=study.model_version, demo=study.model_demo)


def priority_public(study: Study, *, now: datetime, policy: priority.WorklistPolicy) -> PriorityPublic:
    """The study's place in the worklist at ``now`` and its explanation (triage_core.priority)."""
    base = priority.Level(study.priority_level)
    where, explanation = priority.explain(study, now, policy)
    detail = study.priority_detail or {}
    if where is None:  # read: out of the queue, shown at its base level
        level, name, escalated, upcoming = max(base, priority.Level.NOTHING_FLAGGED), base.key, False, None
    else:
        level, name, escalated, upcoming = where.level, where.key, where.escalated, where.next_escalation
    return PriorityPublic(
        level=int(level),
        name=name,
        base=base.key,
        analysis=priority.analysis_of(study),
        waiting=study.read_at is None,
        escalated=escalated,
        waiting_since=study.waiting_since,
        next_escalation_at=upcoming[1] if upcoming else None,
        next_level=upcoming[0].key if upcoming else None,
        flagged=[PriorityFinding(**f) for f in detail.get("flagged", [])],
        explanation=explanation,
    )


def policy_public(policy: priority.WorklistPolicy) -> PolicyPublic:
    return PolicyPublic(
        escalation_minutes={key: wait.total_seconds() / 60 for key, wait in policy.waits.items()},
        ceiling=priority.ESCALATION_CEILING.key,
    )


def study_fields(study: Study, *, now: datetime, policy: priority.WorklistPolicy) -> dict[str, Any]:
    """The ``StudyBase`` fields of a study row."""
    fields = {name: getattr(study, name) for name in StudyBase.model_fields if name not in ("model", "priority")}
    fields["model"] = model_info(study)
    fields["priority"] = priority_public(study, now=now, policy=policy)
    return fields


def viewer_url(study: Study, settings: Settings) -> str | None:
    """The hospital viewer's link for the study, when a template is configured (UIDs are URL-safe;
    an accession number is quoted)."""
    if not settings.viewer_url_template:
        return None
    from urllib.parse import quote

    return settings.viewer_url_template.format(study_instance_uid=quote(study.study_instance_uid, safe=""),
                                               accession_number=quote(study.accession_number or "", safe=""))


def export_summary(counts: ExportCounts) -> ExportSummary:
    return ExportSummary(
        status=counts.status,
        total=counts.total,
        exported=counts.exported,
        pending=counts.pending,
        failed=counts.failed,
    )
