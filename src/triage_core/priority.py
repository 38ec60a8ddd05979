"""The worklist policy: which study a radiologist should read next, and why (README "Worklist policy").

Levels, highest first. A study's *base* level comes from what is known about it; while it waits
unread, age raises it one level at a time, up to ``urgent``:

======  ==================  ==============================================================
level   name                base level of a study ...
======  ==================  ==============================================================
5       critical            with a flagged finding the model card classes ``critical``
4       urgent              with a flagged ``urgent`` finding (also the ceiling of escalation)
3       not_analysed        SKIPPED or FAILED: no model opinion at all, read it as without AI
2       routine             with a flagged ``routine`` finding
1       minor               with a flagged ``minor`` finding
0       nothing_flagged     analysed, no finding at or above its operating threshold
(-1)    awaiting_analysis   received, not analysed yet (shown at level 0, distinct from 0)
======  ==================  ==============================================================

Rules:

- **Per-finding urgency, not a sum**: the base level is the most urgent class among the flagged
  findings; ten minor findings never outrank one urgent finding.
- **Never loses priority**: the base level only ever rises (``max`` of every result the study had,
  including "not analysed" and an analysis that came after the study was shown as overdue).
- **Bounded waits**: an unread study below ``urgent`` climbs one level after the wait of its
  current level (``CXR_TRIAGE_WORKLIST_ESCALATION_MINUTES``), counted from when it started waiting.
  Within a level, the longest-waiting study comes first, so once a study has reached ``urgent``
  only critical studies and studies that waited longer come before it. ``critical`` is never
  reached by age: a flagged pneumothorax is always above every escalated study.
- **Read studies leave the queue**: a study marked read is listed after every waiting one; new
  images for a read study make it wait again (from their arrival) at its base level.

Escalation is a pure function of (base level, waiting since, now), so the database orders a page
by comparing ``waiting_since`` with ``now`` minus constant offsets (``dashboard_api.crud``): no
row is ever rewritten by a timer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import IntEnum
from typing import Any

from .values import FindingResult


class Level(IntEnum):
    AWAITING_ANALYSIS = -1
    NOTHING_FLAGGED = 0
    MINOR = 1
    ROUTINE = 2
    NOT_ANALYSED = 3
    URGENT = 4
    CRITICAL = 5

    @property
    def key(self) -> str:
        """The name used in settings and in the API (``not_analysed``)."""
        return self.name.lower()

    @property
    def label(self) -> str:
        """The name shown to people (``not analysed``)."""
        return self.name.lower().replace("_", " ")


#: Urgency classes of a model card (cxr_model.labels.URGENCY_CLASSES) and the level each gives.
URGENCY_LEVELS: dict[str, Level] = {
    "critical": Level.CRITICAL,
    "urgent": Level.URGENT,
    "routine": Level.ROUTINE,
    "minor": Level.MINOR,
}
#: A label the card does not classify counts as urgent: an unknown finding is never buried.
UNKNOWN_URGENCY = "urgent"
#: Age raises a study at most to this level.
ESCALATION_CEILING = Level.URGENT
#: The levels that escalate, and the default minutes a study waits at each before it climbs.
DEFAULT_WAIT_MINUTES: dict[str, float] = {
    Level.AWAITING_ANALYSIS.key: 10.0,  # then it counts as not analysed (analysis overdue)
    Level.NOTHING_FLAGGED.key: 240.0,
    Level.MINOR.key: 120.0,
    Level.ROUTINE.key: 60.0,
    Level.NOT_ANALYSED.key: 30.0,
}
#: Every level a study can be shown at (``level`` in the API), highest first.
SHOWN_LEVELS = (Level.CRITICAL, Level.URGENT, Level.NOT_ANALYSED, Level.ROUTINE, Level.MINOR, Level.NOTHING_FLAGGED)


class Analysis:
    """What is known about a study (``priority.analysis`` in the API)."""

    FLAGGED = "flagged"
    NOTHING_FLAGGED = "nothing_flagged"
    NOT_ANALYSED = "not_analysed"
    AWAITING_ANALYSIS = "awaiting_analysis"
    ALL = (FLAGGED, NOTHING_FLAGGED, NOT_ANALYSED, AWAITING_ANALYSIS)


@dataclass(frozen=True)
class WorklistPolicy:
    """The configurable part of the policy: how long a study waits at each level before it climbs."""

    waits: Mapping[str, timedelta]

    @classmethod
    def from_minutes(cls, minutes: Mapping[str, float] | None = None) -> "WorklistPolicy":
        merged = {**DEFAULT_WAIT_MINUTES, **(minutes or {})}
        unknown = sorted(set(merged) - set(DEFAULT_WAIT_MINUTES))
        if unknown:
            raise ValueError(f"worklist escalation: unknown level(s) {unknown}; "
                             f"levels that escalate: {', '.join(DEFAULT_WAIT_MINUTES)}")
        for key, value in merged.items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 < value <= 7 * 24 * 60):
                raise ValueError(f"worklist escalation: {key}={value!r} must be minutes in (0, 10080]")
        return cls({key: timedelta(minutes=float(value)) for key, value in merged.items()})

    @classmethod
    def from_settings(cls, settings: Any) -> "WorklistPolicy":
        return cls.from_minutes(settings.worklist_escalation_minutes)

    def wait(self, level: Level) -> timedelta:
        return self.waits[level.key]

    def steps(self, base: Level) -> tuple[tuple[Level, timedelta], ...]:
        """(level, time after ``waiting_since`` it is reached) for every level a study of this base goes through.

        The first entry is where it starts (offset 0). Awaiting analysis starts shown at level 0 and,
        once analysis is overdue, counts as not analysed.
        """
        if base >= ESCALATION_CEILING:
            return ((base, timedelta(0)),)
        if base == Level.AWAITING_ANALYSIS:
            steps = [(Level.NOTHING_FLAGGED, timedelta(0)), (Level.NOT_ANALYSED, self.wait(base))]
        else:
            steps = [(base, timedelta(0))]
        while steps[-1][0] < ESCALATION_CEILING:
            level, offset = steps[-1]
            steps.append((Level(level + 1), offset + self.wait(level)))
        return tuple(steps)

    def longest_wait(self, base: Level) -> timedelta:
        """How long an unread study of this base waits at most before it reaches the escalation ceiling."""
        return self.steps(base)[-1][1]


@dataclass(frozen=True)
class Standing:
    """Where a waiting study stands at one moment: its level, what raised it, when it climbs next."""

    base: Level
    level: Level
    escalations: tuple[tuple[Level, datetime], ...]  # (level reached by age, when), oldest first
    next_escalation: tuple[Level, datetime] | None

    @property
    def escalated(self) -> bool:
        return bool(self.escalations)

    @property
    def key(self) -> str:
        """The name of the level shown: awaiting analysis stays distinct from nothing flagged."""
        if self.base == Level.AWAITING_ANALYSIS and self.level == Level.NOTHING_FLAGGED:
            return Level.AWAITING_ANALYSIS.key
        return self.level.key


def standing(base: int, waiting_since: datetime, now: datetime, policy: WorklistPolicy) -> Standing:
    """The level of an unread study at ``now`` (the same rule ``dashboard_api.crud`` runs in SQL)."""
    base = Level(base)
    steps = policy.steps(base)
    level = steps[0][0]
    reached, upcoming = [], None
    for step_level, offset in steps[1:]:
        at = waiting_since + offset
        if at <= now:
            level = step_level
            reached.append((step_level, at))
        elif upcoming is None:
            upcoming = (step_level, at)
    return Standing(base, level, tuple(reached), upcoming)


@dataclass(frozen=True)
class Flagged:
    """A finding at or above its operating threshold, with the urgency its model card gives it."""

    finding: str
    urgency: str
    probability: float
    threshold: float

    def as_dict(self) -> dict[str, Any]:
        return {"finding": self.finding, "urgency": self.urgency, "probability": round(self.probability, 4),
                "threshold": round(self.threshold, 4)}


def urgency_of(finding: str, urgency: Mapping[str, str]) -> str:
    value = urgency.get(finding, UNKNOWN_URGENCY)
    return value if value in URGENCY_LEVELS else UNKNOWN_URGENCY


def assess(findings: Iterable[FindingResult], urgency: Mapping[str, str]) -> tuple[Level, list[Flagged]]:
    """The base level an analysis gives, and the flagged findings that give it, most urgent first.

    A finding flagged on several images counts once, with its highest probability.
    """
    best: dict[str, FindingResult] = {}
    for finding in findings:
        if finding.present and (finding.finding not in best or finding.probability > best[finding.finding].probability):
            best[finding.finding] = finding
    flagged = [Flagged(f.finding, urgency_of(f.finding, urgency), f.probability, f.threshold) for f in best.values()]
    flagged.sort(key=lambda f: (-URGENCY_LEVELS[f.urgency], -f.probability, f.finding))
    level = URGENCY_LEVELS[flagged[0].urgency] if flagged else Level.NOTHING_FLAGGED
    return level, flagged


def heatmap_rank(labels: Iterable[str], urgency: Mapping[str, str]) -> dict[str, int]:
    """Rank of each finding for heatmaps of their own (``dicom_io.sc.HeatmapOptions.rank``): the more
    urgent its class, the lower; findings of one class then go by probability."""
    return {name: -int(URGENCY_LEVELS[urgency_of(name, urgency)]) for name in labels}


# --- recording results on the study row -------------------------------------------------------


def _describe(detail: Mapping[str, Any]) -> str:
    """One line for what a result said, e.g. ``urgent finding flagged: Effusion 0.72 >= 0.50``."""
    analysis = detail.get("analysis")
    if analysis == Analysis.FLAGGED:
        top = detail["flagged"][0]
        return (f"{top['urgency']} finding flagged: " +
                ", ".join(f"{f['finding']} {f['probability']:.2f} >= {f['threshold']:.2f}" for f in detail["flagged"]))
    if analysis == Analysis.NOTHING_FLAGGED:
        return "analysed, no finding at or above its operating threshold"
    if analysis == Analysis.NOT_ANALYSED:
        return f"not analysed ({detail.get('status', '')}: {detail.get('reason', '')})"
    if detail.get("overdue"):
        return "not analysed within its awaiting-analysis wait (shown as not analysed)"
    return "awaiting analysis"


def _keep(study: Any, new_level: Level, detail: dict[str, Any], floor: Level, floor_because: str) -> None:
    previous = Level(study.priority_level if study.priority_level is not None else Level.AWAITING_ANALYSIS)
    level = max(new_level, previous, floor)
    if level > new_level:
        if floor > previous and floor >= level:
            detail["kept"] = {"level": floor.key, "because": floor_because}
        else:
            before = dict(study.priority_detail or {})
            kept_from = before.get("kept", {}).get("because") if before.get("kept") else None
            detail["kept"] = {"level": previous.key, "because": kept_from or _describe(before)}
    study.priority_level = int(level)
    study.priority_detail = detail


def record_analysis(study: Any, findings: Iterable[FindingResult], urgency: Mapping[str, str],
                    policy: WorklistPolicy, now: datetime) -> Level:
    """Set the study's base level from an analysis (the worker, before it marks the study DONE).

    The level never drops: an earlier result's level is kept (and said so), and a study first
    analysed after its awaiting-analysis wait ran out keeps the not-analysed level it was shown at.
    Returns the level the analysis itself gives.
    """
    level, flagged = assess(findings, urgency)
    detail: dict[str, Any] = {
        "analysis": Analysis.FLAGGED if flagged else Analysis.NOTHING_FLAGGED,
        "flagged": [f.as_dict() for f in flagged],
        "at": now.isoformat(),
    }
    floor, because = Level.NOTHING_FLAGGED, ""
    if study.priority_level is None or study.priority_level == Level.AWAITING_ANALYSIS:
        shown = standing(Level.AWAITING_ANALYSIS, study.waiting_since, now, policy)
        if shown.level >= Level.NOT_ANALYSED:
            floor = shown.level
            because = (f"analysis came {format_duration(now - study.waiting_since)} after arrival; the study was "
                       f"already shown as {shown.level.label}")
    _keep(study, level, detail, floor, because)
    return level


def record_status(study: Any, status: str, reason: str, now: datetime) -> None:
    """Keep the priority in step with a status change (called by ``audit.set_status``).

    SKIPPED and FAILED raise the study to at least "not analysed"; new images for a study that was
    marked read make it wait again, from now, at the base level it has.
    """
    if status in ("SKIPPED", "FAILED"):
        detail = {"analysis": Analysis.NOT_ANALYSED, "status": status, "reason": reason[:500], "flagged": [],
                  "at": now.isoformat()}
        _keep(study, Level.NOT_ANALYSED, detail, Level.NOTHING_FLAGGED, "")
    elif status == "RECEIVING" and study.read_at is not None:
        study.read_at = None
        study.read_by = ""
        study.waiting_since = now


def mark_read(study: Any, *, reader: str, now: datetime) -> None:
    study.read_at = now
    study.read_by = reader[:128]


def mark_unread(study: Any) -> None:
    """Back into the queue, as if never read: it has waited since it started waiting."""
    study.read_at = None
    study.read_by = ""


# --- explanation ------------------------------------------------------------------------------


def format_duration(delta: timedelta) -> str:
    minutes = max(0, int(delta.total_seconds() // 60))
    days, minutes = divmod(minutes, 24 * 60)
    hours, minutes = divmod(minutes, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min"


def analysis_of(study: Any) -> str:
    detail = study.priority_detail or {}
    if study.priority_level is None or study.priority_level == Level.AWAITING_ANALYSIS:
        return Analysis.AWAITING_ANALYSIS
    return detail.get("analysis") or Analysis.NOT_ANALYSED


def explain(study: Any, now: datetime, policy: WorklistPolicy) -> tuple[Standing | None, str]:
    """The study's standing (None once read) and a readable account of its priority."""
    base = Level(study.priority_level if study.priority_level is not None else Level.AWAITING_ANALYSIS)
    detail = study.priority_detail or {}
    analysis = analysis_of(study)
    parts: list[str] = []
    if analysis == Analysis.FLAGGED and detail.get("flagged"):
        top = detail["flagged"][0]
        others = [f"{f['finding']} {f['probability']:.2f} ({f['urgency']})" for f in detail["flagged"][1:]]
        parts.append(f"{top['urgency'].capitalize()} finding flagged: {top['finding']} {top['probability']:.2f} "
                     f"(operating threshold {top['threshold']:.2f})" + (f"; also {', '.join(others)}" if others else "")
                     + ".")
    elif analysis == Analysis.NOTHING_FLAGGED:
        parts.append("Analysed: no finding at or above its operating threshold.")
    elif analysis == Analysis.NOT_ANALYSED:
        parts.append(f"Not analysed ({detail.get('status', 'no result')}: {detail.get('reason', '') or 'no reason given'}):"
                     " read it without AI help.")
    else:
        parts.append("Awaiting analysis: the model has not scored this study yet.")
    kept = detail.get("kept")
    if kept:
        parts.append(f"Kept at {Level[kept['level'].upper()].label} ({kept['because']}): a study never loses "
                     "priority it had.")
    if study.read_at is not None:
        by = f" by {study.read_by}" if study.read_by else ""
        parts.append(f"Read{by} at {study.read_at:%Y-%m-%d %H:%M} UTC: no longer waiting.")
        return None, " ".join(parts)
    where = standing(base, study.waiting_since, now, policy)
    waited = format_duration(now - study.waiting_since)
    if where.escalated:
        climbs = ", then ".join(f"to {level.label} at {format_duration(at - study.waiting_since)}"
                                for level, at in where.escalations)
        parts.append(f"Escalated by age {climbs} (waiting {waited}).")
    else:
        parts.append(f"Waiting {waited}.")
    if where.next_escalation is not None:
        level, at = where.next_escalation
        parts.append(f"Climbs to {level.label} in {format_duration(at - now)} if still unread.")
    elif where.level < Level.CRITICAL:
        parts.append(f"{where.level.label.capitalize()} is as high as age raises a study.")
    return where, " ".join(parts)
