"""The SR template cache: the parts of our TID 1500 tree that depend only on the model, built once.

A highdicom SR with 14 measurement groups costs about a quarter of a second
to build here (highdicom deep-copies and re-parses the whole content tree)
and tens of milliseconds to encode (pydicom walks some 2,000 elements). The
parts that depend only on the model are therefore built by highdicom once
per model (`SRTemplate`): the observation context, the disclaimer and, per
finding, threshold and present/absent, the whole TID 1501 measurement group,
which is kept encoded with the byte spans of its per-study values
(`_EncodedItem`). Per study, highdicom still makes the document (header,
evidence, Image Library), and the study's values are spliced into the
encoded groups, each value encoded by pydicom's own writer.

This is the one seam below highdicom: `sr.build_sr(..., cached=False)` makes
the same document with highdicom alone, and a test compares the two element
for element on every test radiograph.
"""

from __future__ import annotations

import pickle
import threading
from collections.abc import Iterator, Mapping, Sequence

import pydicom
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_dataset
from pydicom.tag import BaseTag
from pydicom.valuerep import DS

from triage_core.values import AlgorithmInfo, FindingResult

from .sr_content import GroupValues, disclaimer_container, group_values, measurement_group, measurement_report

__all__ = ["SRTemplate", "mark_explicit_little_endian"]

# Placeholders in the template groups, replaced per study. Valid for their VR
# (UIDs under the 2.25 root that no real object uses) and unique in the tree.
_PH_SOP_CLASS = "2.25.1000000000000000000000000000000001"
_PH_SOP_INSTANCE = "2.25.1000000000000000000000000000000002"
_PH_TRACKING_UID = "2.25.1000000000000000000000000000000003"
_PH_TRACKING_ID = "cxr-triage-placeholder-tracking-identifier"
_PH_PROBABILITY = 0.5
_PLACEHOLDER_VALUES = GroupValues(_PH_SOP_CLASS, _PH_SOP_INSTANCE, _PH_TRACKING_UID, _PH_TRACKING_ID, _PH_PROBABILITY)


def _placeholder_group(algorithm: AlgorithmInfo, name: str, threshold: float, present: bool):
    """The TID 1501 group of finding `name` with placeholders for the study's values."""
    return measurement_group(algorithm, name, threshold, present, _PLACEHOLDER_VALUES)


_FLOATING_POINT_VALUE = 0x0040A161
_NUMERIC_VALUE = 0x0040A30A


class SRTemplate:
    """The parts of our TID 1500 content tree that depend only on the model.

    Built by highdicom from a placeholder source image, once per model (and
    per finding, threshold and present/absent, when first seen; cached per
    process for the newest few models). `root`, `context`, `measurements`
    and `disclaimer` return fresh copies with the study's values in place of
    the placeholders, so documents never share items. `measurements` splices
    the values into encoded groups (`_EncodedItem`); for a model identity
    that is not ASCII it copies dataset groups (`group`) instead.
    """

    _cache: dict[tuple, "SRTemplate"] = {}
    _lock = threading.Lock()

    def __init__(self, algorithm: AlgorithmInfo) -> None:
        self.algorithm = algorithm
        self._groups: dict[tuple[str, float, bool], _Frozen] = {}
        self._encoded: dict[tuple[str, float, bool], _EncodedItem] = {}
        self._ascii = all(
            text.isascii()
            for text in (algorithm.name, algorithm.version, algorithm.manufacturer,
                         *algorithm.parameters.keys(), *algorithm.parameters.values())
        )
        report = measurement_report(algorithm, [_placeholder_group(algorithm, "Atelectasis", 0.5, True)])
        items = list(report.ContentSequence)
        # language, observer context, procedure reported | Imaging Measurements
        self._context = [_Frozen(item) for item in items[:-1]]
        self._root = _Frozen(_without_content(report))
        self._measurements = _Frozen(_without_content(items[-1]))
        self._disclaimer = _Frozen(disclaimer_container(algorithm))

    @classmethod
    def for_algorithm(cls, algorithm: AlgorithmInfo) -> "SRTemplate":
        key = (
            algorithm.name, algorithm.version, algorithm.weights_sha256, algorithm.demo,
            algorithm.manufacturer, tuple(sorted(algorithm.parameters.items())),
        )
        with cls._lock:
            template = cls._cache.get(key)
            if template is None:
                if len(cls._cache) >= 8:  # models change rarely; keep the newest few
                    cls._cache.pop(next(iter(cls._cache)))
                template = cls._cache[key] = cls(algorithm)
        return template

    def root(self, library: Sequence[pydicom.Dataset]) -> pydicom.Dataset:
        """The root container (TID 1500) with `library` as its content."""
        root = self._root.copy()
        root.ContentSequence = list(library)
        return root

    def context(self) -> list[pydicom.Dataset]:
        """Language, observation context (device observer) and procedure reported (TID 1500 rows 2-5)."""
        return [item.copy() for item in self._context]

    def measurements(self, findings: Sequence[tuple[pydicom.Dataset, FindingResult]]) -> pydicom.Dataset:
        """The Imaging Measurements container with one TID 1501 group per (source, finding).

        Its Content Sequence is kept encoded (a raw element, explicit VR
        little endian, undefined lengths): pydicom writes it as it is and
        decodes it when read, so the dataset reads like any other. Only for
        ASCII model identities: other text would need the document's
        character set, and then the groups are copied as datasets.
        """
        container = self._measurements.copy()
        if not self._ascii:
            container.ContentSequence = [self.group(source, finding) for source, finding in findings]
            return container
        encoded = b"".join(self._encoded_group(source, finding) for source, finding in findings)
        container[_CONTENT_SEQUENCE] = RawDataElement(
            BaseTag(_CONTENT_SEQUENCE), "SQ", 0xFFFFFFFF, encoded, 0, False, True
        )
        return container

    def _encoded_group(self, source: pydicom.Dataset, finding: FindingResult) -> bytes:
        key, (sop_class, sop_instance, tracking_uid, tracking_id, fp, ds) = self._group_values(source, finding)
        template = self._encoded.get(key)
        if template is None:
            template = self._encoded[key] = _EncodedItem(_placeholder_group(self.algorithm, *key)[0])
        return template.encode(
            {
                _REFERENCED_SOP_CLASS_UID: sop_class,
                _REFERENCED_SOP_INSTANCE_UID: sop_instance,
                _UID: tracking_uid,
                _TEXT_VALUE: tracking_id,
                _FLOATING_POINT_VALUE: fp,
                _NUMERIC_VALUE: ds,
            }
        )

    def disclaimer(self) -> pydicom.Dataset:
        return self._disclaimer.copy()

    def group(self, source: pydicom.Dataset, finding: FindingResult) -> pydicom.Dataset:
        """The TID 1501 group of `finding` on `source`."""
        key, (sop_class, sop_instance, tracking_uid, tracking_id, fp, ds) = self._group_values(source, finding)
        template = self._groups.get(key)
        if template is None:
            template = self._groups[key] = _Frozen(_placeholder_group(self.algorithm, *key)[0])
        return template.copy(
            {
                _PH_SOP_CLASS: sop_class,
                _PH_SOP_INSTANCE: sop_instance,
                _PH_TRACKING_UID: tracking_uid,
                _PH_TRACKING_ID: tracking_id,
                _FLOATING_POINT_VALUE: fp,
                _NUMERIC_VALUE: ds,
            }
        )

    def _group_values(self, source: pydicom.Dataset, finding: FindingResult
                      ) -> tuple[tuple[str, float, bool], tuple[str, str, str, str, float, DS]]:
        """The template key (finding, threshold, present) and the per-study values of a group: referenced SOP
        class and instance, tracking UID and identifier, probability as FD and as DS."""
        key = (finding.finding, float(finding.threshold), bool(finding.present))
        values = group_values(source, finding, self.algorithm)
        return key, (
            values.sop_class_uid,
            values.sop_instance_uid,
            values.tracking_uid,
            values.tracking_identifier,
            values.probability,
            DS(values.probability, auto_format=True),
        )

_CONTENT_SEQUENCE = 0x0040A730
_REFERENCED_SOP_CLASS_UID = 0x00081150
_REFERENCED_SOP_INSTANCE_UID = 0x00081155
_UID = 0x0040A124
_TEXT_VALUE = 0x0040A160
#: (tag, VR, placeholder value) of every element `_EncodedItem` replaces.
_PLACEHOLDER_ELEMENTS = (
    (_REFERENCED_SOP_CLASS_UID, "UI", _PH_SOP_CLASS),
    (_REFERENCED_SOP_INSTANCE_UID, "UI", _PH_SOP_INSTANCE),
    (_UID, "UI", _PH_TRACKING_UID),
    (_TEXT_VALUE, "UT", _PH_TRACKING_ID),
    (_FLOATING_POINT_VALUE, "FD", _PH_PROBABILITY),
    (_NUMERIC_VALUE, "DS", DS(_PH_PROBABILITY, auto_format=True)),
)
_PLACEHOLDERS = frozenset({_PH_SOP_CLASS, _PH_SOP_INSTANCE, _PH_TRACKING_UID, _PH_TRACKING_ID})
_PLACEHOLDER_TAGS = frozenset({_FLOATING_POINT_VALUE, _NUMERIC_VALUE})


class _Frozen:
    """A content item tree kept as a pickle, with the places of its placeholders.

    `copy` unpickles a fresh tree (in C: several times faster than copying
    it element by element, and far faster than `copy.deepcopy`) and puts
    the given values at those places.
    """

    def __init__(self, item: pydicom.Dataset) -> None:
        mark_explicit_little_endian(item)
        self._blob = pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
        self._places = list(_placeholder_places(item, ()))

    def copy(self, values: Mapping[object, object] | None = None) -> pydicom.Dataset:
        item = pickle.loads(self._blob)  # our own bytes, made in this process
        for path, tag, key in self._places:
            target = item
            for sequence_tag, index in path:
                target = target[sequence_tag].value[index]
            if values is None or key not in values:
                raise ValueError(f"no value for placeholder {key!r}")
            target[tag].value = values[key]
        return item


class _EncodedItem:
    """A content item encoded once as a sequence item (explicit VR little
    endian, undefined lengths, so no enclosing length depends on a value),
    with the byte spans of its placeholder elements.

    `encode` splices in the study's elements, each encoded by pydicom's own
    writer: the bytes are those pydicom would write for the same tree, made
    in microseconds rather than the milliseconds of walking 130 elements.
    """

    def __init__(self, item: pydicom.Dataset) -> None:
        _set_undefined_lengths(item)
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_dataset(fp, item)
        self._bytes = _ITEM + fp.getvalue() + _ITEM_DELIMITER
        spans = []
        for tag, vr, value in _PLACEHOLDER_ELEMENTS:
            pattern = _encode_element(tag, vr, value)
            start = self._bytes.find(pattern)
            while start >= 0:
                spans.append((start, start + len(pattern), tag, vr))
                start = self._bytes.find(pattern, start + len(pattern))
        self._spans = sorted(spans)
        found = {tag for _, _, tag, _ in spans}
        if found != {tag for tag, _, _ in _PLACEHOLDER_ELEMENTS}:
            raise RuntimeError("SR template: a placeholder element was not found in the encoded group")

    def encode(self, values: Mapping[int, object]) -> bytes:
        parts, last = [], 0
        for start, end, tag, vr in self._spans:
            parts.append(self._bytes[last:start])
            parts.append(_encode_element(tag, vr, values[tag]))
            last = end
        parts.append(self._bytes[last:])
        return b"".join(parts)


_ITEM = b"\xfe\xff\x00\xe0\xff\xff\xff\xff"  # (FFFE,E000), undefined length
_ITEM_DELIMITER = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"  # (FFFE,E00D), length 0


def _encode_element(tag: int, vr: str, value: object) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_data_element(fp, DataElement(tag, vr, value))
    return fp.getvalue()


def _set_undefined_lengths(item: pydicom.Dataset) -> None:
    item.is_undefined_length_sequence_item = True
    for element in item:
        if element.VR == "SQ":
            element.is_undefined_length = True
            for child in element.value:
                _set_undefined_lengths(child)


def mark_explicit_little_endian(item: pydicom.Dataset) -> None:
    """Record explicit VR little endian (what we write) as the items' encoding.

    pydicom's writer otherwise runs its ambiguous-VR correction over each
    item's whole subtree again for every nested item (quadratic in depth;
    a fifth of the SR's encode time). Our content items hold no ambiguous
    VR and no raw elements, so the correction has nothing to do; where the
    character set differs at write time pydicom still runs it.
    """
    item.set_original_encoding(False, True, item._character_set)
    for element in item.elements():  # raw elements stay raw
        if element.VR == "SQ" and not element.is_raw:
            for child in element.value:
                mark_explicit_little_endian(child)


def _placeholder_places(
    item: pydicom.Dataset, path: tuple[tuple[int, int], ...]
) -> Iterator[tuple[tuple[tuple[int, int], ...], int, object]]:
    for element in item:
        if element.VR == "SQ":
            for index, child in enumerate(element.value):
                yield from _placeholder_places(child, (*path, (int(element.tag), index)))
        elif element.tag in _PLACEHOLDER_TAGS:
            yield path, int(element.tag), int(element.tag)
        elif isinstance(element.value, str) and element.value in _PLACEHOLDERS:
            yield path, int(element.tag), str(element.value)


def _without_content(item: pydicom.Dataset) -> pydicom.Dataset:
    """A copy of a container content item without its Content Sequence."""
    out = pydicom.Dataset()
    for element in item:
        if element.keyword != "ContentSequence":
            out.add(element)
    return out


