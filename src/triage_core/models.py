"""SQLAlchemy models of the triage worklist. One row per study; every transition is also an event row."""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    event,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is not None:
            if value.tzinfo is None:
                raise ValueError("naive datetime given to a UTC column")
            value = value.astimezone(timezone.utc)
            if dialect.name == "sqlite":
                value = value.replace(tzinfo=None)
        return value

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value


UID = String(64)
AwareDateTime = UTCDateTime()


def _received_at(context) -> datetime:
    """A new study starts waiting when it arrives."""
    return context.get_current_parameters().get("received_at") or utcnow()


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True, index=True)
    accession_number: Mapped[str] = mapped_column(String(64), default="")
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    patient_name: Mapped[str] = mapped_column(String(324), default="")
    study_date: Mapped[str] = mapped_column(String(8), default="")
    study_description: Mapped[str] = mapped_column(String(64), default="")
    status: Mapped[str] = mapped_column(String(16), index=True)
    status_reason: Mapped[str] = mapped_column(Text, default="")
    received_at: Mapped[datetime] = mapped_column(AwareDateTime, default=utcnow, index=True)
    last_instance_at: Mapped[datetime] = mapped_column(AwareDateTime, default=utcnow, index=True)
    #: When an association that sent instances of the study was released after its last instance:
    #: the sender says it is done, and the quiet period ends early (CXR_TRIAGE_READY_ON_RELEASE).
    released_at: Mapped[datetime | None] = mapped_column(AwareDateTime, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(AwareDateTime, default=utcnow, onupdate=utcnow)
    model_name: Mapped[str] = mapped_column(String(128), default="")
    model_version: Mapped[str] = mapped_column(String(64), default="")
    model_demo: Mapped[bool] = mapped_column(Boolean, default=False)
    # The worklist policy (triage_core.priority): the base level only ever rises; age escalation is
    # computed from waiting_since when the worklist is read, never written by a timer.
    #: -1 awaiting analysis, 0 nothing flagged, 1 minor, 2 routine, 3 not analysed, 4 urgent, 5 critical.
    priority_level: Mapped[int] = mapped_column(Integer, default=-1)
    #: What set the level, for its explanation: the flagged findings with their urgency class, or the
    #: SKIPPED/FAILED reason, and what an earlier result kept.
    priority_detail: Mapped[dict] = mapped_column(JSON, default=dict)
    #: Since when the study waits to be read: its arrival, or new images after it was read.
    waiting_since: Mapped[datetime] = mapped_column(AwareDateTime, default=_received_at)
    #: Marked read by a radiologist (then it leaves the waiting queue); None while waiting.
    read_at: Mapped[datetime | None] = mapped_column(AwareDateTime, nullable=True)
    read_by: Mapped[str] = mapped_column(String(128), default="")

    __table_args__ = (
        # One range scan per base level gives a worklist page in priority order (dashboard_api.crud).
        Index("ix_studies_waiting", "priority_level", "waiting_since", "id",
              sqlite_where=text("read_at IS NULL"), postgresql_where=text("read_at IS NULL")),
        Index("ix_studies_read", "read_at", "id",
              sqlite_where=text("read_at IS NOT NULL"), postgresql_where=text("read_at IS NOT NULL")),
        # The same with the status first, for a worklist filtered by status.
        Index("ix_studies_status_waiting", "status", "priority_level", "waiting_since", "id",
              sqlite_where=text("read_at IS NULL"), postgresql_where=text("read_at IS NULL")),
        Index("ix_studies_status_read", "status", "read_at", "id",
              sqlite_where=text("read_at IS NOT NULL"), postgresql_where=text("read_at IS NOT NULL")),
    )

    instances: Mapped[list["Instance"]] = relationship(back_populates="study", order_by="Instance.id")
    findings: Mapped[list["Finding"]] = relationship(back_populates="study", order_by="Finding.id")
    results: Mapped[list["ResultObject"]] = relationship(back_populates="study", order_by="ResultObject.id")
    exports: Mapped[list["Export"]] = relationship(back_populates="study", order_by="Export.id")
    jobs: Mapped[list["Job"]] = relationship(back_populates="study", order_by="Job.id")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    modality: Mapped[str] = mapped_column(String(16), default="")
    path: Mapped[str] = mapped_column(String(512))
    size_bytes: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    calling_ae_title: Mapped[str] = mapped_column(String(16), default="")
    received_at: Mapped[datetime] = mapped_column(AwareDateTime, default=utcnow)
    eligible: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    eligibility_reason: Mapped[str] = mapped_column(Text, default="")

    study: Mapped[Study] = relationship(back_populates="instances")


class Job(Base):
    """One analysis of a study. This row, not the broker, is the truth about the work (triage_core.work)."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    created_at: Mapped[datetime] = mapped_column(AwareDateTime, default=utcnow)
    #: When a message for this job was last put on the broker (None: to be sent).
    enqueued_at: Mapped[datetime | None] = mapped_column(AwareDateTime, nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(AwareDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(AwareDateTime, nullable=True)
    #: How many times a worker started it.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str] = mapped_column(Text, default="")
    #: While RUNNING: the worker holding it ("host:pid:start") and until when; renewed while it works.
    locked_by: Mapped[str] = mapped_column(String(128), default="")
    locked_until: Mapped[datetime | None] = mapped_column(AwareDateTime, nullable=True)

    study: Mapped[Study] = relationship(back_populates="jobs")


class Finding(Base):
    __tablename__ = "findings"
    __table_args__ = (
        UniqueConstraint("study_id", "sop_instance_uid", "finding"),
        # The worklist's finding filter: the studies where a finding is flagged.
        Index("ix_findings_flagged", "finding", "urgency", "study_id",
              sqlite_where=text("present"), postgresql_where=text("present")),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID)
    finding: Mapped[str] = mapped_column(String(64))
    probability: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    present: Mapped[bool] = mapped_column(Boolean)
    #: The finding's urgency class from the model card that scored it (critical, urgent, routine, minor).
    urgency: Mapped[str] = mapped_column(String(16), default="")

    study: Mapped[Study] = relationship(back_populates="findings")


class ResultObject(Base):
    __tablename__ = "result_objects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    series_instance_uid: Mapped[str] = mapped_column(UID)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    source_sop_instance_uid: Mapped[str] = mapped_column(UID, default="")
    finding: Mapped[str] = mapped_column(String(64), default="")
    path: Mapped[str] = mapped_column(String(512))
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(AwareDateTime, default=utcnow)
    #: Set when a later analysis of the study no longer made this object: it is
    #: never exported again nor listed by the API; its file is kept only when
    #: CXR_TRIAGE_KEEP_SUPERSEDED_RESULTS says so.
    superseded_at: Mapped[datetime | None] = mapped_column(AwareDateTime, nullable=True)

    study: Mapped[Study] = relationship(back_populates="results")


class Export(Base):
    """The results of a study going to one destination, with its retry schedule (triage_core.work)."""

    __tablename__ = "exports"
    __table_args__ = (UniqueConstraint("study_id", "destination"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    destination: Mapped[str] = mapped_column(String(300))
    status: Mapped[str] = mapped_column(String(16), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str] = mapped_column(Text, default="")
    updated_at: Mapped[datetime] = mapped_column(AwareDateTime, default=utcnow, onupdate=utcnow)
    #: Since when the current results wait for this destination (the give-up window counts from here).
    pending_since: Mapped[datetime | None] = mapped_column(AwareDateTime, nullable=True)
    #: No attempt before this time (exponential backoff with jitter after a failure).
    next_attempt_at: Mapped[datetime | None] = mapped_column(AwareDateTime, nullable=True)
    #: When a message for this export was last put on the broker (None: to be sent when due).
    enqueued_at: Mapped[datetime | None] = mapped_column(AwareDateTime, nullable=True)
    locked_by: Mapped[str] = mapped_column(String(128), default="")
    locked_until: Mapped[datetime | None] = mapped_column(AwareDateTime, nullable=True)

    study: Mapped[Study] = relationship(back_populates="exports")


class Lease(Base):
    """A named lease held by one process at a time across hosts (the sweeper's)."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(128), default="")
    until: Mapped[datetime] = mapped_column(AwareDateTime)


class Heartbeat(Base):
    """A model worker process or a DICOM node reporting in (triage_core.work.beat); readiness reads them.

    A row not renewed for three heartbeat intervals is a process that is gone or stuck; the
    sweeper forgets rows a day old.
    """

    __tablename__ = "heartbeats"

    #: ``host:pid:start`` (triage_core.work.holder_id).
    holder: Mapped[str] = mapped_column(String(128), primary_key=True)
    #: "worker" or "node".
    service: Mapped[str] = mapped_column(String(16))
    hostname: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    #: The cxr-triage version the process runs.
    version: Mapped[str] = mapped_column(String(64), default="")
    started_at: Mapped[datetime] = mapped_column(AwareDateTime, default=utcnow)
    seen_at: Mapped[datetime] = mapped_column(AwareDateTime, default=utcnow, index=True)
    model_name: Mapped[str] = mapped_column(String(128), default="")
    model_version: Mapped[str] = mapped_column(String(64), default="")
    #: "torch", "onnx", "onnx-int8" as loaded.
    model_runtime: Mapped[str] = mapped_column(String(32), default="")
    model_device: Mapped[str] = mapped_column(String(32), default="")
    model_loaded: Mapped[bool] = mapped_column(Boolean, default=False)
    #: Why the model could not be loaded (empty when it was, or for a node).
    model_error: Mapped[str] = mapped_column(Text, default="")


class AuditEvent(Base):
    """One audit event; rows are append-only (database triggers refuse UPDATE and DELETE).

    Each row carries the hash of the one before it (``prev_hash``) and its own ``hash``
    over its canonical bytes (``triage_core.audit_chain``); ``seq`` is its place in the
    chain (1, 2, 3... in commit order). Rows are written only by ``triage_core.audit``.
    """

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(AwareDateTime, default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(32), index=True)
    study_id: Mapped[int | None] = mapped_column(ForeignKey("studies.id"), nullable=True, index=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, default="")
    detail: Mapped[dict] = mapped_column(JSON, default=dict)
    #: DICOM PS3.15 A.5 EventOutcomeIndicator: 0 success, 4 minor failure, 8 serious, 12 major.
    outcome: Mapped[int] = mapped_column(Integer, default=0)
    #: The requestor's network address (API client, DICOM peer), when there is one.
    client_address: Mapped[str] = mapped_column(String(64), default="")
    #: The study's Patient ID (the ATNA Patient participant object); never the name.
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    seq: Mapped[int] = mapped_column(BigInteger, unique=True)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64), unique=True)


class AuditChainHead(Base):
    """The chain's last link (one row, id 1): locked by each writer while it appends.

    Database triggers move it with every inserted event and refuse to move it back.
    """

    __tablename__ = "audit_chain_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    hash: Mapped[str] = mapped_column(String(64))


class ApiUser(Base):
    """A person or program with an API key. Only the key's SHA-256 is stored; revoked keys stay as history."""

    __tablename__ = "api_users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    #: The key's first characters (``cxrk_`` + 6), to tell keys apart in listings; not enough to use it.
    key_prefix: Mapped[str] = mapped_column(String(16))
    key_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(AwareDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(AwareDateTime, nullable=True)


@event.listens_for(Base.metadata, "after_create")
def _install_audit_triggers(target, connection, tables=(), **_kw) -> None:
    """``create_all`` makes the audit chain's head row and triggers too (migrations do it in 0003)."""
    created = {table.name for table in tables}
    if {"audit_events", "audit_chain_head"} <= created:
        from .audit_chain import install

        install(connection)
