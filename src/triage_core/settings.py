"""The one place configuration is read (environment variables, `.env`).

Names are fixed by DESIGN.md section 3; others script against them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

#: 1-16 printable ASCII characters, no backslash (the DICOM value separator), not all spaces.
_AE_TITLE = re.compile(r"^(?! *$)[\x20-\x5b\x5d-\x7e]{1,16}$")
_DESTINATION = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[^:]+):(?P<port>\d{1,5})$")


@dataclass(frozen=True)
class Destination:
    """A DICOM peer that receives our results by C-STORE."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> "Destination":
        match = _DESTINATION.match(text.strip())
        if not match:
            raise ValueError(f"export destination {text!r} is not AET@host:port")
        ae_title, host, port = match["ae"].strip(), match["host"], int(match["port"])
        if not _AE_TITLE.match(ae_title) or "\\" in ae_title:
            raise ValueError(f"export destination {text!r}: invalid AE title")
        if not 0 < port < 65536:
            raise ValueError(f"export destination {text!r}: port out of range")
        return cls(ae_title, host, port)

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def _split_list(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    """Every `CXR_TRIAGE_*` setting. Bad values stop start-up with a message."""

    model_config = SettingsConfigDict(
        env_prefix="CXR_TRIAGE_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    data_dir: Path = Path("./var")
    database_url: str = ""
    broker_url: str = ""
    ae_title: str = "CXR_TRIAGE"
    dicom_port: int = Field(11112, ge=1, le=65535)
    dicom_host: str = "0.0.0.0"
    allowed_calling_aets: Annotated[list[str], NoDecode] = []
    export_destinations: Annotated[list[Destination], NoDecode] = []
    series_quiet_seconds: float = Field(5.0, ge=0)
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
    max_pdu_size: int = Field(0, ge=0)
    log_level: str = "INFO"

    @field_validator("allowed_calling_aets", mode="before")
    @classmethod
    def _aets(cls, value: object) -> object:
        items = _split_list(value)
        for item in items or []:
            if not _AE_TITLE.match(item):
                raise ValueError(f"invalid AE title {item!r}")
        return items

    @field_validator("export_destinations", mode="before")
    @classmethod
    def _destinations(cls, value: object) -> object:
        items = _split_list(value)
        if isinstance(items, list):
            return [Destination.parse(item) if isinstance(item, str) else item for item in items]
        return items

    @field_validator("model_path", mode="before")
    @classmethod
    def _model_path(cls, value: object) -> object:
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

    @model_validator(mode="after")
    def _resolve(self) -> "Settings":
        self.data_dir = self.data_dir.expanduser().resolve()
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

    @property
    def uses_embedded_broker(self) -> bool:
        return self.broker_url.startswith("sqla+")

    def ensure_dirs(self) -> None:
        for path in (self.data_dir, self.instances_dir, self.results_dir, self.spool_dir):
            path.mkdir(parents=True, exist_ok=True)


def get_settings() -> Settings:
    return Settings()
