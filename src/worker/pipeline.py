"""The work of one job, as plain functions tested without Celery.

load instances -> select eligible frontal chest images -> cxr_model (probabilities + CAMs,
one pass) -> SR + heatmaps (+ parametric maps) (highdicom) -> store -> priority -> DB -> export rows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import delete, select

from cxr_model import ModelCard
from dicom_io.eligibility import check_eligibility
from dicom_io.pixels import PixelRefused, display_array
from dicom_io.results import build_results
from dicom_io.sr import sr_uid
from triage_core import audit, work
from .leases import LeaseKeeper
from triage_core.db import Database
from triage_core.models import Export, Finding, Instance, Job, ResultObject, Study
from triage_core.priority import compute_priority, keep_priority
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


class LeaseLost(Exception):
    """The job's lease was taken back (this worker stalled past it); another worker has the job."""


class Pipeline:
    """Runs one job against a loaded model. `model` is a cxr_model model (card + predict)."""

    def __init__(self, settings: Settings, database: Database, model_loader: Callable[[], object]) -> None:
        self.settings = settings
        self.database = database
        self.policy = work.WorkPolicy.from_settings(settings)
        self._model_loader = model_loader
        self._model = None

    @property
    def model(self):
        if self._model is None:
            self._model = self._model_loader()
        return self._model

    # -- the job -------------------------------------------------------------------------

    def run_job(self, job_id: int) -> JobOutcome:
        """Claim the job (a duplicate or late message finds it held or finished and does nothing),
        hold its lease while working, and finish it only while still holding it."""
        holder = work.holder_id()
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
            study_id = study.id
        log.info("job %s: processing study id %s (attempt %d)", job_id, study_id, job.attempts)
        renew = lambda session: work.renew_job(session, job_id, holder, self.policy)  # noqa: E731
        with LeaseKeeper(self.database, renew, self.policy, f"job {job_id}"):
            try:
                return self._process(job_id, study_id, holder)
            except LeaseLost:
                log.warning("job %s (study id %s): its lease was taken back while it ran; its results are "
                            "left to the worker that holds it now", job_id, study_id)
                return JobOutcome("LOST")
            except Exception as exc:
                log.exception("job %s (study id %s) failed", job_id, study_id)
                reason = f"{type(exc).__name__}: {exc}"[:2000]
                with self.database.session() as session:
                    job = self._owned(session, job_id, holder)
                    self._finish(session, job, session.get(Study, study_id), StudyStatus.FAILED, reason,
                                 job_error=reason)
                return JobOutcome(str(StudyStatus.FAILED), reason)

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

    def _process(self, job_id: int, study_id: int, holder: str) -> JobOutcome:
        with self.database.session() as session:
            instances = session.scalars(
                select(Instance).where(Instance.study_id == study_id).order_by(Instance.id)
            ).all()
            study_uid = session.get(Study, study_id).study_instance_uid
            records = [(i.id, i.sop_instance_uid, i.path, i.sha256) for i in instances]

        selected, refusals = self._select(records)
        if not selected:
            reason = "no eligible frontal chest radiograph: " + "; ".join(refusals or ["no instances"])
            with self.database.session() as session:
                self._finish(session, self._owned(session, job_id, holder), session.get(Study, study_id),
                             StudyStatus.SKIPPED, reason)
            log.info("job %s: study id %s SKIPPED (%d instance(s) ineligible)", job_id, study_id, len(refusals))
            return JobOutcome(str(StudyStatus.SKIPPED), reason)

        model = self.model
        card: ModelCard = model.card
        algorithm = algorithm_info(card, model.runtime)
        predictions = model.predict([s.display for s in selected], cams=True, metadata=[s.dataset for s in selected])
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
            for s, prediction in zip(selected, predictions)
        ]
        objects = build_results(
            [s.dataset for s in selected],
            [s.display for s in selected],
            image_results,
            [p.cams for p in predictions],
            algorithm,
            parametric_maps=self.settings.parametric_map,
            predecessors=self._earlier_reports(study_id, study_uid, sr_uid(image_results, algorithm)),
        )
        written = self._write_results(study_uid, objects, algorithm)
        priority = compute_priority(f for r in image_results for f in r.findings)
        positives = sorted({f.finding for r in image_results for f in r.positive})
        reason = ("positive: " + ", ".join(positives)) if positives else "no finding above its operating threshold"
        if refusals:
            reason += f" ({len(refusals)} other instance(s) not analysed: " + "; ".join(refusals) + ")"

        with self.database.session() as session:
            job = self._owned(session, job_id, holder)  # and locked until this transaction ends
            study = session.get(Study, study_id)
            session.execute(delete(Finding).where(Finding.study_id == study_id))
            for result in image_results:
                for finding in result.findings:
                    session.add(Finding(
                        study_id=study_id, sop_instance_uid=result.sop_instance_uid, finding=finding.finding,
                        probability=finding.probability, threshold=finding.threshold, present=finding.present,
                    ))
            now = datetime.now(timezone.utc)
            for kind, ds, relpath, source_uid, finding in written:
                row = session.scalar(select(ResultObject).where(ResultObject.sop_instance_uid == str(ds.SOPInstanceUID)))
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
            study.priority = keep_priority(study.priority, priority)
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
        log.info("job %s: study id %s %s, priority %.1f, %d result object(s), model %s %s", job_id, study_id,
                 "DONE" if done else "superseded", priority, len(written), algorithm.name, algorithm.version)
        return JobOutcome(str(StudyStatus.DONE), reason, tuple(export_ids))

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

    def _select(self, records: Sequence[tuple[int, str, str, str]]) -> tuple[list[Selected], list[str]]:
        selected: list[Selected] = []
        refusals: list[str] = []
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
            with self.database.session() as session:
                instance = session.get(Instance, instance_id)
                instance.eligible = not reason
                instance.eligibility_reason = reason
            if reason:
                refusals.append(f"{sop_uid}: {reason}")
                log.info("SOP %s not analysed: %s", sop_uid, reason)
            else:
                selected.append(Selected(instance_id, ds, display, sha256))
        return selected, refusals

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
        for kind, ds, source_uid, finding in pairs:
            relpath = result_relpath(study_uid, str(ds.SOPInstanceUID))
            self.settings.storage.results.write(relpath, lambda handle, ds=ds: ds.save_as(handle, enforce_file_format=True))
            written.append((kind, ds, relpath, source_uid, finding))
        return written

