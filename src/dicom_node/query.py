"""Query/Retrieve over what the node holds: received images and current result objects (Study Root).

`find` answers a C-FIND identifier at STUDY, SERIES or IMAGE level; `retrieve`
lists the files a C-GET or C-MOVE identifier selects. Both see the same set of
objects: every received instance and every result object that is not
superseded (`ResultObject.superseded_at` is null). The database narrows the
candidates (UIDs, patient, accession, date, modality of received images); the
matching rules of PS3.4 C.2.2.2 are then applied in Python to every key the
identifier gives a value for (single value, UID lists, wildcards * and ?, date
and time ranges; person names case-insensitively), and each response carries
exactly the keys asked for. Values the database does not hold (Study Time,
Series Number, ...) come from the header of a file of the study, series or
instance, so the answer is what a PACS holding these files would give.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator

from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from sqlalchemy import select

from triage_core.db import Database
from triage_core.models import Instance, ResultObject, Study
from triage_core.settings import Settings
from triage_core.storage import is_valid_uid

from .statuses import IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS

log = logging.getLogger(__name__)


class Level(StrEnum):
    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"


class QueryError(Exception):
    """An identifier this SCP cannot process; `status` is the DIMSE failure status to answer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason



_UNIQUE = {Level.STUDY: "StudyInstanceUID", Level.SERIES: "SeriesInstanceUID", Level.IMAGE: "SOPInstanceUID"}
#: Keys computed here rather than read from a file.
_COMPUTED = {"QueryRetrieveLevel", "RetrieveAETitle", "SpecificCharacterSet", "NumberOfStudyRelatedSeries",
             "NumberOfStudyRelatedInstances", "NumberOfSeriesRelatedInstances", "ModalitiesInStudy",
             "SOPClassesInStudy", "InstanceAvailability"}


@dataclass(frozen=True)
class StoredObject:
    """One object the node can serve."""

    study_id: int
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    #: Its storage key, in `store` (the instances' or the results' store: a directory or an S3 prefix).
    key: str
    #: Modality from the database (received images); empty for result objects (read from the file).
    modality: str
    #: "IMAGE" for a received instance, else the result kind (SR, HEATMAP, PARAMETRIC_MAP).
    kind: str
    #: Study-level columns for the database fallback.
    patient_id: str = ""
    patient_name: str = ""
    accession_number: str = ""
    study_date: str = ""
    study_description: str = ""
    store: Any = field(default=None, compare=False)

    def local(self):
        """A context manager giving a file path with the object's bytes (the file, or a local copy)."""
        return self.store.local_path(self.key)


def level_of(identifier: Dataset) -> Level:
    value = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    try:
        return Level(value)
    except ValueError:
        raise QueryError(IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
                         f"Query/Retrieve Level {value or '(none)'} is not STUDY, SERIES or IMAGE") from None


def _values(element: DataElement) -> list[str]:
    value = element.value
    if value is None:
        return []
    if isinstance(value, (list, tuple, MultiValue)):
        return [str(v) for v in value if str(v) != ""]
    text = str(value)
    if element.VR == "UI":
        return [part.strip() for part in text.split("\\") if part.strip()]
    return [text] if text != "" else []


def _uid_list(identifier: Dataset, keyword: str) -> list[str] | None:
    """The UIDs a key asks for (None: universal). Invalid UIDs are an error, never a file name."""
    if keyword not in identifier:
        return None
    uids = _values(identifier[keyword])
    if not uids or uids == ["*"]:  # "*" is no UID: some SCUs send it for "any"
        return None
    bad = [uid for uid in uids if not is_valid_uid(uid)]
    if bad:
        raise QueryError(IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, f"{keyword} holds an invalid UID")
    return uids


def _like(pattern: str) -> str:
    escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def _normalise_pn(text: str) -> str:
    return "=".join(group.rstrip("^ ") for group in text.split("=")).rstrip("=").upper()


def value_matches(vr: str, query: str, stored: str) -> bool:
    """One query value against one stored value (PS3.4 C.2.2.2.1-5)."""
    stored = stored.strip() if vr != "PN" else stored
    query = query.strip() if vr != "PN" else query
    if vr in ("DA", "TM", "DT") and "-" in query:
        low, _, high = query.partition("-")
        low, high = low.strip(), high.strip()
        if not stored:
            return False
        if low and stored[:len(low)] < low:
            return False
        if high and stored[:len(high)] > high:
            return False
        return True
    if vr == "PN":
        query, stored = _normalise_pn(query), _normalise_pn(stored)
    if vr not in ("UI", "DA", "TM", "DT") and ("*" in query or "?" in query):
        return fnmatch.fnmatchcase(stored, query.replace("[", "[[]"))
    return stored == query


def element_matches(element: DataElement, stored: DataElement | None) -> bool:
    """A key of the identifier against the stored attribute; empty keys and sequences match anything."""
    if element.VR == "SQ":
        return True
    wanted = _values(element)
    if not wanted:
        return True
    have = _values(stored) if stored is not None else []
    if not have:
        return False
    return any(value_matches(element.VR, query, value) for query in wanted for value in have)


@lru_cache(maxsize=4096)
def _header(path: Path, mtime_ns: int) -> Dataset:
    with open(path, "rb") as handle:
        return dcmread(handle, stop_before_pixels=True, force=True)


def read_header(path: Path) -> Dataset:
    """The header of a stored file (cached while the file is unchanged)."""
    return _header(path, path.stat().st_mtime_ns)


class Catalogue:
    """The objects the node serves, read from the database, and answers built from them."""

    def __init__(self, settings: Settings, database: Database) -> None:
        self.settings = settings
        self.database = database

    def objects(self, identifier: Dataset, level: Level) -> list[StoredObject]:
        """Candidates for `identifier`: everything the database can narrow down, in a stable order."""
        study_filters = []
        for keyword, column in (("StudyInstanceUID", Study.study_instance_uid),):
            uids = _uid_list(identifier, keyword)
            if uids is not None:
                study_filters.append(column.in_(uids))
        for keyword, column, case_insensitive in (
            ("PatientID", Study.patient_id, False),
            ("AccessionNumber", Study.accession_number, False),
            ("PatientName", Study.patient_name, True),
        ):
            if keyword in identifier:
                wanted = _values(identifier[keyword])
                if len(wanted) == 1 and wanted[0] not in ("*",):
                    pattern = wanted[0]
                    if case_insensitive:
                        # Stored names are decoded text; the final match (PN rules) is done in Python.
                        # SQLite folds only ASCII case: a non-ASCII pattern is left to Python alone.
                        core = pattern.split("=")[0].rstrip("^ ")
                        if core.isascii():
                            study_filters.append(column.ilike(_like(core) + "%", escape="\\"))
                    elif "*" in pattern or "?" in pattern:
                        study_filters.append(column.like(_like(pattern), escape="\\"))
                    else:
                        study_filters.append(column == pattern.strip())
        if "StudyDate" in identifier:
            wanted = _values(identifier["StudyDate"])
            if len(wanted) == 1:
                low, dash, high = wanted[0].partition("-")
                if dash:
                    if low.strip():
                        study_filters.append(Study.study_date >= low.strip())
                    if high.strip():
                        study_filters.append(Study.study_date <= high.strip())
                else:
                    study_filters.append(Study.study_date == wanted[0].strip())
        series_uids = _uid_list(identifier, "SeriesInstanceUID") if level is not Level.STUDY else None
        sop_uids = _uid_list(identifier, "SOPInstanceUID") if level is Level.IMAGE else None
        sop_classes = _uid_list(identifier, "SOPClassUID") if level is Level.IMAGE else None

        study_columns = (Study.id, Study.study_instance_uid, Study.patient_id, Study.patient_name,
                         Study.accession_number, Study.study_date, Study.study_description)
        found: list[StoredObject] = []
        with self.database.session() as session:
            images = select(*study_columns, Instance.series_instance_uid, Instance.sop_instance_uid,
                            Instance.sop_class_uid, Instance.path, Instance.modality, Instance.id) \
                .join(Instance, Instance.study_id == Study.id).where(*study_filters)
            results = select(*study_columns, ResultObject.series_instance_uid, ResultObject.sop_instance_uid,
                             ResultObject.sop_class_uid, ResultObject.path, ResultObject.kind, ResultObject.id) \
                .join(ResultObject, ResultObject.study_id == Study.id) \
                .where(ResultObject.superseded_at.is_(None), *study_filters)
            if series_uids is not None:
                images = images.where(Instance.series_instance_uid.in_(series_uids))
                results = results.where(ResultObject.series_instance_uid.in_(series_uids))
            if sop_uids is not None:
                images = images.where(Instance.sop_instance_uid.in_(sop_uids))
                results = results.where(ResultObject.sop_instance_uid.in_(sop_uids))
            if sop_classes is not None:
                images = images.where(Instance.sop_class_uid.in_(sop_classes))
                results = results.where(ResultObject.sop_class_uid.in_(sop_classes))
            modality = _values(identifier["Modality"]) if level is not Level.STUDY and "Modality" in identifier else []
            if len(modality) == 1 and "*" not in modality[0] and "?" not in modality[0]:
                # Result objects have no modality column: their files are matched in Python.
                images = images.where(Instance.modality == modality[0].strip())
            storage = self.settings.storage
            for row in session.execute(images.order_by(Study.id, Instance.id)):
                found.append(StoredObject(row[0], row[1], row[7], row[8], row[9], row[10], row[11], "IMAGE",
                                          *row[2:7], store=storage.instances))
            for row in session.execute(results.order_by(Study.id, ResultObject.id)):
                found.append(StoredObject(row[0], row[1], row[7], row[8], row[9], row[10], "", row[11],
                                          *row[2:7], store=storage.results))
        found.sort(key=lambda o: (o.study_id, o.kind != "IMAGE", o.series_instance_uid))
        return [o for o in found if self._inside(o)]

    @staticmethod
    def _inside(stored: StoredObject) -> bool:
        """Keys come from the database; serve nothing outside the store's directory or prefix."""
        try:
            stored.store.check_key(stored.key)
        except FileNotFoundError:
            log.error("stored key of %s leaves its store; not served", stored.sop_instance_uid)
            return False
        return True

    # --- C-FIND ---------------------------------------------------------------------------------------

    def find(self, identifier: Dataset, *, retrieve_ae_title: str) -> Iterator[Dataset]:
        """C-FIND responses (Study Root) for `identifier`, one per matching study, series or instance."""
        level = level_of(identifier)
        objects = self.objects(identifier, level)
        for group in _groups(objects, level):
            response = self._response(identifier, level, group, retrieve_ae_title)
            if response is not None:
                yield response

    def _response(self, identifier: Dataset, level: Level, group: list[StoredObject],
                  retrieve_ae_title: str) -> Dataset | None:
        first = group[0]
        try:
            with first.local() as path:
                header = read_header(path)
        except Exception as exc:  # a file that went missing or cannot be read: skip it, say so
            log.error("stored object %s cannot be read for C-FIND: %s", first.sop_instance_uid, exc)
            return None
        computed = self._computed(level, group, header, retrieve_ae_title)
        response = Dataset()
        for element in identifier:
            keyword = element.keyword
            if element.tag.group == 0x0002 or not keyword:
                continue
            if keyword in computed:
                stored = computed[keyword]
            else:
                stored = self._stored(keyword, first, header)
            if keyword not in ("QueryRetrieveLevel", "SpecificCharacterSet") and not element_matches(element, stored):
                return None
            if element.VR == "SQ":
                response.add_new(element.tag, "SQ", [])
            elif stored is not None:
                response.add_new(element.tag, element.VR, stored.value)
            else:
                response.add_new(element.tag, element.VR, None)
        # The mandatory part of every response (PS3.4 C.4.1.2.3).
        response.QueryRetrieveLevel = level.value
        response.RetrieveAETitle = retrieve_ae_title
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")[:list(Level).index(level) + 1]:
            response.add_new(_tag(keyword), "UI", getattr(first, _attr(keyword)))
        if "SpecificCharacterSet" in header:
            response.SpecificCharacterSet = header.SpecificCharacterSet
        elif "SpecificCharacterSet" in response:
            del response.SpecificCharacterSet
        return response

    def _computed(self, level: Level, group: list[StoredObject], header: Dataset,
                  retrieve_ae_title: str) -> dict[str, DataElement]:
        values: dict[str, DataElement] = {
            "QueryRetrieveLevel": DataElement(0x00080052, "CS", level.value),
            "RetrieveAETitle": DataElement(0x00080054, "AE", retrieve_ae_title),
            "InstanceAvailability": DataElement(0x00080056, "CS", "ONLINE"),
        }
        if level is Level.STUDY:
            series = {o.series_instance_uid for o in group}
            modalities = sorted({self._modality(o) for o in group} - {""})
            values["NumberOfStudyRelatedSeries"] = DataElement(0x00201206, "IS", len(series))
            values["NumberOfStudyRelatedInstances"] = DataElement(0x00201208, "IS", len(group))
            values["ModalitiesInStudy"] = DataElement(0x00080061, "CS", modalities)
            values["SOPClassesInStudy"] = DataElement(0x00080062, "UI", sorted({o.sop_class_uid for o in group}))
        elif level is Level.SERIES:
            values["NumberOfSeriesRelatedInstances"] = DataElement(0x00201209, "IS", len(group))
        return values

    def _modality(self, stored: StoredObject) -> str:
        if stored.modality:
            return stored.modality
        try:
            with stored.local() as path:
                return str(read_header(path).get("Modality", "") or "")
        except Exception:
            return ""

    @staticmethod
    def _stored(keyword: str, first: StoredObject, header: Dataset) -> DataElement | None:
        if keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
            return DataElement(_tag(keyword), "UI", getattr(first, _attr(keyword)))
        if keyword in header:
            return header[keyword]
        fallback = {"PatientID": ("LO", first.patient_id), "PatientName": ("PN", first.patient_name),
                    "AccessionNumber": ("SH", first.accession_number), "StudyDate": ("DA", first.study_date),
                    "StudyDescription": ("LO", first.study_description)}
        if keyword in fallback and fallback[keyword][1]:
            vr, value = fallback[keyword]
            return DataElement(_tag(keyword), vr, value)
        if keyword == "Modality" and first.modality:
            return DataElement(_tag(keyword), "CS", first.modality)
        return None

    # --- C-GET / C-MOVE -------------------------------------------------------------------------------

    def retrieve(self, identifier: Dataset) -> list[StoredObject]:
        """The objects a C-GET or C-MOVE identifier selects (unique keys at and above its level)."""
        level = level_of(identifier)
        needed = [_UNIQUE[lv] for lv in list(Level)[:list(Level).index(level) + 1]]
        if _uid_list(identifier, _UNIQUE[level]) is None:
            raise QueryError(IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
                             f"a {level.value} level retrieve needs {_UNIQUE[level]} (PS3.4 C.4.2.2.1)")
        objects = self.objects(identifier, level)
        wanted = {keyword: _uid_list(identifier, keyword) for keyword in needed}
        return [o for o in objects
                if all(uids is None or getattr(o, _attr(keyword)) in uids for keyword, uids in wanted.items())]


def _attr(keyword: str) -> str:
    return {"StudyInstanceUID": "study_instance_uid", "SeriesInstanceUID": "series_instance_uid",
            "SOPInstanceUID": "sop_instance_uid", "SOPClassUID": "sop_class_uid"}[keyword]


def _tag(keyword: str) -> int:
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(keyword)
    return tag


def _groups(objects: Iterable[StoredObject], level: Level) -> Iterator[list[StoredObject]]:
    groups: dict[tuple[str, ...], list[StoredObject]] = {}
    for stored in objects:
        if level is Level.STUDY:
            key: tuple[str, ...] = (stored.study_instance_uid,)
        elif level is Level.SERIES:
            key = (stored.study_instance_uid, stored.series_instance_uid)
        else:
            key = (stored.study_instance_uid, stored.series_instance_uid, stored.sop_instance_uid)
        groups.setdefault(key, []).append(stored)
    yield from groups.values()
