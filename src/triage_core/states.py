"""Names of states and audit actions, in one place."""

from __future__ import annotations

from enum import IntEnum, StrEnum


class StudyStatus(StrEnum):
    RECEIVING = "RECEIVING"
    READY = "READY"
    PROCESSING = "PROCESSING"
    DONE = "DONE"
    SKIPPED = "SKIPPED"
    FAILED = "FAILED"


#: States a study can still be (re)queued from after new instances arrive.
TERMINAL = frozenset({StudyStatus.DONE, StudyStatus.SKIPPED, StudyStatus.FAILED})


class ExportStatus(StrEnum):
    EXPORT_PENDING = "EXPORT_PENDING"
    EXPORTED = "EXPORTED"
    EXPORT_FAILED = "EXPORT_FAILED"


class JobStatus(StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    DONE = "DONE"
    FAILED = "FAILED"


class ResultKind(StrEnum):
    SR = "SR"
    HEATMAP = "HEATMAP"
    PARAMETRIC_MAP = "PARAMETRIC_MAP"


class AuditAction(StrEnum):
    INSTANCE_RECEIVED = "INSTANCE_RECEIVED"
    INSTANCE_DUPLICATE = "INSTANCE_DUPLICATE"
    INSTANCE_REJECTED = "INSTANCE_REJECTED"
    #: The DICOM node refused a connection or association (network, limits, AE titles, TLS).
    ASSOCIATION_REJECTED = "ASSOCIATION_REJECTED"
    #: The DICOM node ended an association whose peer broke a bound (timeout, PDU or data set size).
    ASSOCIATION_ABORTED = "ASSOCIATION_ABORTED"
    #: A DICOM peer queried (C-FIND) or retrieved (C-GET, C-MOVE) study data.
    DICOM_QUERY = "DICOM_QUERY"
    DICOM_RETRIEVE = "DICOM_RETRIEVE"
    STATUS_CHANGED = "STATUS_CHANGED"
    JOB_ENQUEUED = "JOB_ENQUEUED"
    RESULT_STORED = "RESULT_STORED"
    RESULT_SUPERSEDED = "RESULT_SUPERSEDED"
    EXPORT_STATUS = "EXPORT_STATUS"
    EXPORT_RETRY_REQUESTED = "EXPORT_RETRY_REQUESTED"
    READ_WORKLIST = "READ_WORKLIST"
    READ_STUDY = "READ_STUDY"
    READ_SR = "READ_SR"
    # A radiologist marked a study read (it leaves the waiting queue) or unread again
    MARKED_READ = "MARKED_READ"
    MARKED_UNREAD = "MARKED_UNREAD"
    READ_HEATMAPS = "READ_HEATMAPS"
    READ_PARAMETRIC_MAPS = "READ_PARAMETRIC_MAPS"
    READ_AUDIT = "READ_AUDIT"
    # DICOMweb (QIDO-RS query, WADO-RS retrieval of instances and metadata)
    QUERY = "QUERY"
    READ_INSTANCES = "READ_INSTANCES"
    READ_METADATA = "READ_METADATA"
    READ_RENDERED = "READ_RENDERED"
    VERIFY_AUDIT = "VERIFY_AUDIT"
    # Security alerts: refused credentials, a role that may not (and ASSOCIATION_* above)
    AUTH_REFUSED = "AUTH_REFUSED"
    ACCESS_DENIED = "ACCESS_DENIED"
    # User management (API keys)
    USER_CREATED = "USER_CREATED"
    USER_REVOKED = "USER_REVOKED"


class AuditOutcome(IntEnum):
    """DICOM PS3.15 A.5 EventOutcomeIndicator."""

    SUCCESS = 0
    MINOR_FAILURE = 4
    SERIOUS_FAILURE = 8
    MAJOR_FAILURE = 12


class Role(StrEnum):
    """What an authenticated principal may do (README "Authentication")."""

    RADIOLOGIST = "radiologist"  # worklist, study detail, results, DICOMweb
    AUDITOR = "auditor"  # audit queries and verification
    ADMIN = "admin"  # both, plus operations (user management, export retries)


class Permission(StrEnum):
    READ_STUDIES = "read_studies"
    READ_AUDIT = "read_audit"
    OPERATE = "operate"


ROLE_PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.RADIOLOGIST: frozenset({Permission.READ_STUDIES}),
    Role.AUDITOR: frozenset({Permission.READ_AUDIT}),
    Role.ADMIN: frozenset({Permission.READ_STUDIES, Permission.READ_AUDIT, Permission.OPERATE}),
}

