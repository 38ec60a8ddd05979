"""Prometheus metrics: what each process counts, and what the database says at scrape time.

No label carries patient data: outcomes, DIMSE status codes, runtimes and study states only.

* The node counts instances received and refused and times each C-STORE (its own ``/metrics``).
* The model worker's processes count jobs, time the model and the C-STORE-to-SR path, and count
  export attempts, through prometheus_client's multiprocess mode: each process writes its values
  to ``PROMETHEUS_MULTIPROC_DIR`` (set by the worker before this module is imported, cleaned at
  its start) and the worker's main process serves them summed.
* The API's ``/metrics`` answers from the database (:class:`DatabaseCollector`: studies by state,
  queue depth, exports, live workers and nodes) and the data directory's file system
  (:class:`DiskCollector`), so that several API replicas report the same deployment-wide truth.
"""

from __future__ import annotations

import shutil
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from pathlib import Path

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from .db import Database
from .models import Export, Heartbeat, Instance, Job, Study
from .states import ExportStatus, JobStatus, StudyStatus

@dataclass(frozen=True)
class NodeMetrics:
    instances_received: Counter
    instances_refused: Counter
    associations_rejected: Counter
    cstore_seconds: Histogram


@dataclass(frozen=True)
class WorkerMetrics:
    jobs_finished: Counter
    model_seconds: Histogram
    model_images: Counter
    cstore_to_sr_seconds: Histogram
    export_attempts: Counter
    model_loaded: Gauge


#: lru_cache alone lets two threads make the metrics at once, and the second registration raises
#: DuplicateTimeseries: two associations' first C-STOREs in a fresh receiving process did, and one
#: was answered 0xC211 (an exception in pynetdicom's handler). Made under this lock instead.
_MAKING = threading.Lock()


def node() -> NodeMetrics:
    """The node's metrics, made on first use by any thread (so that a worker exposes none of them)."""
    with _MAKING:
        return _node()


def worker() -> WorkerMetrics:
    """The model worker's metrics, made on first use by any thread."""
    with _MAKING:
        return _worker()


@lru_cache(maxsize=1)
def _node() -> NodeMetrics:
    """The node's metrics, made on first use (so that a worker exposes none of them)."""
    return NodeMetrics(
        Counter("cxr_triage_instances_received", "C-STORE requests answered with success",
                ["outcome"]),  # stored | duplicate
        Counter("cxr_triage_instances_refused", "C-STORE requests answered with a failure status",
                ["status"]),  # the DIMSE status, e.g. 0xA900
        Counter("cxr_triage_associations_rejected", "DICOM associations refused"),
        Histogram("cxr_triage_cstore_seconds", "One C-STORE: validate, store durably, record",
                  buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)),
    )


@lru_cache(maxsize=1)
def _worker() -> WorkerMetrics:
    """The model worker's metrics (multiprocess mode when PROMETHEUS_MULTIPROC_DIR is set), made on first use."""
    return WorkerMetrics(
        Counter("cxr_triage_jobs_finished", "Jobs a model process ended, by outcome", ["outcome"]),
        Histogram("cxr_triage_model_seconds", "One model call for a study (probabilities and CAMs)",
                  ["runtime"], buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)),
        Counter("cxr_triage_model_images", "Images scored by the model", ["runtime"]),
        Histogram("cxr_triage_cstore_to_sr_seconds",
                  "From a study's last received instance to its SR stored (the quiet period included)",
                  buckets=(1, 2, 5, 10, 15, 20, 30, 60, 120, 300, 600, 1800, 3600)),
        Counter("cxr_triage_export_attempts", "Export attempts (C-STORE of a study's results to a destination), "
                "by outcome", ["outcome"]),  # success | failure
        Gauge("cxr_triage_model_loaded", "1 per model process with its model loaded", multiprocess_mode="liveall"),
    )


class DiskCollector(Collector):
    """Free and total bytes of the file system holding ``path`` (the data directory)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def collect(self):
        free = GaugeMetricFamily("cxr_triage_disk_free_bytes", "Free bytes on the data directory's file system")
        total = GaugeMetricFamily("cxr_triage_disk_total_bytes", "Size of the data directory's file system")
        try:
            usage = shutil.disk_usage(self.path)
        except OSError:
            return
        free.add_metric([], usage.free)
        total.add_metric([], usage.total)
        yield free
        yield total


class DatabaseCollector(Collector):
    """Deployment-wide gauges read from the database at each scrape (a few aggregate queries)."""

    def __init__(self, database: Database, heartbeat_seconds: float) -> None:
        self.database = database
        self.max_age = timedelta(seconds=3 * heartbeat_seconds)

    def collect(self):
        now = datetime.now(timezone.utc)
        with self.database.session() as session:
            studies = dict(session.execute(select(Study.status, func.count(Study.id)).group_by(Study.status)).all())
            jobs = dict(session.execute(select(Job.status, func.count(Job.id)).group_by(Job.status)).all())
            exports = dict(session.execute(select(Export.status, func.count(Export.id)).group_by(Export.status)).all())
            attempts = session.scalar(select(func.coalesce(func.sum(Export.attempts), 0)))
            oldest = session.scalar(select(func.min(Export.pending_since))
                                    .where(Export.status == str(ExportStatus.EXPORT_PENDING)))
            stored = session.scalar(select(func.coalesce(func.sum(Instance.size_bytes), 0)))
            beats = session.execute(
                select(Heartbeat.service, Heartbeat.model_loaded, func.count())
                .where(Heartbeat.seen_at >= now - self.max_age)
                .group_by(Heartbeat.service, Heartbeat.model_loaded)).all()
        family = GaugeMetricFamily("cxr_triage_studies", "Studies by state", labels=["status"])
        for state in StudyStatus:
            family.add_metric([str(state)], studies.get(str(state), 0))
        yield family
        family = GaugeMetricFamily("cxr_triage_jobs", "Jobs by state", labels=["status"])
        for state in JobStatus:
            family.add_metric([str(state)], jobs.get(str(state), 0))
        yield family
        yield GaugeMetricFamily("cxr_triage_queue_depth", "Jobs waiting for a model process (QUEUED)",
                                value=jobs.get(str(JobStatus.QUEUED), 0))
        family = GaugeMetricFamily("cxr_triage_exports", "Exports by state", labels=["status"])
        for state in ExportStatus:
            family.add_metric([str(state)], exports.get(str(state), 0))
        yield family
        yield GaugeMetricFamily("cxr_triage_export_attempts_recorded", "Export attempts recorded on current exports",
                                value=attempts or 0)
        if oldest is not None and oldest.tzinfo is None:
            oldest = oldest.replace(tzinfo=timezone.utc)
        yield GaugeMetricFamily("cxr_triage_export_oldest_pending_seconds", "Age of the oldest pending export",
                                value=(now - oldest).total_seconds() if oldest else 0)
        yield GaugeMetricFamily("cxr_triage_instances_stored_bytes", "Bytes of received instances on record",
                                value=stored or 0)
        family = GaugeMetricFamily("cxr_triage_processes_alive", "Processes with a fresh heartbeat",
                                   labels=["service", "model_loaded"])
        for service, loaded, count in beats:
            family.add_metric([service, "true" if loaded else "false"], count)
        yield family
