"""What DICOMweb serves: the received instances and our current result objects, as one store per study.

Keyword-only functions over a session (no HTTP here), as ``crud``. Received instances and
result objects are read through the storage (``Settings.storage``: files under the data
directory, or an S3-compatible store); superseded
result objects are never served. Attributes the worklist keeps in the database answer
queries from it; the rest (series and instance numbers, a result object's modality,
``includefield`` attributes) are read from the file's header, never its pixel data.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from triage_core.models import Instance, ResultObject, Study
from triage_core.settings import Settings
from triage_core.states import ResultKind
from triage_core.storage import ObjectStore

#: Result kinds and the Modality their objects carry (highdicom's SR, our SC and PM writers).
RESULT_MODALITY = {ResultKind.SR: "SR", ResultKind.HEATMAP: "OT", ResultKind.PARAMETRIC_MAP: "OT"}


@dataclass(frozen=True)
class DicomObject:
    """One served instance: received (``result_kind`` empty) or one of our result objects."""

    study: Study
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    modality: str
    store: ObjectStore
    key: str
    result_kind: str = ""

    def open(self):
        return self.store.open(self.key)

    def exists(self) -> bool:
        return self.store.exists(self.key)

    def size(self) -> int:
        return self.store.size(self.key)


class QueryError(ValueError):
    """A QIDO-RS query parameter that cannot be matched (answered 400 with the message)."""


def objects(
    *, session: Session, settings: Settings, studies: list[Study], series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> list[DicomObject]:
    """The served objects of ``studies``, received first, then results; optionally one series or instance."""
    if not studies:
        return []
    by_id = {study.id: study for study in studies}
    received = select(Instance).where(Instance.study_id.in_(by_id))
    results = select(ResultObject).where(ResultObject.study_id.in_(by_id), ResultObject.superseded_at.is_(None))
    if series_instance_uid is not None:
        received = received.where(Instance.series_instance_uid == series_instance_uid)
        results = results.where(ResultObject.series_instance_uid == series_instance_uid)
    if sop_instance_uid is not None:
        received = received.where(Instance.sop_instance_uid == sop_instance_uid)
        results = results.where(ResultObject.sop_instance_uid == sop_instance_uid)
    storage = settings.storage
    found = [
        DicomObject(by_id[row.study_id], row.series_instance_uid, row.sop_instance_uid, row.sop_class_uid,
                    row.modality, storage.instances, _checked(storage.instances, row.path))
        for row in session.scalars(received.order_by(Instance.id))
    ]
    found += [
        DicomObject(by_id[row.study_id], row.series_instance_uid, row.sop_instance_uid, row.sop_class_uid,
                    RESULT_MODALITY.get(ResultKind(row.kind), "OT"), storage.results,
                    _checked(storage.results, row.path), row.kind)
        for row in session.scalars(results.order_by(ResultObject.id))
    ]
    return found


def _checked(store: ObjectStore, key: str) -> str:
    store.check_key(key)  # FileNotFoundError when the recorded key leaves its directory
    return key


# --- QIDO-RS matching -----------------------------------------------------------------------------

_DATE = re.compile(r"^\d{8}$")


def _wildcard(column, value: str):
    """DICOM wildcard matching (``*`` any run, ``?`` one character) as SQL LIKE; exact otherwise."""
    if "*" not in value and "?" not in value:
        return column == value
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return column.like(escaped.replace("*", "%").replace("?", "_"), escape="\\")


def _date_range(column, value: str):
    """``YYYYMMDD``, ``YYYYMMDD-YYYYMMDD``, ``-YYYYMMDD`` or ``YYYYMMDD-`` (PS3.4 C.2.2.2.5)."""
    if "-" not in value:
        if not _DATE.match(value):
            raise QueryError(f"StudyDate {value!r} is not YYYYMMDD or a range YYYYMMDD-YYYYMMDD")
        return column == value
    start, _, end = value.partition("-")
    if (start and not _DATE.match(start)) or (end and not _DATE.match(end)) or not (start or end):
        raise QueryError(f"StudyDate {value!r} is not YYYYMMDD or a range YYYYMMDD-YYYYMMDD")
    clauses = [column != ""]
    if start:
        clauses.append(column >= start)
    if end:
        clauses.append(column <= end)
    return clauses


def uid_list(values: list[str] | None) -> list[str]:
    """UID list matching: repeated parameters and/or backslash- or comma-separated values."""
    out: list[str] = []
    for value in values or []:
        out += [part for part in re.split(r"[\\,]", value) if part]
    return out


def search_studies(
    *, session: Session, study_instance_uids: list[str], patient_id: str | None, accession_number: str | None,
    study_date: str | None, modalities: list[str],
) -> list[Study]:
    """Studies matching the study-level keys, oldest first (then by id); ModalitiesInStudy matches any."""
    query = select(Study)
    if study_instance_uids:
        query = query.where(Study.study_instance_uid.in_(study_instance_uids))
    if patient_id:
        query = query.where(_wildcard(Study.patient_id, patient_id))
    if accession_number:
        query = query.where(_wildcard(Study.accession_number, accession_number))
    if study_date:
        clause = _date_range(Study.study_date, study_date)
        query = query.where(*clause) if isinstance(clause, list) else query.where(clause)
    if modalities:
        wanted = set(modalities)
        kinds = [str(kind) for kind, modality in RESULT_MODALITY.items() if modality in wanted]
        with_instances = select(Instance.study_id).where(Instance.modality.in_(wanted))
        with_results = select(ResultObject.study_id).where(ResultObject.kind.in_(kinds),
                                                           ResultObject.superseded_at.is_(None))
        query = query.where(or_(Study.id.in_(with_instances), Study.id.in_(with_results)))
    return list(session.scalars(query.order_by(Study.received_at, Study.id)))


# --- DICOM JSON -------------------------------------------------------------------------------------


def parse_includefield(values: list[str] | None) -> tuple[bool, list[int]]:
    """``includefield``: ``all`` or keywords / hexadecimal tags, repeated or comma-separated."""
    include_all, tags = False, []
    for value in values or []:
        for part in filter(None, (p.strip() for p in value.split(","))):
            if part == "all":
                include_all = True
                continue
            tag = tag_for_keyword(part)
            if tag is None and re.fullmatch(r"[0-9A-Fa-f]{8}", part):
                tag = int(part, 16)
            if tag is None:
                raise QueryError(f"includefield {part!r} is neither 'all', a DICOM keyword nor a tag (ggggeeee)")
            tags.append(tag)
    return include_all, tags


def header(obj: DicomObject, tags: list[int] | None = None) -> Dataset:
    """A stored object's header (no pixel data); only ``tags`` when given."""
    with obj.open() as handle:
        return pydicom.dcmread(handle, stop_before_pixels=True, specific_tags=tags, force=True)


def copy_from_header(target: Dataset, obj: DicomObject, tags: list[int]) -> None:
    """Copy ``tags`` from the stored object into ``target`` (those it has; sequences and bulk data too)."""
    if not tags:
        return
    try:
        source = header(obj, tags)
    except (OSError, pydicom.errors.InvalidDicomError):
        return
    for tag in tags:
        if tag in source and tag not in target:
            target[tag] = source[tag]


#: What ``includefield=all`` adds at each level, read from a stored header.
ALL_FIELDS = {
    "study": ["StudyTime", "StudyID", "ReferringPhysicianName", "PatientBirthDate", "PatientSex", "PatientAge"],
    "series": ["SeriesDescription", "SeriesDate", "BodyPartExamined", "Manufacturer"],
    "instance": ["Rows", "Columns", "ContentDate", "ContentTime", "ImageType", "ViewPosition",
                 "PhotometricInterpretation", "NumberOfFrames"],
}


def extra_tags(level: str, include_all: bool, tags: list[int]) -> list[int]:
    wanted = list(tags)
    if include_all:
        wanted += [tag_for_keyword(k) for k in ALL_FIELDS[level]]
    return list(dict.fromkeys(wanted))


def study_dataset(study: Study, objs: list[DicomObject], base_url: str, tags: list[int]) -> Dataset:
    ds = Dataset()
    ds.StudyInstanceUID = study.study_instance_uid
    ds.StudyDate = study.study_date or None
    ds.AccessionNumber = study.accession_number or None
    ds.PatientID = study.patient_id or None
    ds.PatientName = study.patient_name or None
    ds.StudyDescription = study.study_description or None
    ds.ModalitiesInStudy = sorted({o.modality for o in objs if o.modality}) or None
    ds.NumberOfStudyRelatedSeries = len({o.series_instance_uid for o in objs})
    ds.NumberOfStudyRelatedInstances = len(objs)
    ds.RetrieveURL = f"{base_url}/studies/{study.study_instance_uid}"
    if objs:
        copy_from_header(ds, objs[0], tags)
    return ds


def series_datasets(objs: list[DicomObject], base_url: str, tags: list[int]) -> list[Dataset]:
    grouped: dict[tuple[str, str], list[DicomObject]] = defaultdict(list)
    for obj in objs:
        grouped[(obj.study.study_instance_uid, obj.series_instance_uid)].append(obj)
    out = []
    for (study_uid, series_uid), members in grouped.items():
        ds = Dataset()
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.Modality = members[0].modality or None
        ds.NumberOfSeriesRelatedInstances = len(members)
        ds.RetrieveURL = f"{base_url}/studies/{study_uid}/series/{series_uid}"
        copy_from_header(ds, members[0], [tag_for_keyword("SeriesNumber"), *tags])
        out.append(ds)
    return out


def instance_dataset(obj: DicomObject, base_url: str, tags: list[int]) -> Dataset:
    ds = Dataset()
    ds.StudyInstanceUID = obj.study.study_instance_uid
    ds.SeriesInstanceUID = obj.series_instance_uid
    ds.SOPInstanceUID = obj.sop_instance_uid
    ds.SOPClassUID = obj.sop_class_uid
    ds.Modality = obj.modality or None
    ds.RetrieveURL = (f"{base_url}/studies/{obj.study.study_instance_uid}/series/{obj.series_instance_uid}"
                      f"/instances/{obj.sop_instance_uid}")
    copy_from_header(ds, obj, [tag_for_keyword("InstanceNumber"), *tags])
    return ds


def to_json(ds: Dataset) -> dict:
    """The DICOM JSON model (PS3.18 F.2) of ``ds``, empty attributes left out; binary values inline."""
    for element in list(ds):
        if element.value is None or element.value == "" or element.value == []:
            del ds[element.tag]
    return ds.to_json_dict(bulk_data_threshold=1 << 30)


def keyword(tag: int) -> str:
    return keyword_for_tag(tag) or f"{tag:08X}"
