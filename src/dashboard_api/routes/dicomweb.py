"""DICOMweb (PS3.18) at ``/dicomweb``: QIDO-RS search and WADO-RS retrieval of received images and our results.

Same authentication as the rest of the API (radiologist or admin), every answer audited:
a search as QUERY, a retrieval as READ_INSTANCES, metadata as READ_METADATA, a rendered
image as READ_RENDERED. Instances are served as stored (each part names its transfer
syntax); there is no transcoding, no frame or bulk data retrieval and no STOW-RS.
"""

from __future__ import annotations

import io
import logging
import secrets
from collections.abc import Iterator
from typing import Annotated

import numpy as np
import pydicom
from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response, status
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image
from pydantic import Field

from dicom_io.pixels import PixelRefused, display_array
from triage_core import audit
from triage_core.models import Study
from triage_core.states import AuditAction, ResultKind
from triage_core.storage import is_valid_uid

from .. import crud
from .. import dicomweb_store as store
from ..auth import Principal, ReaderDep, read_studies
from ..deps import SessionDep, SettingsDep, uid_path
from ..schemas import MAX_OFFSET, _Input, error_response

log = logging.getLogger(__name__)

router = APIRouter(prefix="/dicomweb", tags=["dicomweb"], dependencies=[Depends(read_studies)])

DICOM_JSON = "application/dicom+json"
MULTIPART_DICOM = 'multipart/related; type="application/dicom"'
MAX_QIDO_LIMIT = 1000
_U = r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*"
UID_LIST_PATTERN = rf"^{_U}([,\\]{_U})*$"
MODALITY_LIST_PATTERN = r"^[A-Z0-9_ ]{1,16}([,\\][A-Z0-9_ ]{1,16})*$"
INCLUDEFIELD_PATTERN = r"^[A-Za-z0-9]+(,[A-Za-z0-9]+)*$"
DATE_RANGE_PATTERN = r"^([0-9]{8}|[0-9]{8}-|-[0-9]{8}|[0-9]{8}-[0-9]{8})$"

_JSON_LIST = {200: {"content": {DICOM_JSON: {"schema": {"type": "array", "items": {"type": "object"}}}},
                    "description": "Matches in the DICOM JSON model (PS3.18 F.2)"}}
_MULTIPART = {200: {"content": {MULTIPART_DICOM: {"schema": {"type": "string", "format": "binary"}}},
                    "description": "One DICOM Part 10 file per part, as stored (each part names its transfer syntax)"}}
_NOT_FOUND = {status.HTTP_404_NOT_FOUND: error_response("No such study, series or instance")}
_PNG = {200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
              "description": "The image as displayed, 8 bits per sample"},
        status.HTTP_406_NOT_ACCEPTABLE: error_response("This object has no image to render (an SR or a "
                                                       "Parametric Map), or one that cannot be decoded")}


class QidoQuery(_Input):
    """QIDO-RS matching keys (PS3.18 10.6.1.2): study keys filter studies, series and instance keys below them."""

    StudyInstanceUID: list[Annotated[str, Field(pattern=UID_LIST_PATTERN)]] = Field(
        default_factory=list, description="UID list matching: repeat, or separate with commas or backslashes")
    PatientID: str | None = Field(None, min_length=1, max_length=64, description="`*` and `?` are wildcards")
    AccessionNumber: str | None = Field(None, min_length=1, max_length=64, description="`*` and `?` are wildcards")
    StudyDate: str | None = Field(None, pattern=DATE_RANGE_PATTERN,
                                  description="YYYYMMDD, or a range YYYYMMDD-YYYYMMDD, -YYYYMMDD, YYYYMMDD-")
    ModalitiesInStudy: list[Annotated[str, Field(pattern=MODALITY_LIST_PATTERN)]] = Field(
        default_factory=list, description="Studies with any of these modalities")
    SeriesInstanceUID: list[Annotated[str, Field(pattern=UID_LIST_PATTERN)]] = Field(default_factory=list)
    Modality: list[Annotated[str, Field(pattern=MODALITY_LIST_PATTERN)]] = Field(default_factory=list)
    SOPInstanceUID: list[Annotated[str, Field(pattern=UID_LIST_PATTERN)]] = Field(default_factory=list)
    SOPClassUID: list[Annotated[str, Field(pattern=UID_LIST_PATTERN)]] = Field(default_factory=list)
    includefield: list[Annotated[str, Field(max_length=1000, pattern=INCLUDEFIELD_PATTERN)]] = Field(
        default_factory=list, description="`all`, or DICOM keywords / tags (ggggeeee) to add to each match; "
        "unknown ones are ignored with a Warning header")
    fuzzymatching: bool = Field(False, description="Not supported: matching stays exact (a Warning header says so)")
    limit: int = Field(100, ge=1, le=MAX_QIDO_LIMIT)
    offset: int = Field(0, ge=0, le=MAX_OFFSET)


QidoDep = Annotated[QidoQuery, Query()]


def _base_url(request: Request) -> str:
    """Where the client reached us; a Host header without its port (some clients send one) gets the server's."""
    url = request.base_url
    server = request.scope.get("server")
    if url.port is None and server and server[1] not in (80, 443):
        url = url.replace(port=server[1])
    return str(url).rstrip("/") + "/dicomweb"


def _check_uids(**uids: str | None) -> None:
    for name, value in uids.items():
        if value is not None and not is_valid_uid(value):
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"{value!r} is not a valid {name}")


def _studies(session, query: QidoQuery, study_instance_uid: str | None) -> list[Study]:
    uids = [study_instance_uid] if study_instance_uid else store.uid_list(query.StudyInstanceUID)
    return store.search_studies(
        session=session, study_instance_uids=uids, patient_id=query.PatientID,
        accession_number=query.AccessionNumber, study_date=query.StudyDate,
        modalities=store.uid_list(query.ModalitiesInStudy),
    )


def _filter(objs: list[store.DicomObject], query: QidoQuery) -> list[store.DicomObject]:
    series = set(store.uid_list(query.SeriesInstanceUID))
    modalities = set(store.uid_list(query.Modality))
    sops = set(store.uid_list(query.SOPInstanceUID))
    classes = set(store.uid_list(query.SOPClassUID))
    return [o for o in objs
            if (not series or o.series_instance_uid in series) and (not modalities or o.modality in modalities)
            and (not sops or o.sop_instance_uid in sops) and (not classes or o.sop_class_uid in classes)]


def _includefield(query: QidoQuery, warnings: list[str]) -> tuple[bool, list[int]]:
    include_all, tags, unknown = False, [], []
    for value in query.includefield:
        for part in filter(None, (p.strip() for p in value.split(","))):
            try:
                part_all, part_tags = store.parse_includefield([part])
            except store.QueryError:
                unknown.append(part)
                continue
            include_all |= part_all
            tags += part_tags
    if unknown:
        warnings.append(f"includefield {', '.join(unknown)[:200]} not DICOM keywords or tags (ignored)")
    return include_all, tags


def _answer(request: Request, rows: list[dict], total: int, query: QidoQuery, warnings: list[str]) -> JSONResponse:
    if query.fuzzymatching:
        warnings.append("fuzzymatching is not supported; matching was exact")
    if total > query.offset + len(rows):
        warnings.append(f"there are {total - query.offset - len(rows)} additional results that can be requested")
    text = ", ".join(f'299 cxr-triage "{w}"' for w in warnings).encode("ascii", "replace").decode()
    headers = {"Warning": text} if warnings else None
    return JSONResponse(rows, media_type=DICOM_JSON, headers=headers)


def _record_query(session, principal: Principal, level: str, query: QidoQuery, studies: list[Study],
                  study: Study | None = None) -> None:
    audit.record(session, actor=principal.name, client_address=principal.client_address, action=AuditAction.QUERY,
                 study=study, level=level, filter=query.model_dump(mode="json", exclude_defaults=True),
                 study_instance_uids=[s.study_instance_uid for s in studies][:200])


def _search(level: str, request: Request, session, settings, principal: Principal, query: QidoQuery,
            study_instance_uid: str | None = None, series_instance_uid: str | None = None) -> JSONResponse:
    warnings: list[str] = []
    include_all, tags = _includefield(query, warnings)
    studies = _studies(session, query, study_instance_uid)
    base = _base_url(request)
    extra = store.extra_tags(level, include_all, tags)
    if level == "study":
        objs = store.objects(session=session, settings=settings, studies=studies)
        objs = _filter(objs, query)
        per_study: dict[int, list[store.DicomObject]] = {}
        for obj in objs:
            per_study.setdefault(obj.study.id, []).append(obj)
        if any([query.SeriesInstanceUID, query.Modality, query.SOPInstanceUID, query.SOPClassUID]):
            studies = [s for s in studies if s.id in per_study]
        page = studies[query.offset:query.offset + query.limit]
        rows = [store.to_json(store.study_dataset(s, per_study.get(s.id, []), base, extra)) for s in page]
        total, answered = len(studies), page
    else:
        if series_instance_uid is not None:
            query = query.model_copy(update={"SeriesInstanceUID": [series_instance_uid]})
        objs = _filter(store.objects(session=session, settings=settings, studies=studies), query)
        if level == "series":
            all_series = store.series_datasets(objs, base, [])
            page_keys = [(ds.StudyInstanceUID, ds.SeriesInstanceUID)
                         for ds in all_series][query.offset:query.offset + query.limit]
            members = [o for o in objs if (o.study.study_instance_uid, o.series_instance_uid) in set(page_keys)]
            rows = [store.to_json(ds) for ds in store.series_datasets(members, base, extra)]
            total = len(all_series)
        else:
            page_objs = objs[query.offset:query.offset + query.limit]
            rows = [store.to_json(store.instance_dataset(o, base, extra)) for o in page_objs]
            total = len(objs)
        answered_ids = {o.study.id for o in objs}
        answered = [s for s in studies if s.id in answered_ids]
    one = studies[0] if study_instance_uid and studies else None
    _record_query(session, principal, level, query, answered, one)
    return _answer(request, rows, total, query, warnings)


def _known_study(session, study_instance_uid: str) -> Study:
    _check_uids(**{"Study Instance UID": study_instance_uid})
    study = crud.get_study(session=session, study_instance_uid=study_instance_uid)
    if study is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"study {study_instance_uid} not found")
    return study


# --- QIDO-RS ----------------------------------------------------------------------------------------


@router.get("/studies", responses=_JSON_LIST, response_class=JSONResponse)
def search_for_studies(request: Request, session: SessionDep, settings: SettingsDep, principal: ReaderDep,
                       query: QidoDep) -> JSONResponse:
    """Studies matching the query (received images and our results count alike)."""
    return _search("study", request, session, settings, principal, query)


@router.get("/series", responses=_JSON_LIST, response_class=JSONResponse)
def search_for_all_series(request: Request, session: SessionDep, settings: SettingsDep, principal: ReaderDep,
                          query: QidoDep) -> JSONResponse:
    """Series of every study matching the query."""
    return _search("series", request, session, settings, principal, query)


@router.get("/instances", responses=_JSON_LIST, response_class=JSONResponse)
def search_for_all_instances(request: Request, session: SessionDep, settings: SettingsDep, principal: ReaderDep,
                             query: QidoDep) -> JSONResponse:
    """Instances of every study matching the query."""
    return _search("instance", request, session, settings, principal, query)


@router.get("/studies/{study_instance_uid}/series", responses={**_JSON_LIST, **_NOT_FOUND},
            response_class=JSONResponse)
def search_for_series(request: Request, session: SessionDep, settings: SettingsDep, principal: ReaderDep,
                      study_instance_uid: Annotated[str, uid_path("Study Instance UID")],
                      query: QidoDep) -> JSONResponse:
    """The series of one study (the SR, heatmap and Parametric Map series beside the received ones)."""
    _known_study(session, study_instance_uid)
    return _search("series", request, session, settings, principal, query, study_instance_uid)


@router.get("/studies/{study_instance_uid}/instances", responses={**_JSON_LIST, **_NOT_FOUND},
            response_class=JSONResponse)
def search_for_study_instances(request: Request, session: SessionDep, settings: SettingsDep, principal: ReaderDep,
                               study_instance_uid: Annotated[str, uid_path("Study Instance UID")],
                               query: QidoDep) -> JSONResponse:
    """The instances of one study."""
    _known_study(session, study_instance_uid)
    return _search("instance", request, session, settings, principal, query, study_instance_uid)


@router.get("/studies/{study_instance_uid}/series/{series_instance_uid}/instances",
            responses={**_JSON_LIST, **_NOT_FOUND}, response_class=JSONResponse)
def search_for_instances(request: Request, session: SessionDep, settings: SettingsDep, principal: ReaderDep,
                         study_instance_uid: Annotated[str, uid_path("Study Instance UID")],
                         series_instance_uid: Annotated[str, uid_path("Series Instance UID")],
                         query: QidoDep) -> JSONResponse:
    """The instances of one series."""
    _known_study(session, study_instance_uid)
    _check_uids(**{"Series Instance UID": series_instance_uid})
    return _search("instance", request, session, settings, principal, query, study_instance_uid,
                   series_instance_uid)


# --- WADO-RS ----------------------------------------------------------------------------------------


def _selected(session, settings, study_instance_uid: str, series_instance_uid: str | None = None,
              sop_instance_uid: str | None = None) -> tuple[Study, list[store.DicomObject]]:
    study = _known_study(session, study_instance_uid)
    _check_uids(**{"Series Instance UID": series_instance_uid, "SOP Instance UID": sop_instance_uid})
    try:
        objs = store.objects(session=session, settings=settings, studies=[study],
                             series_instance_uid=series_instance_uid, sop_instance_uid=sop_instance_uid)
    except FileNotFoundError as exc:
        log.error("study %s: %s", study_instance_uid, exc)
        raise HTTPException(status.HTTP_500_INTERNAL_SERVER_ERROR, "a stored object has an invalid path") from None
    if not objs:
        what = (f"instance {sop_instance_uid}" if sop_instance_uid else f"series {series_instance_uid}"
                if series_instance_uid else "any instance")
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"study {study_instance_uid} has no {what}")
    missing = [o for o in objs if not o.exists()]
    if missing:
        log.error("study %s: the file of SOP %s is missing from storage", study_instance_uid,
                  missing[0].sop_instance_uid)
        raise HTTPException(status.HTTP_500_INTERNAL_SERVER_ERROR,
                            f"instance {missing[0].sop_instance_uid} is recorded but its file is missing from storage")
    return study, objs


def _transfer_syntax(obj: store.DicomObject) -> str:
    try:
        with obj.open() as handle:
            meta = pydicom.dcmread(handle, stop_before_pixels=True, specific_tags=[0x00080016]).file_meta
        return str(meta.TransferSyntaxUID)
    except Exception:  # a file without a meta header: the part carries no transfer-syntax parameter
        return ""


def _multipart(objs: list[store.DicomObject]) -> StreamingResponse:
    """``multipart/related; type="application/dicom"`` streamed from the stored files (PS3.18 8.7.1)."""
    boundary = secrets.token_hex(16)  # 128 random bits: never inside a part in practice
    syntaxes = [_transfer_syntax(o) for o in objs]

    def body() -> Iterator[bytes]:
        for obj, syntax in zip(objs, syntaxes):
            size = obj.size()
            kind = f"application/dicom; transfer-syntax={syntax}" if syntax else "application/dicom"
            yield f"--{boundary}\r\nContent-Type: {kind}\r\nContent-Length: {size}\r\n\r\n".encode()
            with obj.open() as handle:
                while chunk := handle.read(1 << 20):
                    yield chunk
            yield b"\r\n"
        yield f"--{boundary}--\r\n".encode()

    return StreamingResponse(body(), media_type=f"{MULTIPART_DICOM}; boundary={boundary}")


def _retrieve(session, settings, principal: Principal, study_instance_uid: str, series_instance_uid: str | None = None,
              sop_instance_uid: str | None = None) -> StreamingResponse:
    study, objs = _selected(session, settings, study_instance_uid, series_instance_uid, sop_instance_uid)
    audit.record(session, actor=principal.name, client_address=principal.client_address,
                 action=AuditAction.READ_INSTANCES, study=study,
                 sop_instance_uids=[o.sop_instance_uid for o in objs][:500], count=len(objs))
    return _multipart(objs)


def _metadata(session, settings, principal: Principal, study_instance_uid: str, series_instance_uid: str | None = None,
              sop_instance_uid: str | None = None) -> JSONResponse:
    study, objs = _selected(session, settings, study_instance_uid, series_instance_uid, sop_instance_uid)
    rows = []
    for obj in objs:
        ds = store.header(obj)
        ds.pop("PixelData", None)
        rows.append(ds.to_json_dict(bulk_data_threshold=1 << 30))
    audit.record(session, actor=principal.name, client_address=principal.client_address,
                 action=AuditAction.READ_METADATA, study=study,
                 sop_instance_uids=[o.sop_instance_uid for o in objs][:500], count=len(objs))
    return JSONResponse(rows, media_type=DICOM_JSON)


StudyUid = Annotated[str, uid_path("Study Instance UID")]
SeriesUid = Annotated[str, uid_path("Series Instance UID")]
SopUid = Annotated[str, uid_path("SOP Instance UID")]


@router.get("/studies/{study_instance_uid}", response_class=StreamingResponse, responses={**_MULTIPART, **_NOT_FOUND})
def retrieve_study(session: SessionDep, settings: SettingsDep, principal: ReaderDep,
                   study_instance_uid: StudyUid) -> StreamingResponse:
    """Every instance of the study: the received images and our current results."""
    return _retrieve(session, settings, principal, study_instance_uid)


@router.get("/studies/{study_instance_uid}/series/{series_instance_uid}", response_class=StreamingResponse,
            responses={**_MULTIPART, **_NOT_FOUND})
def retrieve_series(session: SessionDep, settings: SettingsDep, principal: ReaderDep, study_instance_uid: StudyUid,
                    series_instance_uid: SeriesUid) -> StreamingResponse:
    """Every instance of one series."""
    return _retrieve(session, settings, principal, study_instance_uid, series_instance_uid)


@router.get("/studies/{study_instance_uid}/series/{series_instance_uid}/instances/{sop_instance_uid}",
            response_class=StreamingResponse, responses={**_MULTIPART, **_NOT_FOUND})
def retrieve_instance(session: SessionDep, settings: SettingsDep, principal: ReaderDep, study_instance_uid: StudyUid,
                      series_instance_uid: SeriesUid, sop_instance_uid: SopUid) -> StreamingResponse:
    """One instance, as a one-part ``multipart/related`` answer."""
    return _retrieve(session, settings, principal, study_instance_uid, series_instance_uid, sop_instance_uid)


@router.get("/studies/{study_instance_uid}/metadata", response_class=JSONResponse,
            responses={**_JSON_LIST, **_NOT_FOUND})
def retrieve_study_metadata(session: SessionDep, settings: SettingsDep, principal: ReaderDep,
                            study_instance_uid: StudyUid) -> JSONResponse:
    """Every instance's attributes (no pixel data) in the DICOM JSON model."""
    return _metadata(session, settings, principal, study_instance_uid)


@router.get("/studies/{study_instance_uid}/series/{series_instance_uid}/metadata", response_class=JSONResponse,
            responses={**_JSON_LIST, **_NOT_FOUND})
def retrieve_series_metadata(session: SessionDep, settings: SettingsDep, principal: ReaderDep,
                             study_instance_uid: StudyUid, series_instance_uid: SeriesUid) -> JSONResponse:
    """The attributes of one series' instances."""
    return _metadata(session, settings, principal, study_instance_uid, series_instance_uid)


@router.get("/studies/{study_instance_uid}/series/{series_instance_uid}/instances/{sop_instance_uid}/metadata",
            response_class=JSONResponse, responses={**_JSON_LIST, **_NOT_FOUND})
def retrieve_instance_metadata(session: SessionDep, settings: SettingsDep, principal: ReaderDep,
                               study_instance_uid: StudyUid, series_instance_uid: SeriesUid,
                               sop_instance_uid: SopUid) -> JSONResponse:
    """The attributes of one instance."""
    return _metadata(session, settings, principal, study_instance_uid, series_instance_uid, sop_instance_uid)


@router.get("/studies/{study_instance_uid}/series/{series_instance_uid}/instances/{sop_instance_uid}/rendered",
            response_class=Response, responses={**_PNG, **_NOT_FOUND})
def retrieve_rendered_instance(session: SessionDep, settings: SettingsDep, principal: ReaderDep,
                               study_instance_uid: StudyUid, series_instance_uid: SeriesUid,
                               sop_instance_uid: SopUid) -> Response:
    """The instance as a PNG: a heatmap Secondary Capture as its RGB pixels, a radiograph as displayed
    (Modality and VOI LUT, MONOCHROME1 inverted)."""
    study, (obj,) = _selected(session, settings, study_instance_uid, series_instance_uid, sop_instance_uid)
    if obj.result_kind in (ResultKind.SR, ResultKind.PARAMETRIC_MAP):
        raise HTTPException(status.HTTP_406_NOT_ACCEPTABLE,
                            f"instance {sop_instance_uid} is a {obj.result_kind.replace('_', ' ').lower()}: "
                            "nothing to render (retrieve it as application/dicom)")
    try:
        with obj.open() as handle:
            ds = pydicom.dcmread(handle)
        if obj.result_kind == ResultKind.HEATMAP or ds.get("PhotometricInterpretation") == "RGB":
            pixels = np.asarray(ds.pixel_array, dtype=np.uint8)
            image = Image.fromarray(pixels, mode="RGB")
        else:
            image = Image.fromarray(np.round(display_array(ds) * 255).astype(np.uint8), mode="L")
    except (PixelRefused, ValueError, TypeError, AttributeError, NotImplementedError, RuntimeError) as exc:
        log.warning("SOP %s of study %s cannot be rendered: %s", sop_instance_uid, study_instance_uid,
                    type(exc).__name__)
        raise HTTPException(status.HTTP_406_NOT_ACCEPTABLE,
                            f"instance {sop_instance_uid} cannot be rendered: {exc}"[:300]) from None
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    audit.record(session, actor=principal.name, client_address=principal.client_address,
                 action=AuditAction.READ_RENDERED, study=study, sop_instance_uids=[sop_instance_uid])
    return Response(buffer.getvalue(), media_type="image/png")
