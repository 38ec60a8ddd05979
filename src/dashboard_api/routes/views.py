"""Small ORM -> schema conversions shared by the routers."""

from __future__ import annotations

from typing import Any

from triage_core.models import Study

from ..crud import ExportCounts
from ..schemas import ExportSummary, ModelInfo, StudyBase


def model_info(study: Study) -> ModelInfo | None:
    if not study.model_name:
        return None
    return ModelInfo(name=study.model_name, version=study.model_version, demo=study.model_demo)


def study_fields(study: Study) -> dict[str, Any]:
    """The ``StudyBase`` fields of a study row."""
    fields = {name: getattr(study, name) for name in StudyBase.model_fields if name != "model"}
    fields["model"] = model_info(study)
    return fields


def export_summary(counts: ExportCounts) -> ExportSummary:
    return ExportSummary(
        status=counts.status,
        total=counts.total,
        exported=counts.exported,
        pending=counts.pending,
        failed=counts.failed,
    )
