"""The work of one job, as plain functions tested without Celery.

load instances -> select eligible frontal chest images -> cxr_model (probabilities + CAMs,
one pass) -> SR + heatmaps (+ parametric maps) (highdicom) -> store -> priority -> DB -> export rows.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from collections.abc import Mapping
from typing import Callable, Sequence

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import delete, select

from cxr_model import ModelCard
from dicom_io.eligibility import check_eligibility
from dicom_io.pixels import PixelRefused, display_array
from dicom_io.results import build_results
from dicom_io.sc import HeatmapOptions
from dicom_io.sr import sr_uid
from triage_core import audit, work
from .leases import LeaseKeeper
from triage_core.db import Database
from triage_core.models import Export, Finding, Instance, Job, ResultObject, Study
from triage_core import priority as worklist_priority
from triage_core.settings import Settings
from triage_core.states import AuditAction, ExportStatus, JobStatus, ResultKind, StudyStatus
from triage_core.storage import result_relpath
from triage_core.values import AlgorithmInfo, FindingResult, ImageResult

log = logging.getLogger(__name__)
ACTOR = audit.SYSTEM_ACTORS["worker"]


def algorithm_info(card: ModelCard, runtime: str = "") -> AlgorithmInfo:
    """What the results say made them; ``precision`` tells an int8 runtime's (close, not equal) outputs apart."""
    return AlgorithmInfo(
        name=card.name,
        version=card.version,
        weights_sha256=card.weights_sha256,
        demo=card.demo,
        parameters={
            "architecture": card.architecture,
            "input_size": str(card.input_size),
            "normalization": card.normalization,
            "precision": "int8" if runtime.endswith("int8") else "fp32",
        },
    )


@dataclass(frozen=True)
class Selected:
    instance_id: int
    dataset: Dataset
    display: np.ndarray
    sha256: str


@dataclass(frozen=True)
class JobOutcome:
    status: str
    reason: str = ""
    export_ids: tuple[int, ...] = ()
    job_id: int = 0


class _NativeCams(Mapping):
    """A prediction's CAMs at the model's own resolution (what the Parametric Maps store)."""

    def __init__(self, cams) -> None:
        self._cams = cams

    def __getitem__(self, label: str) -> np.ndarray:
        return self._cams.native(label)

    def __contains__(self, label: object) -> bool:
        return label in self._cams

    def __iter__(self):
        return iter(self._cams)

    def __len__(self) -> int:
        return len(self._cams)


class _Stages:
    """Where a job's time goes: milliseconds per stage, in order (bench/pipeline_bench.py reads the log
    line). `queue` is the wait from the message's publication to the claim; it is not in `total`."""

    def __init__(self, queue: float = 0.0) -> None:
        self._last = time.perf_counter()
        self._ms: dict[str, float] = {"queue": queue}

    def mark(self, stage: str) -> None:
        """Count the time since the last mark (or resume) as `stage`."""
        now = time.perf_counter()
        self.add(stage, 1000 * (now - self._last))
        self._last = now

    def add(self, stage: str, ms: float) -> None:
        self._ms[stage] = self._ms.get(stage, 0.0) + ms

    def resume(self) -> None:
        """Time since the last mark went to other jobs of the batch: count it nowhere."""
        self._last = time.perf_counter()

    def __str__(self) -> str:
        parts = [f"{name}={ms:.1f}" for name, ms in self._ms.items()]
        total = sum(ms for name, ms in self._ms.items() if name != "queue")
        return " ".join(parts + [f"total={total:.1f}"])


@dataclass(frozen=True)
class _Claim:
    """A job this worker holds, and what it needs to know of its study."""

    job_id: int
    study_id: int
    study_instance_uid: str
    queued_ms: float


def _warm_up_source() -> Dataset:
    """A minimal frontal chest CR header (UIDs under 2.25, no patient) for `Pipeline.warm_up`."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.SOPInstanceUID = "2.25.1"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "2.25.2", "2.25.3"
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    ds.Rows = ds.Columns = 256
    ds.PatientName, ds.PatientID = "", ""
    return ds


class LeaseLost(Exception):
    """The job's lease was taken back (this worker stalled past it); another worker has the job."""


class Pipeline:
    """Runs one job against a loaded model. `model` is a cxr_model model (card + predict)."""

    def __init__(self, settings: Settings, database: Database, model_loader: Callable[[], object]) -> None:
        self.settings = settings
        self.database = database
        self.policy = work.WorkPolicy.from_settings(settings)
        self.worklist_policy = worklist_priority.WorklistPolicy.from_settings(settings)
        self._model_loader = model_loader
        self._model = None

    @property
    def model(self):
        if self._model is None:
            self._model = self._model_loader()
        return self._model

    def warm_up(self) -> None:
        """Load the model and make one study's results from a synthetic image, so that the first real
        study does not pay for the one-time set-ups (the SR template of this model, the JPEG encoder,
        highdicom's IOD tables: about half a second here). Nothing is written or recorded."""
        model = self.model
        card: ModelCard = model.card
        source = _warm_up_source()
        display = np.linspace(0.0, 1.0, 256 * 256, dtype=np.float32).reshape(256, 256)
        (prediction,) = model.predict([display], cams=True)
        result = ImageResult(str(source.SOPInstanceUID), tuple(
            FindingResult(name, float(prediction.probabilities[name]), float(card.thresholds[name]),
                          float(prediction.probabilities[name]) >= float(card.thresholds[name]))
            for name in card.labels))
        objects = build_results([source], [display], [result], [prediction.cams], algorithm_info(card, model.runtime),
                                parametric_maps=self.settings.parametric_map,
                                heatmaps=self._heatmap_options(card),
                                native_cams_per_image=[_NativeCams(prediction.cams)])
        for ds in objects:
            ds.save_as(io.BytesIO(), enforce_file_format=True)

    # -- the job -------------------------------------------------------------------------

    def run_job(self, job_id: int) -> JobOutcome:
        """Run job `job_id` (and, with batching, other queued jobs with it); its outcome."""
        return self.run_jobs(job_id)[0]

    def run_jobs(self, job_id: int) -> list[JobOutcome]:
        """Claim the job (a duplicate or late message finds it held or finished and does nothing),
        hold its lease while working, and finish it only while still holding it. With
        CXR_TRIAGE_BATCH_STUDIES > 1 (a GPU's default), other queued jobs are claimed too, within
        CXR_TRIAGE_BATCH_WAIT_MS, and their images go through the model in one batch; their own
        messages then find them finished. The outcome of `job_id` comes first."""
        holder = work.holder_id()
        first = self._claim(job_id, holder)
        if isinstance(first, JobOutcome):
            return [replace(first, job_id=job_id)]
        claims = [first] + self._claim_more(holder, first.job_id)
        job_ids = [c.job_id for c in claims]

        def renew(session) -> bool:
            return all([work.renew_job(session, j, holder, self.policy) for j in job_ids])

        with LeaseKeeper(self.database, renew, self.policy, f"job {' '.join(map(str, job_ids))}"):
            return self._process(claims, holder)

    def _claim(self, job_id: int, holder: str) -> "_Claim | JobOutcome":
        with self.database.session() as session:
            job = work.claim_job(session, job_id, holder, self.policy)
            if job is None:
                existing = session.get(Job, job_id)
                if existing is None:
                    log.info("job %s is gone: nothing to do", job_id)
                    return JobOutcome("GONE")
                log.info("job %s is %s%s: nothing to do", job_id, existing.status,
                         f" (held by {existing.locked_by})" if existing.status == JobStatus.RUNNING else "")
                return JobOutcome(existing.status if existing.status in (JobStatus.DONE, JobStatus.FAILED) else "HELD")
            study = job.study
            if job.attempts > self.policy.max_attempts:
                # Its earlier workers died with it (their leases were taken back): a poison study.
                reason = f"worker lost {job.attempts - 1} times"
                self._finish(session, job, study, StudyStatus.FAILED, reason, job_error=reason)
                log.error("job %s (study id %s) FAILED: %s", job_id, study.id, reason)
                return JobOutcome(str(StudyStatus.FAILED), reason)
            if study.status not in (StudyStatus.READY, StudyStatus.PROCESSING):
                # New instances arrived after this job was made; a newer job will follow.
                work.release_job(job, JobStatus.DONE, f"superseded: study is {study.status}")
                return JobOutcome("SUPERSEDED", job.error)
            audit.set_status(session, study, StudyStatus.PROCESSING, actor=ACTOR,
                             reason=f"job {job_id} (attempt {job.attempts} of {self.policy.max_attempts})")
            queued = (job.started_at - job.enqueued_at).total_seconds() * 1000 if job.enqueued_at else 0.0
            log.info("job %s: processing study id %s (attempt %d)", job_id, study.id, job.attempts)
            return _Claim(job_id, study.id, study.study_instance_uid, queued)

    def _claim_more(self, holder: str, first: int) -> list["_Claim"]:
        """Up to CXR_TRIAGE_BATCH_STUDIES - 1 more queued jobs, waiting at most CXR_TRIAGE_BATCH_WAIT_MS."""
        limit = (self.settings.batch_studies or 1) - 1
        if limit <= 0:
            return []
        deadline = time.monotonic() + self.settings.batch_wait_ms / 1000
        more: list[_Claim] = []
        while len(more) < limit:
            with self.database.session() as session:
                candidates = work.queued_jobs(session, limit - len(more), exclude=[first] + [c.job_id for c in more])
            for candidate in candidates:
                claim = self._claim(candidate, holder)
                if isinstance(claim, _Claim):
                    more.append(claim)
            if len(more) >= limit or time.monotonic() >= deadline:
                break
            time.sleep(min(0.005, max(0.0, deadline - time.monotonic())))
        if more:
            log.info("batch: job %s with job(s) %s", first, [c.job_id for c in more])
        return more

    @staticmethod
    def _owned(session, job_id: int, holder: str) -> Job:
        job = work.owns_job(session, job_id, holder)
        if job is None:
            raise LeaseLost(job_id)
        return job

    @staticmethod
    def _finish(session, job: Job, study: Study, status: StudyStatus, reason: str, job_error: str = "") -> bool:
        """End the job; the study takes `status` only if nothing new arrived meanwhile."""
        work.release_job(job, JobStatus.FAILED if status is StudyStatus.FAILED else JobStatus.DONE, job_error)
        if study.status not in (StudyStatus.PROCESSING, StudyStatus.READY):
            log.info("study id %s changed to %s while job %s ran; a new job will follow",
                     study.id, study.status, job.id)
            return False
        audit.set_status(session, study, status, actor=ACTOR, reason=reason)
        return True

    def _process(self, claims: list["_Claim"], holder: str) -> list[JobOutcome]:
        """Select each study's images, score all of them in one model call, then build, write and
        record each study's results. A failure ends only the job it belongs to."""
        outcomes: dict[int, JobOutcome] = {}
        prepared: list[tuple[_Claim, _Stages, list[Selected], list[str], dict[int, str]]] = []
        for claim in claims:
            stages = _Stages(queue=claim.queued_ms)
            try:
                selected, refusals, reasons = self._select(claim.study_id)
                stages.mark("select")
                if selected:
                    prepared.append((claim, stages, selected, refusals, reasons))
                    continue
                reason = "no eligible frontal chest radiograph: " + "; ".join(refusals or ["no instances"])
                with self.database.session() as session:
                    self._record_eligibility(session, claim.study_id, reasons)
                    self._finish(session, self._owned(session, claim.job_id, holder),
                                 session.get(Study, claim.study_id), StudyStatus.SKIPPED, reason)
                log.info("job %s: study id %s SKIPPED (%d instance(s) ineligible)", claim.job_id, claim.study_id,
                         len(refusals))
                outcomes[claim.job_id] = JobOutcome(str(StudyStatus.SKIPPED), reason)
            except Exception as exc:
                outcomes[claim.job_id] = self._failed(claim, holder, exc)
        if prepared:
            try:
                model = self.model
            except Exception as exc:  # the model cannot load: each study FAILED with why, as before batching
                for claim, _, _, _, reasons in prepared:
                    outcomes[claim.job_id] = self._failed(claim, holder, exc, reasons)
                prepared = []
        if prepared:
            images = [s for _, _, selected, _, _ in prepared for s in selected]
            started = time.perf_counter()
            try:
                predictions = model.predict([s.display for s in images], cams=True,
                                            metadata=[s.dataset for s in images])
            except Exception as exc:
                predictions = None  # one study's images may be at fault: each study on its own below
                if len(prepared) == 1:
                    claim, reasons = prepared[0][0], prepared[0][4]
                    outcomes[claim.job_id] = self._failed(claim, holder, exc, reasons)
                    prepared = []
            model_ms = 1000 * (time.perf_counter() - started)
            offset = 0
            for claim, stages, selected, refusals, reasons in prepared:
                try:
                    stages.resume()
                    if predictions is not None:
                        own = predictions[offset:offset + len(selected)]
                        stages.add("model", model_ms * len(selected) / len(images))
                    else:
                        own = model.predict([s.display for s in selected], cams=True,
                                            metadata=[s.dataset for s in selected])
                        stages.mark("model")
                    offset += len(selected)
                    outcomes[claim.job_id] = self._results(claim, holder, stages, selected, refusals, reasons, own)
                except LeaseLost:
                    log.warning("job %s (study id %s): its lease was taken back while it ran; its results are "
                                "left to the worker that holds it now", claim.job_id, claim.study_id)
                    outcomes[claim.job_id] = JobOutcome("LOST")
                except Exception as exc:
                    outcomes[claim.job_id] = self._failed(claim, holder, exc, reasons)
        return [replace(outcomes[claim.job_id], job_id=claim.job_id) for claim in claims]

    def _failed(self, claim: "_Claim", holder: str, exc: BaseException,
                reasons: dict[int, str] | None = None) -> JobOutcome:
        """FAILED with why; `reasons` (each instance's eligibility, when it was decided) is recorded too,
        so that the worklist still shows which images were eligible."""
        log.error("job %s (study id %s) failed", claim.job_id, claim.study_id, exc_info=exc)
        reason = f"{type(exc).__name__}: {exc}"[:2000]
        try:
            with self.database.session() as session:
                job = self._owned(session, claim.job_id, holder)
                if reasons is not None:
                    self._record_eligibility(session, claim.study_id, reasons)
                self._finish(session, job, session.get(Study, claim.study_id), StudyStatus.FAILED, reason,
                             job_error=reason)
        except LeaseLost:
            return JobOutcome("LOST")
        return JobOutcome(str(StudyStatus.FAILED), reason)

    def _results(self, claim: "_Claim", holder: str, stages: "_Stages", selected: list[Selected],
                 refusals: list[str], reasons: dict[int, str], predictions) -> JobOutcome:
        job_id, study_id, study_uid = claim.job_id, claim.study_id, claim.study_instance_uid
        card: ModelCard = self.model.card
        algorithm = algorithm_info(card, self.model.runtime)
        image_results = [
            ImageResult(
                sop_instance_uid=str(s.dataset.SOPInstanceUID),
                source_sha256=s.sha256,
                findings=tuple(
                    FindingResult(
                        finding=name,
                        probability=float(prediction.probabilities[name]),
                        threshold=float(card.thresholds[name]),
                        present=float(prediction.probabilities[name]) >= float(card.thresholds[name]),
                    )
                    for name in card.labels
                ),
            )
            for s, prediction in zip(selected, predictions, strict=True)
        ]
        objects = build_results(
            [s.dataset for s in selected],
            [s.display for s in selected],
            image_results,
            [p.cams for p in predictions],
            algorithm,
            parametric_maps=self.settings.parametric_map,
            heatmaps=self._heatmap_options(card),
            native_cams_per_image=[_NativeCams(p.cams) for p in predictions],
            predecessors=self._earlier_reports(study_id, study_uid, sr_uid(image_results, algorithm)),
        )
        stages.mark("build")
        written = self._write_results(study_uid, objects, algorithm)
        stages.mark("write")
        positives = sorted({f.finding for r in image_results for f in r.positive})
        reason = ("positive: " + ", ".join(positives)) if positives else "no finding above its operating threshold"
        if refusals:
            reason += f" ({len(refusals)} other instance(s) not analysed: " + "; ".join(refusals) + ")"

        with self.database.session() as session:
            job = self._owned(session, job_id, holder)  # and locked until this transaction ends
            study = session.get(Study, study_id)
            self._record_eligibility(session, study_id, reasons)
            session.execute(delete(Finding).where(Finding.study_id == study_id))
            for result in image_results:
                for finding in result.findings:
                    session.add(Finding(
                        study_id=study_id, sop_instance_uid=result.sop_instance_uid, finding=finding.finding,
                        probability=finding.probability, threshold=finding.threshold, present=finding.present,
                        urgency=worklist_priority.urgency_of(finding.finding, card.urgency),
                    ))
            now = datetime.now(timezone.utc)
            existing = {row.sop_instance_uid: row for row in session.scalars(
                select(ResultObject).where(ResultObject.sop_instance_uid.in_(
                    [str(ds.SOPInstanceUID) for _, ds, *_ in written])))}
            for kind, ds, relpath, source_uid, finding in written:
                row = existing.get(str(ds.SOPInstanceUID))
                if row is None:
                    row = ResultObject(sop_instance_uid=str(ds.SOPInstanceUID), study_id=study_id)
                    session.add(row)
                row.superseded_at = None
                row.kind = kind
                row.series_instance_uid = str(ds.SeriesInstanceUID)
                row.sop_class_uid = str(ds.SOPClassUID)
                row.source_sop_instance_uid = source_uid
                row.finding = finding
                row.path = relpath
                row.model_name = algorithm.name
                row.model_version = algorithm.version
                row.created_at = now
                audit.record(session, actor=ACTOR, action=AuditAction.RESULT_STORED, study=study, kind=kind,
                             sop_instance_uid=str(ds.SOPInstanceUID), model_version=algorithm.version)
            retired = self._retire_superseded(session, study, {str(ds.SOPInstanceUID) for _, ds, *_ in written}, now)
            priority = worklist_priority.record_analysis(
                study, (f for r in image_results for f in r.findings), card.urgency, self.worklist_policy, now)
            study.model_name = algorithm.name
            study.model_version = algorithm.version
            study.model_demo = algorithm.demo
            export_ids = [
                work.schedule_export(session, study, str(destination)).id
                for destination in self.settings.export_destinations
            ]
            done = self._finish(session, job, study, StudyStatus.DONE, reason)
        if not self.settings.keep_superseded_results:
            for relpath in retired:
                self.settings.storage.results.delete(relpath)
        stages.mark("db")
        log.info("job %s stages ms: %s", job_id, stages)
        log.info("job %s: study id %s %s, priority %s, %d result object(s), model %s %s", job_id, study_id,
                 "DONE" if done else "superseded", priority.key, len(written), algorithm.name, algorithm.version)
        return JobOutcome(str(StudyStatus.DONE), reason, tuple(export_ids))

    @staticmethod
    def _record_eligibility(session, study_id: int, reasons: dict[int, str]) -> None:
        """Each instance's eligibility (`reasons`: why an instance is not analysed), in the job's final
        transaction rather than one commit per instance."""
        for instance in session.scalars(select(Instance).where(Instance.study_id == study_id)):
            reason = reasons.get(instance.id, "")
            instance.eligible = not reason
            instance.eligibility_reason = reason

    def _heatmap_options(self, card) -> HeatmapOptions:
        """Heatmap settings; the findings with images of their own are the card's most urgent classes."""
        return HeatmapOptions(max_side=self.settings.heatmap_max_side, per_finding=self.settings.heatmap_findings,
                              compress=self.settings.heatmap_compression == "jpeg",
                              rank=worklist_priority.heatmap_rank(card.labels, card.urgency))

    def _earlier_reports(self, study_id: int, study_uid: str, new_sr_uid: str) -> list[Dataset]:
        """The study's earlier SRs (by UID, class and series) that the new one replaces."""
        with self.database.session() as session:
            rows = session.scalars(
                select(ResultObject)
                .where(ResultObject.study_id == study_id, ResultObject.kind == str(ResultKind.SR),
                       ResultObject.sop_instance_uid != new_sr_uid)
                .order_by(ResultObject.id)
            ).all()
            earlier = []
            for row in rows:
                ds = Dataset()
                ds.StudyInstanceUID = study_uid
                ds.SeriesInstanceUID = row.series_instance_uid
                ds.SOPInstanceUID = row.sop_instance_uid
                ds.SOPClassUID = row.sop_class_uid
                earlier.append(ds)
            return earlier

    def _retire_superseded(self, session, study: Study, current: set[str], now: datetime) -> list[str]:
        """Mark the study's result objects that this analysis did not make as superseded.

        They are never exported again nor listed by the API. Returns the files
        to delete once the transaction has committed (none are deleted when
        CXR_TRIAGE_KEEP_SUPERSEDED_RESULTS is set).
        """
        stale = session.scalars(
            select(ResultObject).where(ResultObject.study_id == study.id, ResultObject.superseded_at.is_(None),
                                       ResultObject.sop_instance_uid.not_in(current))
        ).all()
        for row in stale:
            row.superseded_at = now
            audit.record(session, actor=ACTOR, action=AuditAction.RESULT_SUPERSEDED, study=study, kind=row.kind,
                         sop_instance_uid=row.sop_instance_uid,
                         file_kept=bool(self.settings.keep_superseded_results))
        if stale:
            log.info("study id %s: %d earlier result object(s) superseded", study.id, len(stale))
        return [row.path for row in stale]

    def _select(self, study_id: int) -> tuple[list[Selected], list[str], dict[int, str]]:
        """Read, check and decode the study's instances: the eligible ones, and why the others are not
        (recorded on the instances in the job's final transaction)."""
        with self.database.session() as session:
            records = [(i.id, i.sop_instance_uid, i.path, i.sha256) for i in session.scalars(
                select(Instance).where(Instance.study_id == study_id).order_by(Instance.id))]
        selected: list[Selected] = []
        refusals: list[str] = []
        reasons: dict[int, str] = {}
        for instance_id, sop_uid, relpath, sha256 in records:
            reason = ""
            try:
                with self.settings.storage.instances.open(relpath) as handle:
                    ds = dcmread(handle)
                eligibility = check_eligibility(ds)
                if eligibility.eligible:
                    display = display_array(ds)
                else:
                    reason = eligibility.reason
            except PixelRefused as exc:
                reason = str(exc)
            except Exception as exc:
                reason = f"unreadable DICOM: {type(exc).__name__}: {exc}"
            if reason:
                refusals.append(f"{sop_uid}: {reason}")
                reasons[instance_id] = reason
                log.info("SOP %s not analysed: %s", sop_uid, reason)
            else:
                selected.append(Selected(instance_id, ds, display, sha256))
        return selected, refusals, reasons

    def _write_results(self, study_uid: str, objects, algorithm: AlgorithmInfo):
        written = []
        sr = objects.sr
        pairs = [(str(ResultKind.SR), sr, "", "")]
        for ds, finding in zip(objects.heatmaps, objects.heatmap_findings, strict=True):
            source = ds.get("SourceImageSequence") or ds.get("ReferencedImageSequence") or []
            source_uid = str(source[0].ReferencedSOPInstanceUID) if source else ""
            pairs.append((str(ResultKind.HEATMAP), ds, source_uid, finding))
        for ds, finding in zip(objects.parametric_maps, objects.parametric_map_findings, strict=True):
            # highdicom states the source in the frame's Derivation Image Sequence.
            frame = ds.PerFrameFunctionalGroupsSequence[0]
            source = frame.DerivationImageSequence[0].SourceImageSequence
            pairs.append((str(ResultKind.PARAMETRIC_MAP), ds, str(source[0].ReferencedSOPInstanceUID), finding))
        files = []
        for kind, ds, source_uid, finding in pairs:
            relpath = result_relpath(study_uid, str(ds.SOPInstanceUID))
            files.append((relpath, lambda handle, ds=ds: ds.save_as(handle, enforce_file_format=True)))
            written.append((kind, ds, relpath, source_uid, finding))
        self.settings.storage.results.write_many(files)  # durable before the transaction that records them commits
        return written

