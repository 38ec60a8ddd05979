"""API schemas, layered by purpose: ``...Base`` -> ``...Public``, list wrappers carry ``data`` + ``count``.

Inputs (query parameter models) forbid unknown fields so that a misspelt
filter is a 422, not a silently ignored parameter. Outputs are built from the
ORM rows (``from_attributes``) and never expose storage paths.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from triage_core.states import AuditAction, ExportStatus, JobStatus, ResultKind, Role, StudyStatus
from triage_core.storage import is_valid_uid

NOT_FOR_DIAGNOSTIC_USE = "Not for diagnostic use."
DEMO_WEIGHTS = "DEMO WEIGHTS, not trained on clinical data."

MAX_WORKLIST_LIMIT = 500
MAX_AUDIT_LIMIT = 1000
#: Offsets beyond any list we hold (and within every database's integers).
MAX_OFFSET = 1_000_000_000
#: The worklist is read from its top; deeper pages cost the database offset + limit rows per level.
MAX_WORKLIST_OFFSET = 100_000
#: A finding name as model cards spell them (Pleural_Thickening, Lung Opacity).
FINDING_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_ ()/-]{0,63}$"
#: A DICOM UID (digits and dots, no leading zeros), as declared in the OpenAPI schema.
UID_PATTERN = r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$"


def disclaimer(*, demo: bool) -> str:
    """The text every answer that shows model output carries."""
    return f"{NOT_FOR_DIAGNOSTIC_USE} {DEMO_WEIGHTS}" if demo else NOT_FOR_DIAGNOSTIC_USE


class _Output(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- errors ----------------------------------------------------------------


class ErrorPublic(BaseModel):
    """Every 4xx (and 5xx) answer: a human-readable message."""

    detail: str


class ValidationErrorPublic(ErrorPublic):
    """A 422: the message, plus each problem as ``{loc, msg, type}`` for programs."""

    errors: list[dict[str, Any]] = []


def error_response(description: str, model: type[ErrorPublic] = ErrorPublic) -> dict[str, Any]:
    """An OpenAPI ``responses`` entry for a JSON error, whatever media type the route answers with."""
    return {"description": description, "content": {"application/json": {"schema": model.model_json_schema()}}}


# --- model ------------------------------------------------------------------


class ModelInfo(_Output):
    """Which model produced the results (from its model card)."""

    name: str
    version: str
    demo: bool = Field(description="True when the results come from the bundled demo weights")


# --- findings ---------------------------------------------------------------


class FindingBase(_Output):
    finding: str
    probability: float = Field(ge=0.0, le=1.0)
    threshold: float = Field(ge=0.0, le=1.0, description="Operating point: present when probability >= threshold")
    urgency: str = Field(description="The finding's urgency class in the model card that scored it: critical, "
                                     "urgent, routine or minor")


class TopFinding(FindingBase):
    """A flagged finding on the worklist (highest probability over the study's images), most urgent first."""


class FindingPublic(FindingBase):
    present: bool


class ImageFindingsPublic(_Output):
    """All scored findings of one source image, in the model's label order."""

    sop_instance_uid: str
    findings: list[FindingPublic]


# --- exports, instances, results, jobs ------------------------------------


class ExportSummary(_Output):
    """Export state over all destinations of a study."""

    status: ExportStatus | None = Field(
        description="EXPORT_FAILED if any destination failed, else EXPORT_PENDING if any is pending, "
        "else EXPORTED; null when the study has no exports"
    )
    total: int
    exported: int
    pending: int
    failed: int


class ExportPublic(_Output):
    destination: str
    status: ExportStatus
    attempts: int
    last_error: str
    updated_at: datetime
    next_attempt_at: datetime | None = Field(
        default=None, description="While pending: no attempt before this time (backoff after a failure)")


class ExportRetryStudy(_Input):
    """Send one study's results again, whatever the status of its exports."""

    study_instance_uid: str = Field(min_length=1, max_length=64, pattern=r"^[0-9]+(\.[0-9]+)*$")


class ExportRetryFailed(_Input):
    """Send again every export that gave up (EXPORT_FAILED)."""

    failed: Literal[True]


ExportRetry = ExportRetryStudy | ExportRetryFailed


class ExportRetried(BaseModel):
    study_instance_uid: str
    destination: str
    status: ExportStatus


class ExportsRetried(BaseModel):
    data: list[ExportRetried]
    count: int


class InstancePublic(_Output):
    sop_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    modality: str
    received_at: datetime
    eligible: bool | None = Field(description="null until the worker has checked the image")
    eligibility_reason: str


class ResultObjectPublic(_Output):
    kind: ResultKind
    sop_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    source_sop_instance_uid: str
    finding: str
    model_name: str
    model_version: str
    created_at: datetime


class JobPublic(_Output):
    id: int
    status: JobStatus
    created_at: datetime
    enqueued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    attempts: int
    error: str


# --- priority ---------------------------------------------------------------

LevelName = Literal["critical", "urgent", "not_analysed", "routine", "minor", "nothing_flagged", "awaiting_analysis"]
AnalysisName = Literal["flagged", "nothing_flagged", "not_analysed", "awaiting_analysis"]


class PriorityFinding(BaseModel):
    """A flagged finding that sets the study's level."""

    finding: str
    urgency: str = Field(description="critical, urgent, routine or minor (from the model card)")
    probability: float = Field(ge=0.0, le=1.0)
    threshold: float = Field(ge=0.0, le=1.0)


class PriorityPublic(BaseModel):
    """Where a study stands in the worklist, and why (README "Worklist policy")."""

    level: int = Field(ge=0, le=5, description="5 critical, 4 urgent, 3 not analysed, 2 routine, 1 minor, "
                                               "0 nothing flagged or awaiting analysis; higher is read first")
    name: LevelName = Field(description="The level's name; awaiting_analysis is level 0 but not 'nothing flagged'")
    base: LevelName = Field(description="The level the study's results give, before escalation by age")
    analysis: AnalysisName = Field(description="flagged / nothing_flagged: the model scored it; not_analysed: "
                                               "SKIPPED or FAILED, no model opinion; awaiting_analysis: not yet")
    waiting: bool = Field(description="False once a radiologist marked it read")
    escalated: bool = Field(description="Raised above its base level by the time it has waited")
    waiting_since: datetime
    next_escalation_at: datetime | None = Field(description="When it climbs one level if still unread")
    next_level: LevelName | None
    flagged: list[PriorityFinding] = Field(description="Flagged findings, most urgent first")
    explanation: str = Field(description="The priority in words: what set it, what kept it, how age raised it")


class PolicyPublic(BaseModel):
    """The escalation in force (CXR_TRIAGE_WORKLIST_ESCALATION_MINUTES)."""

    escalation_minutes: dict[str, float] = Field(description="Minutes an unread study waits at a level before it "
                                                             "climbs one")
    ceiling: LevelName = Field(description="Age raises a study at most to this level")


# --- studies ----------------------------------------------------------------


class StudyBase(_Output):
    study_instance_uid: str
    accession_number: str
    patient_id: str
    patient_name: str
    study_date: str
    status: StudyStatus
    status_reason: str = Field(description="Why a study was SKIPPED or FAILED (empty otherwise)")
    priority: PriorityPublic
    received_at: datetime
    updated_at: datetime
    model: ModelInfo | None = Field(description="null until a model has processed the study")
    read_at: datetime | None = Field(description="When a radiologist marked it read (null while it waits)")
    read_by: str


class WorklistItemPublic(StudyBase):
    top_findings: list[TopFinding] = Field(description="Up to 3 flagged findings, most urgent class first, then "
                                                       "highest probability")
    export: ExportSummary


class WorklistPublic(BaseModel):
    data: list[WorklistItemPublic]
    count: int = Field(description="Studies matching the filter (before limit/offset), counted up to 1,000")
    count_exact: bool = Field(description="False when more than 1,000 studies match (count is then 1,000)")
    as_of: datetime = Field(description="The moment the levels and ages were computed for")
    policy: PolicyPublic
    disclaimer: str


class StudyDetailPublic(StudyBase):
    study_description: str
    last_instance_at: datetime
    images: list[ImageFindingsPublic] = Field(description="All findings per source image")
    instances: list[InstancePublic]
    results: list[ResultObjectPublic]
    heatmap_sop_instance_uids: list[str] = Field(
        description="Retrieve one with GET /studies/{study_instance_uid}/heatmaps/{sop_instance_uid}"
    )
    export: ExportSummary
    exports: list[ExportPublic]
    jobs: list[JobPublic]
    viewer_url: str | None = Field(description="Opens the study in the hospital's viewer "
                                               "(CXR_TRIAGE_VIEWER_URL_TEMPLATE); null when none is configured")
    disclaimer: str


class StudyReadPublic(BaseModel):
    """A study's read state."""

    study_instance_uid: str
    read_at: datetime | None
    read_by: str
    priority: PriorityPublic


# --- structured report as text ------------------------------------------------


class SrItemPublic(BaseModel):
    """One content item of the SR content tree (PS3.3 C.17.3), its value made readable."""

    relationship: str = Field(description="CONTAINS, HAS OBS CONTEXT, HAS CONCEPT MOD, HAS PROPERTIES, "
                                          "INFERRED FROM...; empty for the root")
    value_type: str = Field(description="CONTAINER, CODE, NUM, TEXT, UIDREF, IMAGE, PNAME, DATETIME...")
    name: str = Field(description="The concept name's meaning")
    code: str = Field(description="The concept name as (value, scheme), e.g. (126000, DCM)")
    value: str = Field(description="The value in words: code meaning, number with its UCUM unit, text, UID...")
    children: list["SrItemPublic"] = []


class SrContentPublic(BaseModel):
    """The study's structured report as readable content (the newest, if re-processed)."""

    sop_instance_uid: str
    series_instance_uid: str
    title: str
    completion_flag: str
    verification_flag: str
    content_datetime: str
    root: SrItemPublic
    text: str = Field(description="The same tree as indented text, one content item per line")
    disclaimer: str


class PrincipalPublic(BaseModel):
    """Who the credentials belong to, and what they may do."""

    name: str
    roles: list[Role]
    method: Literal["api-key", "oidc", "local"]
    permissions: list[str]


# --- audit -------------------------------------------------------------------


class AuditEventPublic(_Output):
    id: int
    seq: int = Field(description="Place in the hash chain (commit order)")
    at: datetime
    actor: str = Field(description="The authenticated principal, or system:<service> for our own services")
    action: str
    outcome: int = Field(description="DICOM PS3.15 EventOutcomeIndicator: 0 success, 4 minor, 8 serious, 12 major failure")
    client_address: str
    study_instance_uid: str
    patient_id: str
    detail: dict[str, Any]
    prev_hash: str = Field(description="SHA-256 (hex) of the event before this one")
    hash: str = Field(description="SHA-256 (hex) of this event's canonical bytes")


class AuditEventsPublic(BaseModel):
    data: list[AuditEventPublic]
    count: int = Field(description="Events matching the filter (before limit/offset)")


class AuditProblemPublic(BaseModel):
    kind: str = Field(description='"altered", "removed" or "reordered"')
    seq: int
    event_id: int | None
    message: str


class AuditVerificationPublic(BaseModel):
    intact: bool
    events: int = Field(description="Events verified (all of them when intact)")
    head_seq: int
    head_hash: str
    problem: AuditProblemPublic | None = Field(description="The first break in the chain; null when intact")


# --- users -------------------------------------------------------------------


class UserPublic(_Output):
    name: str
    role: Role
    key_prefix: str = Field(description="The key's first characters, to tell keys apart")
    created_at: datetime
    revoked_at: datetime | None


class UsersPublic(BaseModel):
    data: list[UserPublic]
    count: int


class UserCreate(_Input):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
    role: Role


class UserCreated(UserPublic):
    api_key: str = Field(description="The new key, shown this once: only its hash is stored")


# --- health ------------------------------------------------------------------


class HealthPublic(BaseModel):
    status: str = Field(description='"ok" or "error"')
    database: str = Field(description='"ok" or the error text')
    version: str
    model: ModelInfo | None = Field(
        default=None, description="Model of the most recently processed study (null before the first)"
    )


class LivePublic(BaseModel):
    status: str = Field(description='"alive": the API process answers (nothing else is checked)')
    version: str


class CheckPublic(BaseModel):
    name: str = Field(description="database, broker, workers, nodes, disk or exports")
    status: str = Field(description='"ok", "degraded" (working; a person should look) or "fail"')
    detail: str = Field(description="One line, no patient data")
    data: dict[str, Any] = Field(default_factory=dict)


class ReadinessPublic(BaseModel):
    status: str = Field(description='"ready", "degraded" (200) or "not_ready" (503)')
    version: str
    checks: list[CheckPublic]


# --- inputs ------------------------------------------------------------------


class WorklistQuery(_Input):
    status: list[StudyStatus] = Field(
        default_factory=list, description="Only studies in these states (repeat the parameter for several)"
    )
    finding: str | None = Field(None, min_length=1, max_length=64, pattern=FINDING_PATTERN,
                                description="Only studies where this finding is flagged (e.g. Pneumothorax)")
    received_from: datetime | None = Field(None, description="Only studies received at or after (ISO 8601; "
                                                             "without a time zone it is read as UTC)")
    received_to: datetime | None = Field(None, description="Only studies received at or before (ISO 8601)")
    read: bool | None = Field(None, description="false: only studies waiting to be read; true: only read ones; "
                                                "absent: both, waiting ones first")
    limit: int = Field(100, ge=1, le=MAX_WORKLIST_LIMIT)
    offset: int = Field(0, ge=0, le=MAX_WORKLIST_OFFSET)


class AuditQuery(_Input):
    study_instance_uid: str | None = Field(None, max_length=64, json_schema_extra={"pattern": UID_PATTERN})
    action: AuditAction | None = None
    actor: str | None = Field(None, min_length=1, max_length=128)
    since: datetime | None = Field(None, description="ISO 8601; without a time zone it is read as UTC")
    until: datetime | None = Field(None, description="ISO 8601; without a time zone it is read as UTC")
    limit: int = Field(100, ge=1, le=MAX_AUDIT_LIMIT)
    offset: int = Field(0, ge=0, le=MAX_OFFSET)

    @field_validator("study_instance_uid")
    @classmethod
    def _uid(cls, value: str | None) -> str | None:
        if value is not None and not is_valid_uid(value):
            raise ValueError("not a valid DICOM UID")
        return value
