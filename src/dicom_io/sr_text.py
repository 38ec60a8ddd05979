"""A Structured Report's content tree in words (PS3.3 C.17.3), for people who have no SR viewer.

Reads any SR document (ours or another's), never writes one: each content item becomes its
relationship, value type, concept name and a readable value (a code's meaning, a number with
its UCUM unit, a text, a UID, a referenced image), and the tree can be printed indented, much as
dcmtk's ``dsrdump`` does.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from pydicom.dataset import Dataset

__all__ = ["ContentItem", "SrDocument", "read_sr", "as_text"]

#: Nesting deeper than any template we know of: a cycle-free but hostile file stops here.
MAX_DEPTH = 64


@dataclass(frozen=True)
class ContentItem:
    relationship: str
    value_type: str
    name: str
    code: str
    value: str
    children: tuple["ContentItem", ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class SrDocument:
    sop_instance_uid: str
    series_instance_uid: str
    title: str
    completion_flag: str
    verification_flag: str
    content_datetime: str
    root: ContentItem


def _code(item: Dataset | None) -> tuple[str, str]:
    """(meaning, "(value, scheme)") of a code sequence item."""
    if item is None:
        return "", ""
    value = item.get("CodeValue") or item.get("LongCodeValue") or item.get("URNCodeValue") or ""
    scheme = item.get("CodingSchemeDesignator", "")
    return str(item.get("CodeMeaning", "")), f"({value}, {scheme})" if value or scheme else ""


def _first(ds: Dataset, keyword: str) -> Dataset | None:
    seq = ds.get(keyword)
    return seq[0] if seq else None


def _number(ds: Dataset) -> str:
    measured = _first(ds, "MeasuredValueSequence")
    if measured is None:
        qualifier = _code(_first(ds, "NumericValueQualifierCodeSequence"))[0]
        return f"no value ({qualifier})" if qualifier else "no value"
    number = str(measured.get("NumericValue", "")).strip()
    unit = _first(measured, "MeasurementUnitsCodeSequence")
    if unit is None:
        return number
    ucum = str(unit.get("CodeValue", ""))
    meaning = str(unit.get("CodeMeaning", ""))
    if ucum in ("1", "{ratio}") or not ucum:
        return f"{number} ({meaning})" if meaning and meaning not in ("no units", "1") else number
    return f"{number} {ucum}"


def _reference(ds: Dataset) -> str:
    referenced = _first(ds, "ReferencedSOPSequence")
    if referenced is None:
        return ""
    text = f"SOP Instance {referenced.get('ReferencedSOPInstanceUID', '')}"
    frames = referenced.get("ReferencedFrameNumber")
    if frames is not None:
        text += f" frame {frames}"
    return text


def _value(ds: Dataset) -> str:
    kind = str(ds.get("ValueType", ""))
    if kind == "CODE":
        meaning, code = _code(_first(ds, "ConceptCodeSequence"))
        return f"{meaning} {code}".strip()
    if kind == "NUM":
        return _number(ds)
    if kind == "TEXT":
        return str(ds.get("TextValue", ""))
    if kind == "UIDREF":
        return str(ds.get("UID", ""))
    if kind == "PNAME":
        return str(ds.get("PersonName", ""))
    if kind == "DATE":
        return str(ds.get("Date", ""))
    if kind == "TIME":
        return str(ds.get("Time", ""))
    if kind == "DATETIME":
        return str(ds.get("DateTime", ""))
    if kind in ("IMAGE", "COMPOSITE", "WAVEFORM"):
        return _reference(ds)
    if kind in ("SCOORD", "SCOORD3D"):
        return f"{ds.get('GraphicType', '')} {list(ds.get('GraphicData', []))[:8]}".strip()
    if kind == "TCOORD":
        return str(ds.get("TemporalRangeType", ""))
    return ""


def _item(ds: Dataset, relationship: str, depth: int) -> ContentItem:
    name, code = _code(_first(ds, "ConceptNameCodeSequence"))
    children: tuple[ContentItem, ...] = ()
    if depth < MAX_DEPTH:
        children = tuple(_item(child, str(child.get("RelationshipType", "")), depth + 1)
                         for child in ds.get("ContentSequence", []))
    elif ds.get("ContentSequence"):
        children = (ContentItem("", "", "(nested too deeply: not shown)", "", ""),)
    return ContentItem(relationship, str(ds.get("ValueType", "")), name, code, _value(ds), children)


def read_sr(ds: Dataset) -> SrDocument:
    """The document's header and content tree; raises ``ValueError`` for a dataset that is no SR."""
    if ds.get("ValueType") != "CONTAINER" or "ContentSequence" not in ds:
        raise ValueError("not a structured report: no root CONTAINER with a content sequence")
    root = _item(ds, "", 0)
    datetime_text = f"{ds.get('ContentDate', '')} {ds.get('ContentTime', '')}".strip()
    return SrDocument(
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
        title=root.name,
        completion_flag=str(ds.get("CompletionFlag", "")),
        verification_flag=str(ds.get("VerificationFlag", "")),
        content_datetime=datetime_text,
        root=root,
    )


def _lines(item: ContentItem, depth: int) -> Iterator[str]:
    relationship = f"{item.relationship}: " if item.relationship else ""
    value = f" = {item.value}" if item.value else ""
    yield f"{'  ' * depth}{relationship}{item.value_type} {item.name}{value}".rstrip()
    for child in item.children:
        yield from _lines(child, depth + 1)


def as_text(document: SrDocument) -> str:
    """The tree as indented lines: ``CONTAINS: NUM Probability = 0.72 1``-style, one item per line."""
    header = [f"{document.title}", f"Completion: {document.completion_flag}   Verification: "
              f"{document.verification_flag}   Content date/time: {document.content_datetime}", ""]
    return "\n".join([*header, *_lines(document.root, 0)]) + "\n"
