"""Triage priority from the findings the model called present."""

from __future__ import annotations

from typing import Iterable

from .states import FINDING_WEIGHTS
from .values import FindingResult


def compute_priority(findings: Iterable[FindingResult]) -> float:
    """Sum of weight x probability over present findings; the highest per finding across images.

    0 means "nothing flagged". Unknown finding names weigh 10.
    """
    best: dict[str, float] = {}
    for finding in findings:
        if finding.present:
            best[finding.finding] = max(best.get(finding.finding, 0.0), finding.probability)
    return round(sum(FINDING_WEIGHTS.get(name, 10.0) * p for name, p in best.items()), 3)


def keep_priority(previous: float | None, new: float) -> float:
    """A study never loses priority it already had."""
    return max(previous or 0.0, new)


def urgency_order(findings: Iterable[str]) -> tuple[str, ...]:
    """Finding names, the most urgent first (the order in which they get a heatmap of their own)."""
    return tuple(sorted(findings, key=lambda name: -FINDING_WEIGHTS.get(name, 10.0)))
