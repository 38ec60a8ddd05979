"""The one place configuration is read (environment variables, and the env file that
`CXR_TRIAGE_ENV_FILE` names).

Names are fixed by DESIGN.md section 3; others script against them.
A `.env` in the working directory is never read on its own: a production file left
there must not configure a later local run (which could export to the real PACS).
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

ENV_PREFIX = "CXR_TRIAGE_"
#: The env file to read (KEY=VALUE lines); unset = none. Read by Settings alone.
ENV_FILE_VARIABLE = "CXR_TRIAGE_ENV_FILE"
#: CXR_TRIAGE_* names that are not settings of the service but are known (the test suite's switch).
OTHER_VARIABLES = frozenset({ENV_FILE_VARIABLE, "CXR_TRIAGE_REQUIRE_SERVICES"})
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
#: Settings whose values are never echoed in an error message.
SECRET_FIELDS = frozenset({"database_url", "broker_url", "api_key", "s3_secret_access_key"})

#: 1-16 printable ASCII characters, no backslash (the DICOM value separator), not all spaces.
_AE_TITLE = re.compile(r"^(?! *$)[\x20-\x5b\x5d-\x7e]{1,16}$")
_DESTINATION = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[^:?]+):(?P<port>\d{1,5})(?:\?(?P<options>.*))?$")


@dataclass(frozen=True)
class Destination:
    """A DICOM peer that receives our results by C-STORE (and C-MOVE sub-operations).

    Written ``AET@host:port``, or ``AET@host:port?tls`` for DICOM TLS (PS3.15
    B.9/B.12), optionally ``?tls&ca=/path/ca.pem`` to verify that peer against
    its own CA bundle instead of ``CXR_TRIAGE_TLS_CA_FILE`` (else the system's),
    and ``&server_name=NAME`` when its certificate names another host than the
    one we connect to. The text form round-trips (it keys the export rows).
    """

    ae_title: str
    host: str
    port: int
    tls: bool = False
    ca_file: str = ""
    server_name: str = ""

    @classmethod
    def parse(cls, text: str) -> "Destination":
        match = _DESTINATION.match(text.strip())
        if not match:
            raise ValueError(f"export destination {text!r} is not AET@host:port (or AET@host:port?tls)")
        ae_title, host, port = match["ae"].strip(), match["host"], int(match["port"])
        if not _AE_TITLE.match(ae_title) or "\\" in ae_title:
            raise ValueError(f"export destination {text!r}: invalid AE title")
        if not 0 < port < 65536:
            raise ValueError(f"export destination {text!r}: port out of range")
        options: dict[str, str] = {}
        for item in (match["options"] or "").split("&"):
            if item:
                key, _, value = item.partition("=")
                options[key.strip().lower()] = value.strip()
        unknown = set(options) - {"tls", "ca", "server_name"}
        if unknown:
            raise ValueError(f"export destination {text!r}: unknown option(s) {', '.join(sorted(unknown))} "
                             "(known: tls, ca=PATH, server_name=NAME)")
        tls = "tls" in options
        if not tls and ("ca" in options or "server_name" in options):
            raise ValueError(f"export destination {text!r}: ca= and server_name= need ?tls")
        if "tls" in options and options["tls"] not in ("", "1", "true", "yes"):
            raise ValueError(f"export destination {text!r}: write ?tls, not ?tls={options['tls']}")
        return cls(ae_title, host, port, tls, options.get("ca", ""), options.get("server_name", ""))

    def __str__(self) -> str:
        text = f"{self.ae_title}@{self.host}:{self.port}"
        if self.tls:
            text += "?tls" + (f"&ca={self.ca_file}" if self.ca_file else "") + (
                f"&server_name={self.server_name}" if self.server_name else "")
        return text


#: JWS algorithms an OIDC token may use: asymmetric only (an HS* key would be the public JWKS).
ASYMMETRIC_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384",
                                   "ES512", "EdDSA"})
ROLES = ("radiologist", "auditor", "admin")
#: Passwords that ship in examples and images: refused wherever a secret is configured.
DEFAULT_SECRETS = frozenset({"cxr", "cxr_triage", "change-me", "changeme", "changethis", "postgres", "password",
                             "secret", "admin", "redis", "default", "example"})
_SYSLOG = re.compile(r"^(udp|tcp|tls)://[^/:]+:\d{1,5}$")
#: What a viewer URL template may name (never patient names or birth dates: URLs end up in logs).
VIEWER_PLACEHOLDERS = frozenset({"study_instance_uid", "accession_number"})


def _secure_url(url: str) -> bool:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return True
    return parts.scheme == "http" and is_loopback(parts.hostname or "")


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only this machine (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host.lower() in {"localhost", "localhost."}:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _split_list(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    """Every `CXR_TRIAGE_*` setting. Bad values stop start-up with a message."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_file=None, env_file_encoding="utf-8", extra="ignore")

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Arguments, then the environment, then the file CXR_TRIAGE_ENV_FILE names (if any)."""
        env_file = env_file_path()
        sources = [init_settings, env_settings]
        if env_file is not None:
            sources.append(DotEnvSettingsSource(settings_cls, env_file=env_file, env_file_encoding="utf-8"))
        return (*sources, file_secret_settings)

    data_dir: Path = Path("./var")
    database_url: str = ""
    broker_url: str = ""
    ae_title: str = "CXR_TRIAGE"
    dicom_port: int = Field(11112, ge=1, le=65535)
    dicom_host: str = "0.0.0.0"
    allowed_calling_aets: Annotated[list[str], NoDecode] = []
    export_destinations: Annotated[list[Destination], NoDecode] = []
    series_quiet_seconds: float = Field(5.0, ge=0)
    #: A study is ready as soon as the association that sent it is released (the modality closed it
    #: after a complete study), without waiting for the quiet period; a later instance starts it again.
    ready_on_release: bool = True
    api_host: str = "127.0.0.1"
    api_port: int = Field(8000, ge=1, le=65535)
    model_path: Path | None = None
    # Beyond DESIGN.md section 3:
    #: Model worker processes; unset = one per usable CPU core (at most 8) on the CPU, 1 on a GPU.
    worker_concurrency: int | None = Field(None, ge=1)
    model_runtime: str = "auto"
    #: Intra-op threads per worker process; unset = the cores divided among the processes.
    model_threads: int | None = Field(None, ge=1)
    #: "cpu", "cuda", "cuda:1"...; empty = the first GPU when torch sees one, else the CPU.
    model_device: str = ""
    #: Also write a Parametric Map of the raw CAM beside each heatmap Secondary Capture.
    parametric_map: bool = True
    #: Studies a model process scores in one batch (queued studies are claimed together, waiting at most
    #: batch_wait_ms for them); unset = 8 on a GPU, 1 on the CPU (where a batch gains nothing).
    batch_studies: int | None = Field(None, ge=1, le=64)
    batch_wait_ms: float = Field(20.0, ge=0, le=1000)
    #: Heatmap Secondary Captures: longest side in pixels, how many positive findings (the most urgent)
    #: get an image each (beyond that, one overview image shows them all), JPEG baseline or none.
    heatmap_max_side: int = Field(768, ge=64, le=4096)
    heatmap_findings: int = Field(2, ge=0, le=14)
    heatmap_compression: Literal["jpeg", "none"] = "jpeg"
    #: Keep the files of result objects that a re-analysis of the study no longer
    #: makes (they are never exported again nor listed); False deletes them.
    keep_superseded_results: bool = False
    # The work queue (triage_core.work): SQL is the truth, the broker only carries wake-ups.
    #: A RUNNING job or export holds a lease this long, renewed every third of it while it works.
    job_lease_seconds: float = Field(60.0, gt=0)
    #: A job whose worker was lost this many times ends FAILED ("worker lost N times").
    job_max_attempts: int = Field(3, ge=1)
    #: A job still running after this long stops renewing its lease, so that another worker takes it.
    job_max_seconds: float = Field(1800.0, gt=0)
    #: Queued work whose message is older than this is published again (the broker may have lost it).
    requeue_after_seconds: float = Field(300.0, gt=0)
    #: How often the node's scheduler runs the sweeper (one sweeper at a time across hosts).
    sweep_interval_seconds: float = Field(5.0, gt=0)
    #: Export retries: exponential backoff from this base, with jitter, each wait at most
    #: export_max_delay_seconds, until the destination has refused for export_give_up_hours.
    export_backoff_seconds: float = Field(10.0, gt=0)
    export_max_delay_seconds: float = Field(600.0, gt=0)
    export_give_up_hours: float = Field(24.0, gt=0)
    #: A study's first export attempt runs in its model process right after the job (no queue hop);
    #: false sends every attempt through the queue.
    export_inline: bool = True
    log_level: str = "INFO"
    #: "json" (one object a line, for a collector) or "plain"; empty = plain on a terminal, else JSON.
    log_format: Literal["", "json", "plain"] = ""
    # Operability (README "Health and metrics").
    #: Interface of the node's and the worker's Prometheus endpoints (the API serves /metrics itself).
    metrics_host: str = "127.0.0.1"
    #: Port of the node's /metrics (0 = none).
    node_metrics_port: int = Field(9110, ge=0, le=65535)
    #: Port of the worker's /metrics, gathered from its model processes (0 = none).
    worker_metrics_port: int = Field(9111, ge=0, le=65535)
    #: Every model process writes a heartbeat row this often; readiness wants one younger than three.
    heartbeat_seconds: float = Field(10.0, gt=0)
    #: Readiness fails when the data directory's file system has less free space than this.
    min_free_disk_mb: int = Field(1024, ge=0)
    #: Readiness reports "degraded" when an export has waited longer than this, or has given up.
    export_backlog_minutes: float = Field(60.0, gt=0)
    # Storage (triage_core.storage): instances and results.
    #: Empty = files under the data directory; s3://bucket/prefix = an S3-compatible object store.
    storage_url: str = ""
    #: The S3 endpoint (MinIO, Ceph RGW, ...); empty = AWS's.
    s3_endpoint_url: str = ""
    s3_region: str = ""
    #: S3 credentials; empty = boto3's own chain (AWS_* variables, instance profile).
    s3_access_key_id: str = ""
    s3_secret_access_key: str = ""
    # Authentication (README "Authentication"). API keys live in the database (`cxr-triage user`).
    #: OpenID Connect issuer URL (exactly the tokens' `iss`); empty = no OIDC.
    oidc_issuer: str = ""
    #: The `aud` our tokens must carry (the API's client id at the identity provider).
    oidc_audience: str = ""
    #: JWKS file to use instead of the issuer's discovery document (an offline or pinned key set).
    oidc_jwks_file: Path | None = None
    #: Signature algorithms accepted (asymmetric only; never "none" or HS*).
    oidc_algorithms: Annotated[list[str], NoDecode] = ["RS256"]
    #: Claim holding the user's roles or groups; dots walk into objects (Keycloak: realm_access.roles).
    oidc_role_claim: str = "roles"
    #: `value=role` comma list from claim values to our roles; empty = the values are our role names.
    oidc_role_map: Annotated[dict[str, str], NoDecode] = {}
    #: Claim naming the user in the audit trail (falls back to `sub`).
    oidc_user_claim: str = "preferred_username"
    #: Seconds of clock skew allowed on exp/nbf/iat.
    oidc_leeway_seconds: int = Field(30, ge=0, le=300)
    #: A copy of every audit event as RFC 5424 syslog (DICOM PS3.15 A.5 XML): udp://, tcp:// or tls://host:port.
    audit_syslog: str = ""
    #: CA bundle for a tls:// syslog collector (empty = the system's).
    audit_syslog_ca_file: Path | None = None
    #: The API key `cxr-triage demo` sends (a client setting; the API never reads it).
    api_key: str = ""
    # The worklist page (README "The worklist page").
    #: The page's client id at the identity provider (a public client: authorization code + PKCE, no
    #: secret); empty = the page offers API key login only.
    oidc_client_id: str = ""
    #: Scopes the page asks for (space-separated); add the API's scope where the provider needs one.
    oidc_scopes: str = "openid profile"
    #: Link to open a study in the hospital's viewer: an http(s) URL with {study_instance_uid} and/or
    #: {accession_number} placeholders; empty = no link.
    viewer_url_template: str = ""
    #: How often the page reloads the worklist (each load is a READ_WORKLIST audit event).
    worklist_refresh_seconds: float = Field(15.0, ge=2, le=3600)
    # The worklist policy (README "Worklist policy", triage_core.priority).
    #: `level=minutes` comma list: how long an unread study waits at a level before it climbs one;
    #: levels not named keep their default (awaiting_analysis=10, nothing_flagged=240, minor=120,
    #: routine=60, not_analysed=30).
    worklist_escalation_minutes: Annotated[dict[str, float], NoDecode] = {}

    # --- The DICOM edge (dicom_node): bounds against hostile or broken peers, TLS, Query/Retrieve,
    # receiving processes. README "Configuration" explains each default and how it was chosen.
    #: Longest wait for data on an accepted connection, before and inside associations: the TLS
    #: handshake and the A-ASSOCIATE-RQ must arrive within it, every read waits at most this long,
    #: and a PDU must complete within it plus its length at 64 KiB/s.
    dicom_read_timeout: float = Field(10.0, gt=0, le=600)
    #: An established association with no PDU for this long is aborted.
    dicom_idle_timeout: float = Field(60.0, gt=0, le=3600)
    #: Largest PDU we accept (and the Maximum Length we announce); a larger one aborts the association.
    max_pdu_size: int = Field(4 * 1024 * 1024, ge=65536, le=64 * 1024 * 1024)
    #: Largest data set of one C-STORE (streamed to disk while it arrives, never held in memory);
    #: one that grows past it aborts the association. At most 2 GiB - 1 (the size column).
    max_dataset_size: int = Field(1024 * 1024 * 1024, ge=1024 * 1024, le=2**31 - 1)
    #: Associations at once, in all and from one source address (more get A-ASSOCIATE-RJ, transient).
    max_associations: int = Field(32, ge=1, le=1000)
    max_associations_per_source: int = Field(8, ge=1, le=1000)
    #: Refuse associations whose Called AE Title is not CXR_TRIAGE_AE_TITLE.
    strict_called_ae_title: bool = True
    #: Source networks (CIDR or single addresses) allowed to connect; empty = any.
    allowed_networks: Annotated[list[str], NoDecode] = []
    #: DICOM TLS listener (PS3.15 B.9 / B.12 profiles, TLS 1.2+) on this port; unset = no TLS.
    dicom_tls_port: int | None = Field(None, ge=1, le=65535)
    #: Serve DICOM over TLS only (no plain listener on CXR_TRIAGE_DICOM_PORT).
    dicom_tls_only: bool = False
    #: Our certificate chain and key (PEM): the TLS listener's, and our client certificate for TLS exports.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    #: CA bundle (PEM) that verifies client certificates and TLS export destinations.
    tls_ca_file: Path | None = None
    #: Require a client certificate signed by CXR_TRIAGE_TLS_CA_FILE on the TLS listener.
    tls_verify_clients: bool = False
    #: C-MOVE destinations by AE title, beside the export destinations (same syntax).
    move_destinations: Annotated[list[Destination], NoDecode] = []
    #: Receiving processes of `cxr-triage node`; unset = one per usable CPU core, at most 4.
    dicom_receivers: int | None = Field(None, ge=1, le=32)

    @field_validator("allowed_calling_aets", mode="before")
    @classmethod
    def _aets(cls, value: object) -> object:
        items = _split_list(value)
        for item in items or []:
            if not _AE_TITLE.match(item):
                raise ValueError(f"invalid AE title {item!r}")
        return items

    @field_validator("export_destinations", "move_destinations", mode="before")
    @classmethod
    def _destinations(cls, value: object) -> object:
        items = _split_list(value)
        if isinstance(items, list):
            return [Destination.parse(item) if isinstance(item, str) else item for item in items]
        return items

    @field_validator("allowed_networks", mode="before")
    @classmethod
    def _networks(cls, value: object) -> object:
        items = _split_list(value)
        for item in items or []:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"allowed network {item!r} is not an address or CIDR network") from None
        return items

    @field_validator("model_path", "tls_cert_file", "tls_key_file", "tls_ca_file", "dicom_tls_port",
                     "dicom_receivers", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # An empty variable (docker-compose's "${CXR_TRIAGE_MODEL_PATH:-}") means the default.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        if not _AE_TITLE.match(value) or "\\" in value:
            raise ValueError(f"invalid AE title {value!r}: 1-16 printable ASCII characters")
        return value

    @field_validator("model_runtime")
    @classmethod
    def _runtime(cls, value: str) -> str:
        if value not in {"auto", "torch", "onnx", "onnx-int8"}:
            raise ValueError("model_runtime must be auto, torch, onnx or onnx-int8")
        return value

    @field_validator("oidc_algorithms", mode="before")
    @classmethod
    def _algorithms(cls, value: object) -> object:
        items = _split_list(value)
        for item in items or []:
            if item not in ASYMMETRIC_ALGORITHMS:
                raise ValueError(f"OIDC algorithm {item!r} is not allowed: one of {', '.join(sorted(ASYMMETRIC_ALGORITHMS))} "
                                 "(symmetric and 'none' algorithms are refused)")
        if isinstance(items, list) and not items:
            raise ValueError("at least one OIDC algorithm is needed")
        return items

    @field_validator("oidc_role_map", mode="before")
    @classmethod
    def _role_map(cls, value: object) -> object:
        if isinstance(value, str):
            mapping = {}
            for item in _split_list(value):
                claim_value, sep, role = item.rpartition("=")
                if not sep or not claim_value.strip():
                    raise ValueError(f"OIDC role map entry {item!r} is not claim-value=role")
                mapping[claim_value.strip()] = role.strip()
            value = mapping
        for role in (value or {}).values() if isinstance(value, dict) else ():
            if role not in ROLES:
                raise ValueError(f"OIDC role map names role {role!r}: one of {', '.join(ROLES)}")
        return value

    @field_validator("worklist_escalation_minutes", mode="before")
    @classmethod
    def _escalation(cls, value: object) -> object:
        if isinstance(value, str):
            minutes: dict[str, float] = {}
            for item in _split_list(value):
                level, sep, number = item.partition("=")
                try:
                    minutes[level.strip()] = float(number)
                except ValueError:
                    raise ValueError(f"worklist escalation entry {item!r} is not level=minutes") from None
                if not sep:
                    raise ValueError(f"worklist escalation entry {item!r} is not level=minutes")
            value = minutes
        from .priority import WorklistPolicy

        WorklistPolicy.from_minutes(value)  # names the unknown level or the bad number
        return value

    @field_validator("viewer_url_template")
    @classmethod
    def _viewer(cls, value: str) -> str:
        value = value.strip()
        if not value:
            return value
        import string
        from urllib.parse import urlsplit

        try:
            names = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
        except ValueError as exc:
            raise ValueError(f"viewer URL template: {exc}") from None
        unknown = sorted(names - VIEWER_PLACEHOLDERS)
        if unknown:
            raise ValueError(f"viewer URL template: unknown placeholder(s) {unknown}; "
                             f"allowed: {', '.join('{' + n + '}' for n in sorted(VIEWER_PLACEHOLDERS))}")
        if not names:
            raise ValueError("viewer URL template names no study: use {study_instance_uid} or {accession_number}")
        if urlsplit(value.replace("{", "").replace("}", "")).scheme not in ("http", "https"):
            raise ValueError("viewer URL template must be an http:// or https:// URL")
        return value

    @field_validator("audit_syslog")
    @classmethod
    def _syslog(cls, value: str) -> str:
        if value and not _SYSLOG.match(value):
            raise ValueError(f"audit syslog {value!r} is not udp://host:port, tcp://host:port or tls://host:port")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _log_level(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip().upper()
            if value not in LOG_LEVELS:
                raise ValueError(f"{value.lower()!r} is not a log level: one of {', '.join(LOG_LEVELS)}")
        return value

    @field_validator("storage_url")
    @classmethod
    def _storage_url(cls, value: str) -> str:
        if value and not re.match(r"^(file://.+|s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?)$", value):
            raise ValueError(f"{value!r} is neither s3://bucket[/prefix] nor file:///path")
        return value

    @field_validator("database_url")
    @classmethod
    def _database_driver(cls, value: str) -> str:
        if not value:
            return value
        from sqlalchemy import make_url
        from sqlalchemy.exc import ArgumentError, NoSuchModuleError

        if value.startswith(("postgres://", "postgres+")):
            raise ValueError("'postgres://' is not a SQLAlchemy URL: write postgresql+psycopg2://user:password@host/db")
        try:
            make_url(value).get_dialect()
        except NoSuchModuleError:  # (a subclass of ArgumentError)
            scheme = value.split("://", 1)[0]
            raise ValueError(f"unknown database driver {scheme!r}: use postgresql+psycopg2:// or sqlite://") from None
        except (ArgumentError, ValueError):
            raise ValueError("not a SQLAlchemy URL (e.g. postgresql+psycopg2://user:password@host:5432/db or "
                             "sqlite:////path/to/file.sqlite)") from None
        return value

    @field_validator("database_url", "broker_url")
    @classmethod
    def _no_default_secret(cls, value: str, info) -> str:
        if value and not value.startswith("sqla+") and not value.startswith("sqlite"):
            try:
                from sqlalchemy import make_url

                password = make_url(value).password if "://" in value else None
            except Exception:
                password = None
            if password is not None and (not password or password.lower() in DEFAULT_SECRETS):
                raise ValueError(f"{info.field_name} carries an empty or default password: set a real secret")
        return value

    @model_validator(mode="after")
    def _oidc(self) -> "Settings":
        if self.oidc_issuer:
            if not self.oidc_audience.strip():
                raise ValueError("CXR_TRIAGE_OIDC_AUDIENCE must be set with CXR_TRIAGE_OIDC_ISSUER: "
                                 "tokens are checked for our audience, never accepted for any")
            if not _secure_url(self.oidc_issuer):
                raise ValueError("CXR_TRIAGE_OIDC_ISSUER must be an https:// URL (http:// only on loopback)")
        elif self.oidc_audience or self.oidc_jwks_file or self.oidc_client_id:
            raise ValueError("CXR_TRIAGE_OIDC_AUDIENCE / _JWKS_FILE / _CLIENT_ID need CXR_TRIAGE_OIDC_ISSUER")
        return self

    @property
    def oidc_enabled(self) -> bool:
        return bool(self.oidc_issuer)

    @model_validator(mode="after")
    def _resolve(self) -> "Settings":
        self.data_dir = self.data_dir.expanduser().resolve()
        if self.dicom_tls_port is not None and not (self.tls_cert_file and self.tls_key_file):
            raise ValueError("dicom_tls_port needs tls_cert_file and tls_key_file")
        if self.dicom_tls_only and self.dicom_tls_port is None:
            raise ValueError("dicom_tls_only needs dicom_tls_port")
        if self.tls_verify_clients and not self.tls_ca_file:
            raise ValueError("tls_verify_clients needs tls_ca_file (the CA that signs the client certificates)")
        if self.dicom_tls_port is not None and self.dicom_tls_port == self.dicom_port and not self.dicom_tls_only:
            raise ValueError("dicom_tls_port must differ from dicom_port (or set dicom_tls_only)")
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'triage.sqlite'}"
        if not self.broker_url:
            self.broker_url = f"sqla+sqlite:///{self.data_dir / 'broker.sqlite'}"
        return self

    @cached_property
    def instances_dir(self) -> Path:
        return self.data_dir / "instances"

    @cached_property
    def results_dir(self) -> Path:
        return self.data_dir / "results"

    @cached_property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @cached_property
    def storage(self):
        """Instances and results (triage_core.storage): local files, or an S3-compatible store."""
        from .storage import make_storage

        return make_storage(self)

    @property
    def allowed_network_objects(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(item, strict=False) for item in self.allowed_networks]

    @property
    def known_move_destinations(self) -> dict[str, Destination]:
        """C-MOVE destinations by AE title: the move destinations, then the export destinations."""
        known: dict[str, Destination] = {}
        for destination in [*self.export_destinations, *self.move_destinations]:
            known.setdefault(destination.ae_title, destination)
        for destination in self.move_destinations:
            known[destination.ae_title] = destination
        return known

    @property
    def uses_embedded_broker(self) -> bool:
        return self.broker_url.startswith("sqla+")

    def ensure_dirs(self) -> None:
        for path in (self.data_dir, self.instances_dir, self.results_dir, self.spool_dir):
            path.mkdir(parents=True, exist_ok=True)


def get_settings() -> Settings:
    return Settings()


def env_name(field: str) -> str:
    return f"{ENV_PREFIX}{field.upper()}"


def env_file_path(environ: Mapping[str, str] | None = None) -> Path | None:
    """The file CXR_TRIAGE_ENV_FILE names, or None; a named file that is missing is an error."""
    environ = os.environ if environ is None else environ
    raw = environ.get(ENV_FILE_VARIABLE, "").strip()
    if not raw:
        return None
    path = Path(raw).expanduser()
    if not path.is_file():
        raise SettingsError([f"{ENV_FILE_VARIABLE}={raw}: no such file"])
    return path


class SettingsError(ValueError):
    """Bad configuration, one line per problem, each naming its variable."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def describe(exc: ValidationError) -> list[str]:
    """A pydantic error as lines naming the variable (CXR_TRIAGE_DICOM_PORT), never the field (dicom_port);
    values of secret settings are not repeated."""
    lines = []
    for error in exc.errors():
        loc = [str(part) for part in error.get("loc", ())]
        message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
        if not loc:
            lines.append(message)
            continue
        field = loc[0]
        shown = ""
        value = error.get("input")
        if field not in SECRET_FIELDS and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            shown = f"={str(value)[:80]}"
        lines.append(f"{env_name(field)}{shown}: {message}")
    return lines


def known_variables() -> set[str]:
    return {env_name(name) for name in Settings.model_fields} | set(OTHER_VARIABLES)


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[tuple[str, str | None]]:
    """CXR_TRIAGE_* variables that are no setting, each with the likeliest meant one (or None)."""
    environ = os.environ if environ is None else environ
    known = sorted(known_variables())
    found = []
    for name in sorted(environ):
        if name.upper().startswith(ENV_PREFIX) and name.upper() not in known:
            close = difflib.get_close_matches(name.upper(), known, n=1, cutoff=0.75)
            found.append((name, close[0] if close else None))
    return found


def load_settings() -> Settings:
    """Settings from the environment (and the env file); SettingsError names each bad variable."""
    try:
        return Settings()
    except ValidationError as exc:
        raise SettingsError(describe(exc)) from None
