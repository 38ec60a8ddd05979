"""Frozen value objects passed between stages (node -> worker -> results -> DB).

They validate in their constructors so that a bad value fails where it is
made, not three stages later.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping


@dataclass(frozen=True)
class AlgorithmInfo:
    """Which model made a result. Goes into every SR, heatmap and API answer."""

    name: str
    version: str
    weights_sha256: str
    demo: bool
    manufacturer: str = "CXR Triage"
    parameters: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for attr in ("name", "version", "weights_sha256"):
            if not getattr(self, attr):
                raise ValueError(f"AlgorithmInfo.{attr} must not be empty")
        if len(self.weights_sha256) != 64:
            raise ValueError("AlgorithmInfo.weights_sha256 must be a hex SHA-256 (64 characters)")
        object.__setattr__(self, "parameters", MappingProxyType(dict(self.parameters)))

    @property
    def display_name(self) -> str:
        """Name and version, with the demo label where it applies."""
        label = f"{self.name} {self.version}"
        return f"{label} (DEMO WEIGHTS - not trained on clinical data)" if self.demo else label


@dataclass(frozen=True)
class FindingResult:
    """One finding scored on one image."""

    finding: str
    probability: float
    threshold: float
    present: bool

    def __post_init__(self) -> None:
        if not self.finding:
            raise ValueError("FindingResult.finding must not be empty")
        for attr in ("probability", "threshold"):
            value = getattr(self, attr)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"FindingResult.{attr} must be a finite number in [0, 1], got {value!r}")
        if bool(self.present) != (self.probability >= self.threshold):
            raise ValueError("FindingResult.present must equal probability >= threshold")


@dataclass(frozen=True)
class ImageResult:
    """All findings scored on one source image, in the model's label order."""

    sop_instance_uid: str
    findings: tuple[FindingResult, ...]
    #: SHA-256 of the stored source instance, when known: result UIDs follow the
    #: source's content, so a source resent with other pixels gets new results.
    source_sha256: str = ""

    def __post_init__(self) -> None:
        if not self.sop_instance_uid:
            raise ValueError("ImageResult.sop_instance_uid must not be empty")
        if self.source_sha256 and len(self.source_sha256) != 64:
            raise ValueError("ImageResult.source_sha256 must be a hex SHA-256 (64 characters) or empty")
        object.__setattr__(self, "findings", tuple(self.findings))
        names = [f.finding for f in self.findings]
        if len(set(names)) != len(names):
            raise ValueError("ImageResult.findings has a finding twice")

    @property
    def positive(self) -> tuple[FindingResult, ...]:
        return tuple(f for f in self.findings if f.present)


@dataclass(frozen=True)
class Eligibility:
    """Whether a source image goes to the model, and why not."""

    eligible: bool
    reason: str = ""
    view: str = ""

    def __post_init__(self) -> None:
        if not self.eligible and not self.reason:
            raise ValueError("Eligibility: an ineligible image needs a reason")
