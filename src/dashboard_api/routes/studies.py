"""One study: its detail, its Structured Report, its heatmaps and Parametric Maps."""

from __future__ import annotations

import io
import logging
from collections import defaultdict
from datetime import datetime, timezone
from typing import Annotated

import pydicom
from fastapi import APIRouter, Depends, HTTPException, status

from dicom_io import sr_text
from triage_core import audit, priority
from triage_core.states import AuditAction, ExportStatus, ResultKind
from triage_core.storage import is_valid_uid

from .. import crud
from ..auth import Principal, ReaderDep, read_studies
from ..deps import PolicyDep, SessionDep, SettingsDep, StudyDep, StudyInstanceUidDep, uid_path
from ..dicom_files import (
    DICOM_MEDIA_TYPE,
    MULTIPART_MEDIA_TYPE,
    DicomResponse,
    MultipartDicomResponse,
    read_result_file,
)
from ..schemas import (
    ExportPublic,
    FindingPublic,
    ImageFindingsPublic,
    InstancePublic,
    JobPublic,
    ResultObjectPublic,
    SrContentPublic,
    SrItemPublic,
    StudyDetailPublic,
    StudyReadPublic,
    disclaimer,
    error_response,
)
from .views import export_summary, priority_public, study_fields, viewer_url

log = logging.getLogger(__name__)

router = APIRouter(prefix="/studies", tags=["studies"], dependencies=[Depends(read_studies)])

_NOT_FOUND = {status.HTTP_404_NOT_FOUND: error_response("Unknown study, or no such result object")}
_DICOM_FILE = {200: {"content": {DICOM_MEDIA_TYPE: {}}, "description": "A DICOM Part 10 file"}}


@router.get("/{study_instance_uid}", response_model=StudyDetailPublic, responses=_NOT_FOUND)
def read_study(session: SessionDep, settings: SettingsDep, policy: PolicyDep, principal: ReaderDep,
               study_instance_uid: StudyInstanceUidDep) -> StudyDetailPublic:
    """Everything known about a study: findings per image, instances, result objects, exports, jobs."""
    study = crud.get_study(session=session, study_instance_uid=study_instance_uid, full=True)
    if study is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"study {study_instance_uid} not found")

    per_image: dict[str, list[FindingPublic]] = defaultdict(list)
    for finding in study.findings:  # in insertion order: the model's label order
        per_image[finding.sop_instance_uid].append(FindingPublic.model_validate(finding))
    current = [r for r in study.results if r.superseded_at is None]  # superseded objects are history only
    counts = crud.ExportCounts(
        total=len(study.exports),
        exported=sum(e.status == ExportStatus.EXPORTED for e in study.exports),
        pending=sum(e.status == ExportStatus.EXPORT_PENDING for e in study.exports),
        failed=sum(e.status == ExportStatus.EXPORT_FAILED for e in study.exports),
    )
    detail = StudyDetailPublic(
        **study_fields(study, now=datetime.now(timezone.utc), policy=policy),
        study_description=study.study_description,
        last_instance_at=study.last_instance_at,
        images=[ImageFindingsPublic(sop_instance_uid=uid, findings=f) for uid, f in per_image.items()],
        instances=[InstancePublic.model_validate(i) for i in study.instances],
        results=[ResultObjectPublic.model_validate(r) for r in current],
        heatmap_sop_instance_uids=[r.sop_instance_uid for r in current if r.kind == ResultKind.HEATMAP],
        export=export_summary(counts),
        exports=[ExportPublic.model_validate(e) for e in study.exports],
        jobs=[JobPublic.model_validate(j) for j in study.jobs],
        viewer_url=viewer_url(study, settings),
        disclaimer=disclaimer(demo=study.model_demo),
    )
    audit.record(session, actor=principal.name, client_address=principal.client_address, action=AuditAction.READ_STUDY,
                 study=study)
    return detail


@router.get(
    "/{study_instance_uid}/sr",
    response_class=DicomResponse,
    responses={**_DICOM_FILE, **_NOT_FOUND},
)
def read_sr(session: SessionDep, settings: SettingsDep, principal: ReaderDep, study: StudyDep) -> DicomResponse:
    """The study's TID 1500 Structured Report (the newest, if re-processed) as ``application/dicom``."""
    reports = crud.get_results(session=session, study=study, kind=ResultKind.SR)
    if not reports:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"study {study.study_instance_uid} has no structured report")
    report = reports[0]
    content = read_result_file(settings.storage.results, report)
    audit.record(session, actor=principal.name, client_address=principal.client_address, action=AuditAction.READ_SR,
                 study=study, sop_instance_uid=report.sop_instance_uid)
    return DicomResponse(
        content=content,
        headers={"Content-Disposition": f'attachment; filename="{report.sop_instance_uid}.dcm"'},
    )


def _sr_item(item: sr_text.ContentItem) -> SrItemPublic:
    return SrItemPublic(relationship=item.relationship, value_type=item.value_type, name=item.name, code=item.code,
                        value=item.value, children=[_sr_item(child) for child in item.children])


@router.get("/{study_instance_uid}/sr/content", response_model=SrContentPublic, responses=_NOT_FOUND)
def read_sr_content(session: SessionDep, settings: SettingsDep, principal: ReaderDep, study: StudyDep
                    ) -> SrContentPublic:
    """The study's structured report (the newest) as readable content: its tree of content items,
    each value in words, and the same tree as indented text."""
    reports = crud.get_results(session=session, study=study, kind=ResultKind.SR)
    if not reports:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"study {study.study_instance_uid} has no structured report")
    report = reports[0]
    content = read_result_file(settings.storage.results, report)
    try:
        document = sr_text.read_sr(pydicom.dcmread(io.BytesIO(content)))
    except (ValueError, TypeError, AttributeError, pydicom.errors.InvalidDicomError) as exc:
        log.error("SR %s of study %s cannot be read: %s", report.sop_instance_uid, study.study_instance_uid,
                  type(exc).__name__)
        raise HTTPException(status.HTTP_500_INTERNAL_SERVER_ERROR,
                            f"structured report {report.sop_instance_uid} cannot be read: {exc}"[:300]) from None
    audit.record(session, actor=principal.name, client_address=principal.client_address, action=AuditAction.READ_SR,
                 study=study, sop_instance_uid=report.sop_instance_uid, format="content")
    return SrContentPublic(
        sop_instance_uid=document.sop_instance_uid, series_instance_uid=document.series_instance_uid,
        title=document.title, completion_flag=document.completion_flag,
        verification_flag=document.verification_flag, content_datetime=document.content_datetime,
        root=_sr_item(document.root), text=sr_text.as_text(document), disclaimer=disclaimer(demo=study.model_demo),
    )


def _read_state(session, study, principal: Principal, policy, action: AuditAction) -> StudyReadPublic:
    now = datetime.now(timezone.utc)
    changed = (study.read_at is None) == (action == AuditAction.MARKED_READ)
    if changed:
        if action == AuditAction.MARKED_READ:
            priority.mark_read(study, reader=principal.name, now=now)
        else:
            priority.mark_unread(study)
        audit.record(session, actor=principal.name, client_address=principal.client_address, action=action,
                     study=study)
    return StudyReadPublic(study_instance_uid=study.study_instance_uid, read_at=study.read_at, read_by=study.read_by,
                           priority=priority_public(study, now=now, policy=policy))


@router.put("/{study_instance_uid}/read", response_model=StudyReadPublic, responses=_NOT_FOUND)
def mark_read(session: SessionDep, policy: PolicyDep, principal: ReaderDep, study: StudyDep) -> StudyReadPublic:
    """Mark the study read: it leaves the waiting queue (listed after every waiting study) and stops
    escalating. Idempotent: a study already read keeps its first reader and time. New images for the
    study make it wait again."""
    return _read_state(session, study, principal, policy, AuditAction.MARKED_READ)


@router.delete("/{study_instance_uid}/read", response_model=StudyReadPublic, responses=_NOT_FOUND)
def mark_unread(session: SessionDep, policy: PolicyDep, principal: ReaderDep, study: StudyDep) -> StudyReadPublic:
    """Put the study back in the waiting queue, as waiting since it first started waiting. Idempotent."""
    return _read_state(session, study, principal, policy, AuditAction.MARKED_UNREAD)


def _read_all(session, settings, principal: Principal, study, kind: ResultKind, noun: str, action: AuditAction
              ) -> MultipartDicomResponse:
    objects = crud.get_results(session=session, study=study, kind=kind)
    if not objects:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"study {study.study_instance_uid} has no {noun}s")
    objects.sort(key=lambda r: r.id)
    parts = [read_result_file(settings.storage.results, o) for o in objects]
    audit.record(session, actor=principal.name, client_address=principal.client_address, action=action, study=study,
                 sop_instance_uids=[o.sop_instance_uid for o in objects])
    return MultipartDicomResponse(parts)


def _read_one(session, settings, principal: Principal, study, sop_instance_uid: str, kind: ResultKind, noun: str,
              action: AuditAction) -> DicomResponse:
    if not is_valid_uid(sop_instance_uid):
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, f"{sop_instance_uid!r} is not a valid SOP Instance UID"
        )
    found = crud.get_results(session=session, study=study, kind=kind, sop_instance_uid=sop_instance_uid)
    if not found:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, f"{noun} {sop_instance_uid} not found in study {study.study_instance_uid}"
        )
    content = read_result_file(settings.storage.results, found[0])
    audit.record(session, actor=principal.name, client_address=principal.client_address, action=action, study=study,
                 sop_instance_uids=[sop_instance_uid])
    return DicomResponse(
        content=content,
        headers={"Content-Disposition": f'attachment; filename="{sop_instance_uid}.dcm"'},
    )


@router.get(
    "/{study_instance_uid}/heatmaps",
    response_class=MultipartDicomResponse,
    responses={
        200: {"content": {MULTIPART_MEDIA_TYPE: {}}, "description": "All heatmap objects, one DICOM file per part"},
        **_NOT_FOUND,
    },
)
def read_heatmaps(session: SessionDep, settings: SettingsDep, principal: ReaderDep, study: StudyDep) -> MultipartDicomResponse:
    """All heatmap objects of the study as ``multipart/related; type="application/dicom"`` (DICOMweb style).

    The study detail lists their SOP Instance UIDs for retrieving one at a time.
    """
    return _read_all(session, settings, principal, study, ResultKind.HEATMAP, "heatmap", AuditAction.READ_HEATMAPS)


@router.get(
    "/{study_instance_uid}/heatmaps/{sop_instance_uid}",
    response_class=DicomResponse,
    responses={**_DICOM_FILE, **_NOT_FOUND},
)
def read_heatmap(
    session: SessionDep,
    settings: SettingsDep,
    principal: ReaderDep,
    study: StudyDep,
    sop_instance_uid: Annotated[str, uid_path("SOP Instance UID of the heatmap")],
) -> DicomResponse:
    """One heatmap object as ``application/dicom``."""
    return _read_one(session, settings, principal, study, sop_instance_uid, ResultKind.HEATMAP, "heatmap",
                     AuditAction.READ_HEATMAPS)


@router.get(
    "/{study_instance_uid}/parametric-maps",
    response_class=MultipartDicomResponse,
    responses={
        200: {"content": {MULTIPART_MEDIA_TYPE: {}}, "description": "All Parametric Maps, one DICOM file per part"},
        **_NOT_FOUND,
    },
)
def read_parametric_maps(session: SessionDep, settings: SettingsDep, principal: ReaderDep, study: StudyDep
                         ) -> MultipartDicomResponse:
    """All Parametric Maps (the raw float CAMs, one per heatmap) as ``multipart/related; type="application/dicom"``."""
    return _read_all(session, settings, principal, study, ResultKind.PARAMETRIC_MAP, "parametric map",
                     AuditAction.READ_PARAMETRIC_MAPS)


@router.get(
    "/{study_instance_uid}/parametric-maps/{sop_instance_uid}",
    response_class=DicomResponse,
    responses={**_DICOM_FILE, **_NOT_FOUND},
)
def read_parametric_map(
    session: SessionDep,
    settings: SettingsDep,
    principal: ReaderDep,
    study: StudyDep,
    sop_instance_uid: Annotated[str, uid_path("SOP Instance UID of the Parametric Map")],
) -> DicomResponse:
    """One Parametric Map as ``application/dicom``."""
    return _read_one(session, settings, principal, study, sop_instance_uid, ResultKind.PARAMETRIC_MAP, "parametric map",
                     AuditAction.READ_PARAMETRIC_MAPS)
