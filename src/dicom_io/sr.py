"""Model results as DICOM: a TID 1500 Structured Report, heatmap images and parametric maps.

Everything is encoded by highdicom (house rule 4):

* `build_sr`: Comprehensive 3D SR, PS3.16 TID 1500 "Imaging Measurement
  Report", one TID 1501 measurement group per finding per image (tracking
  identifier and UID, finding, probability as NUM, present/absent at the
  operating threshold, TID 4019 algorithm identification with the threshold
  as a parameter, source image reference), IHE AI Results (AIR) Contributing
  Equipment, VerificationFlag UNVERIFIED.
* `build_heatmaps`: RGB Secondary Capture images: the radiograph with the
  class activation map in a perceptual colour map and a burned-in legend.
* `build_parametric_maps`: Parametric Map images of the float CAM on the
  source's pixel grid with a Real World Value Map, for viewers that overlay
  maps themselves.

All share the patient and study of their source images and go into new
series. Every UID is derived from the source, the model (name, version,
weights) and the kind of object (`result_uid`), so a retry or a re-run
replaces earlier results rather than adding duplicates.

Speed (bench/results_bench.py): a highdicom SR with 14 measurement groups
costs about a quarter of a second to build here (highdicom deep-copies and
re-parses the whole content tree) and tens of milliseconds to encode
(pydicom walks some 2,000 elements). The parts of the tree that depend only
on the model are therefore built by highdicom once per model (`_SRTemplate`):
the observation context, the disclaimer and, per finding, threshold and
present/absent, the whole TID 1501 measurement group, which is kept encoded
with the byte spans of its per-study values (`_EncodedItem`). Per study,
highdicom still makes the document (header, evidence, Image Library), and
the study's values are spliced into the encoded groups, each value encoded
by pydicom's own writer. dciodvfy, dsrdump and highdicom's reader check the
result in the tests.
"""

from __future__ import annotations

import pickle
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import pydicom
from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    Comprehensive3DSR,
    ContainerContentItem,
    DeviceObserverIdentifyingAttributes,
    ImageLibrary,
    LanguageOfContentItemAndDescendants,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForMeasurement,
    SourceImageForMeasurementGroup,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_dataset
from pydicom.sr.codedict import codes
from pydicom.tag import BaseTag
from pydicom.valuerep import DS, validate_value

from dicom_node import _sr_codes
from dicom_node._parametric_map import projection_parametric_map
from dicom_node._sr_heatmap import backdrop, render_on_backdrop
from triage_core.values import AlgorithmInfo, FindingResult, ImageResult

__all__ = [
    "HEATMAP_SERIES_NUMBER",
    "NOT_FOR_DIAGNOSTIC_USE",
    "PARAMETRIC_MAP_SERIES_NUMBER",
    "ResultObjects",
    "SR_SERIES_NUMBER",
    "build_heatmaps",
    "build_parametric_maps",
    "build_results",
    "build_sr",
    "device_uid",
    "result_uid",
]

SR_SERIES_NUMBER = 9901
HEATMAP_SERIES_NUMBER = 9902
PARAMETRIC_MAP_SERIES_NUMBER = 9903
NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE"
_DEMO_WARNING = "DEMO WEIGHTS - not trained on clinical data"
_SERIES_DESCRIPTION = "CXR Triage AI results - not for diagnostic use"

# Namespace of our name-based UUIDs (RFC 4122 version 5). A UUID written as
# "2.25.<its integer>" is a valid DICOM UID (PS3.5 B.2) that needs no
# registered organisation root; being name-based it is deterministic.
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:cxr-triage:dicom-result-uid")

# Patient and study attributes copied verbatim from the source (PS3.3 C.7.1.1
# Patient, C.7.2.1 General Study). highdicom copies most of them; copying them
# again keeps the set explicit and identical in the SR and the images.
_PATIENT_STUDY_KEYWORDS = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyID",
    "StudyDescription",
)


@dataclass(frozen=True)
class ResultObjects:
    """The result objects of one analysis: one SR, its heatmap images and parametric maps."""

    sr: pydicom.Dataset
    heatmaps: tuple[pydicom.Dataset, ...]
    #: The finding each heatmap shows, in the order of `heatmaps` (empty when not known).
    heatmap_findings: tuple[str, ...] = ()
    parametric_maps: tuple[pydicom.Dataset, ...] = ()
    #: The finding each parametric map holds, in the order of `parametric_maps`.
    parametric_map_findings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("heatmaps", "heatmap_findings", "parametric_maps", "parametric_map_findings"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.heatmap_findings and len(self.heatmap_findings) != len(self.heatmaps):
            raise ValueError("heatmap_findings must name one finding per heatmap")
        if len(self.parametric_map_findings) != len(self.parametric_maps):
            raise ValueError("parametric_map_findings must name one finding per parametric map")

    def __iter__(self) -> Iterator[pydicom.Dataset]:
        """SR first, then heatmaps, then parametric maps: the order to store and send."""
        yield self.sr
        yield from self.heatmaps
        yield from self.parametric_maps


def result_uid(source_sop_instance_uid: str, algorithm: AlgorithmInfo, kind: str) -> str:
    """A UID that is the same whenever the same model makes the same object.

    Derived (UUID version 5, written as ``2.25.<integer>``) from the source
    UID, the model's name, version and weights SHA-256, and `kind` (for
    example ``"sr"`` or ``"heatmap:Effusion"``). Different inputs give
    different UIDs; equal inputs give equal UIDs on any machine.
    """
    if not source_sop_instance_uid or not kind:
        raise ValueError("result_uid needs a source UID and a kind")
    name = "\x1f".join(
        (source_sop_instance_uid, algorithm.name, algorithm.version, algorithm.weights_sha256, kind)
    )
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


def device_uid(algorithm: AlgorithmInfo) -> str:
    """The UID of the model as a device: one per set of weights.

    Written as the Device Observer UID of the SR and the Device UID of the
    Contributing Equipment item; new weights make a new device.
    """
    name = "\x1f".join(("device", algorithm.name, algorithm.weights_sha256))
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


def build_sr(
    sources: Sequence[pydicom.Dataset], results: Sequence[ImageResult], algorithm: AlgorithmInfo
) -> pydicom.Dataset:
    """Encode the findings of one study as a TID 1500 Comprehensive 3D SR.

    Args:
        sources: the analysed images (headers suffice), all of one study.
        results: one `ImageResult` per source, matched by SOP Instance UID.
        algorithm: the model that produced the results.

    Returns:
        The SR as a pydicom dataset with its file meta information.

    Raises:
        ValueError: sources and results do not match, sources span studies,
            or a finding has no code.
    """
    pairs = _pair(sources, results)
    template = _SRTemplate.for_algorithm(algorithm)
    study_instance_uid = str(pairs[0][0].StudyInstanceUID)
    source_key = "\\".join(sorted(str(ds.SOPInstanceUID) for ds, _ in pairs))

    # Made by highdicom per study: the Image Library and the document around it
    # (given the root container with the library only: highdicom deep-copies
    # and re-parses what it is given, and needs the library to check the
    # evidence).
    root = template.root(ImageLibrary([_library_view(ds) for ds, _ in pairs]))
    document = Comprehensive3DSR(
        evidence=[_header_view(ds) for ds, _ in pairs],
        content=root,
        series_instance_uid=result_uid(study_instance_uid, algorithm, "sr-series"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=result_uid(source_key, algorithm, "sr"),
        instance_number=1,
        manufacturer=algorithm.manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=_series_description(algorithm),
        manufacturer_model_name=algorithm.name,
        software_versions=algorithm.version,
        contributing_equipment=[_contributing_equipment(algorithm)],
    )
    # From the model's template: the measurement groups, already encoded with
    # the study's values put in (see `_EncodedItem`), and the disclaimer
    # (TID 1500 rows 6 and 12).
    document.ContentSequence = [
        *template.context(),  # language, observer context, procedure reported
        *document.ContentSequence,  # the Image Library
        template.measurements([(source, finding) for source, result in pairs for finding in result.findings]),
        template.disclaimer(),
    ]

    # A plain dataset: highdicom's parsed view of the content (`.content`)
    # would describe only the part it was given.
    sr = pydicom.Dataset()
    sr.update(document)
    sr.file_meta = document.file_meta
    _copy_patient_and_study(pairs[0][0], sr)
    _mark_explicit_little_endian(sr)
    return sr


# Placeholders in the template groups, replaced per study. Valid for their VR
# (UIDs under the 2.25 root that no real object uses) and unique in the tree.
_PH_SOP_CLASS = "2.25.1000000000000000000000000000000001"
_PH_SOP_INSTANCE = "2.25.1000000000000000000000000000000002"
_PH_TRACKING_UID = "2.25.1000000000000000000000000000000003"
_PH_TRACKING_ID = "cxr-triage-placeholder-tracking-identifier"
_PH_PROBABILITY = 0.5
_FLOATING_POINT_VALUE = 0x0040A161
_NUMERIC_VALUE = 0x0040A30A


class _SRTemplate:
    """The parts of our TID 1500 content tree that depend only on the model.

    Built by highdicom from a placeholder source image, once per model (and
    per finding, threshold and present/absent, when first seen; cached per
    process for the newest few models). `root`, `context`, `measurements`
    and `disclaimer` return fresh copies with the study's values in place of
    the placeholders, so documents never share items. `measurements` splices
    the values into encoded groups (`_EncodedItem`); for a model identity
    that is not ASCII it copies dataset groups (`group`) instead.
    """

    _cache: dict[tuple, "_SRTemplate"] = {}
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
        observer = ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
                uid=device_uid(algorithm),
                name=algorithm.name,
                manufacturer_name=algorithm.manufacturer,
                model_name=f"{algorithm.name} {algorithm.version}",
            ),
        )
        report = MeasurementReport(
            observation_context=ObservationContext(observer_device_context=observer),
            procedure_reported=_sr_codes.PROCEDURE_CHEST_RADIOGRAPH,
            imaging_measurements=[_placeholder_group(algorithm, "Atelectasis", 0.5, True)],
            title=codes.DCM.ImagingMeasurementReport,
            language_of_content_item_and_descendants=LanguageOfContentItemAndDescendants(
                CodedConcept("en-US", "RFC5646", "English (United States)")
            ),
        )[0]
        items = list(report.ContentSequence)
        # language, observer context, procedure reported | Imaging Measurements
        self._context = [_Frozen(item) for item in items[:-1]]
        self._root = _Frozen(_without_content(report))
        self._measurements = _Frozen(_without_content(items[-1]))
        self._disclaimer = _Frozen(_disclaimer_container(algorithm))

    @classmethod
    def for_algorithm(cls, algorithm: AlgorithmInfo) -> "_SRTemplate":
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
        sop_instance_uid = str(source.SOPInstanceUID)
        probability = float(finding.probability)
        return key, (
            str(source.SOPClassUID),
            sop_instance_uid,
            result_uid(sop_instance_uid, self.algorithm, f"tracking:{finding.finding}"),
            f"{finding.finding} on image {sop_instance_uid}",
            probability,
            DS(probability, auto_format=True),
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
        _mark_explicit_little_endian(item)
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


def _mark_explicit_little_endian(item: pydicom.Dataset) -> None:
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
                _mark_explicit_little_endian(child)


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


def build_heatmaps(
    source: pydicom.Dataset,
    display: np.ndarray,
    result: ImageResult,
    cams: Mapping[str, np.ndarray],
    algorithm: AlgorithmInfo,
) -> list[pydicom.Dataset]:
    """RGB Secondary Capture overlays; see `_heatmaps_by_finding`."""
    return [image for _, image in _heatmaps_by_finding(source, display, result, cams, algorithm)]


def _shown_findings(
    source: pydicom.Dataset, result: ImageResult, cams: Mapping[str, np.ndarray], what: str
) -> tuple[tuple[FindingResult, ...], bool]:
    """The findings that get an image: the positive ones, else the most
    probable one as a summary (so that a reader always sees where the model
    looked); and whether it is the summary."""
    _pair([source], [result])
    if not result.findings:
        raise ValueError(f"{what}: the result has no findings")
    shown = result.positive or (max(result.findings, key=lambda f: f.probability),)
    missing = [f.finding for f in shown if f.finding not in cams]
    if missing:
        raise ValueError(f"{what}: no CAM for finding(s) {', '.join(missing)}")
    return shown, not result.positive


def _heatmaps_by_finding(
    source: pydicom.Dataset,
    display: np.ndarray,
    result: ImageResult,
    cams: Mapping[str, np.ndarray],
    algorithm: AlgorithmInfo,
) -> list[tuple[str, pydicom.Dataset]]:
    """(finding, image) pairs: RGB Secondary Capture overlays of `cams` on the radiograph `display`.

    One image per positive finding; when nothing is positive, one summary
    image for the most probable finding.

    Args:
        source: the analysed image (header suffices).
        display: its display array in [0, 1] (`pixels.display_array`).
        result: the findings scored on it.
        cams: finding name -> 2-D class activation map (any size).
        algorithm: the model that produced them.

    Raises:
        ValueError: mismatching SOP Instance UID, no findings, or a missing CAM.
    """
    shown, summary = _shown_findings(source, result, cams, "build_heatmaps")
    sop_instance_uid = str(source.SOPInstanceUID)
    orientation = _patient_orientation(source)
    grey = backdrop(display)
    warnings = [NOT_FOR_DIAGNOSTIC_USE] + ([_DEMO_WARNING] if algorithm.demo else [])
    images = []
    for number, finding in enumerate(shown, start=1):
        status = "POSITIVE" if finding.present else "below threshold"
        lines = [
            f"{finding.finding.replace('_', ' ')}: probability {finding.probability:.2f} "
            f"(threshold {finding.threshold:.2f}, {status})"
            + ("  [summary: no finding above its threshold]" if summary else ""),
            f"Model: {algorithm.name} {algorithm.version}",
        ]
        rgb = render_on_backdrop(grey, cams[finding.finding], lines, warnings)
        kind = f"heatmap:{'summary:' if summary else ''}{finding.finding}"
        image = hd.sc.SCImage(
            pixel_array=rgb,
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            study_instance_uid=str(source.StudyInstanceUID),
            series_instance_uid=result_uid(str(source.StudyInstanceUID), algorithm, "heatmap-series"),
            series_number=HEATMAP_SERIES_NUMBER,
            sop_instance_uid=result_uid(sop_instance_uid, algorithm, kind),
            instance_number=_instance_number(source, number),
            manufacturer=algorithm.manufacturer,
            patient_orientation=orientation or ("L", "F"),
            series_description=_series_description(algorithm),
            manufacturer_model_name=algorithm.name,
            software_versions=algorithm.version,
            specific_character_set=source.get("SpecificCharacterSet", None),
            contributing_equipment=[_contributing_equipment(algorithm)],
        )
        if orientation is None:
            # Patient Orientation is Type 2C here: the source does not state
            # it, so neither does the copy (highdicom needs a value to build).
            image.PatientOrientation = None
        _copy_patient_and_study(source, image)
        # Only frontal chest radiographs are analysed. Saying so lets readers
        # (and dciodvfy) see that Laterality (Type 2C, General Series) does
        # not apply to this unpaired body part, so it is left out.
        image.BodyPartExamined = "CHEST"
        image.BurnedInAnnotation = "YES"
        image.RecognizableVisualFeatures = "NO"
        image.LossyImageCompression = "01" if _source_lossy(source) else "00"
        image.DerivationDescription = (
            f"Class activation map of {finding.finding} by {algorithm.name} {algorithm.version} "
            f"blended over the displayed radiograph; {NOT_FOR_DIAGNOSTIC_USE.lower()}"
        )[:1024]
        image.SourceImageSequence = [_source_image_item(source)]
        image.ImageComments = (
            f"{finding.finding} probability {finding.probability:.4f} threshold {finding.threshold:.4f}; "
            f"{NOT_FOR_DIAGNOSTIC_USE}" + (f"; {_DEMO_WARNING}" if algorithm.demo else "")
        )
        images.append((finding.finding, image))
    return images


def build_parametric_maps(
    source: pydicom.Dataset,
    result: ImageResult,
    cams: Mapping[str, np.ndarray],
    algorithm: AlgorithmInfo,
) -> list[pydicom.Dataset]:
    """Parametric Maps of the CAMs; see `_parametric_maps_by_finding`."""
    return [image for _, image in _parametric_maps_by_finding(source, result, cams, algorithm)]


def _parametric_maps_by_finding(
    source: pydicom.Dataset,
    result: ImageResult,
    cams: Mapping[str, np.ndarray],
    algorithm: AlgorithmInfo,
) -> list[tuple[str, pydicom.Dataset]]:
    """(finding, map) pairs: one Parametric Map beside each heatmap (same findings).

    The float32 CAM as the model gave it, on the source's pixel grid (a CAM
    of another size is resampled bilinearly to it), with a Real World Value
    Map that states its meaning: relative relevance, 0 to 1, no units.
    """
    shown, summary = _shown_findings(source, result, cams, "build_parametric_maps")
    sop_instance_uid = str(source.SOPInstanceUID)
    maps = []
    for number, finding in enumerate(shown, start=1):
        kind = f"parametric-map:{'summary:' if summary else ''}{finding.finding}"
        # LO, 64 characters: the warnings first, so that they are never cut.
        description = (
            NOT_FOR_DIAGNOSTIC_USE + ("; DEMO WEIGHTS" if algorithm.demo else "") + f"; CAM of {finding.finding}"
        )
        pm = projection_parametric_map(
            source=_header_view(source),
            cam=cams[finding.finding],
            series_instance_uid=result_uid(str(source.StudyInstanceUID), algorithm, "parametric-map-series"),
            series_number=PARAMETRIC_MAP_SERIES_NUMBER,
            sop_instance_uid=result_uid(sop_instance_uid, algorithm, kind),
            frame_of_reference_uid=result_uid(sop_instance_uid, algorithm, "parametric-map-frame-of-reference"),
            instance_number=_instance_number(source, number),
            manufacturer=algorithm.manufacturer,
            manufacturer_model_name=algorithm.name,
            software_versions=algorithm.version,
            device_serial_number=algorithm.weights_sha256,
            lut_explanation=f"Class activation map of {finding.finding} (relative relevance 0-1)",
            content_description=description[:64],
            series_description=_series_description(algorithm),
            contributing_equipment=[_contributing_equipment(algorithm)],
            specific_character_set=source.get("SpecificCharacterSet", None),
        )
        _copy_patient_and_study(source, pm)
        pm.BodyPartExamined = "CHEST"  # see _heatmaps_by_finding
        pm.LossyImageCompression = "01" if _source_lossy(source) else "00"
        pm.ImageComments = (
            f"{finding.finding} probability {finding.probability:.4f} threshold {finding.threshold:.4f}; "
            f"{NOT_FOR_DIAGNOSTIC_USE}" + (f"; {_DEMO_WARNING}" if algorithm.demo else "")
        )
        maps.append((finding.finding, pm))
    return maps


def build_results(
    sources: Sequence[pydicom.Dataset],
    displays: Sequence[np.ndarray],
    results: Sequence[ImageResult],
    cams_per_image: Sequence[Mapping[str, np.ndarray]],
    algorithm: AlgorithmInfo,
    *,
    parametric_maps: bool = True,
) -> ResultObjects:
    """The SR of all `sources`, and the heatmaps (and parametric maps, when
    `parametric_maps`) of each, in one call."""
    if not (len(sources) == len(displays) == len(results) == len(cams_per_image)):
        raise ValueError(
            "build_results: sources, displays, results and cams_per_image must have the same length, got "
            f"{len(sources)}, {len(displays)}, {len(results)}, {len(cams_per_image)}"
        )
    sr = build_sr(sources, results, algorithm)
    heatmaps: list[tuple[str, pydicom.Dataset]] = []
    maps: list[tuple[str, pydicom.Dataset]] = []
    for source, display, result, cams in zip(sources, displays, results, cams_per_image):
        heatmaps.extend(_heatmaps_by_finding(source, display, result, cams, algorithm))
        if parametric_maps:
            maps.extend(_parametric_maps_by_finding(source, result, cams, algorithm))
    return ResultObjects(
        sr=sr,
        heatmaps=tuple(image for _, image in heatmaps),
        heatmap_findings=tuple(name for name, _ in heatmaps),
        parametric_maps=tuple(image for _, image in maps),
        parametric_map_findings=tuple(name for name, _ in maps),
    )


# --- helpers -----------------------------------------------------------------


def _pair(
    sources: Sequence[pydicom.Dataset], results: Sequence[ImageResult]
) -> list[tuple[pydicom.Dataset, ImageResult]]:
    if not sources:
        raise ValueError("at least one source image is needed")
    if len(sources) != len(results):
        raise ValueError(f"{len(sources)} sources but {len(results)} results")
    by_uid = {str(r.sop_instance_uid): r for r in results}
    if len(by_uid) != len(results):
        raise ValueError("two results for the same SOP Instance UID")
    pairs = []
    for ds in sources:
        for keyword in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID"):
            if not ds.get(keyword):
                raise ValueError(f"source image lacks {keyword}")
        result = by_uid.get(str(ds.SOPInstanceUID))
        if result is None:
            raise ValueError(f"no result for source SOP Instance UID {ds.SOPInstanceUID}")
        pairs.append((ds, result))
    studies = {str(ds.StudyInstanceUID) for ds, _ in pairs}
    if len(studies) != 1:
        raise ValueError(f"sources span {len(studies)} studies; one SR reports one study")
    return pairs


def _placeholder_group(
    algorithm: AlgorithmInfo, name: str, threshold: float, present: bool
) -> MeasurementsAndQualitativeEvaluations:
    """TID 1501 group for finding `name` on the placeholder source image.

    Tracking Identifier and Tracking Unique Identifier (TID 1501 rows 2-3),
    Finding (row 5), TID 4019 algorithm identification with the operating
    threshold as a parameter (row 6), the source image (row 4), the
    probability as NUM in UCUM "1" with its source image (TID 300), and
    present/absent at the operating point as qualitative evaluation (row 10).
    """
    concept = _sr_codes.finding_code(name)
    parameters = [f"operating threshold {threshold:.4f} (present when probability >= threshold)"]
    parameters += [f"{key}={value}" for key, value in sorted(algorithm.parameters.items())]
    algorithm_id = AlgorithmIdentification(
        name=algorithm.name,
        version=algorithm.version,
        parameters=parameters,
        manufacturer=algorithm.manufacturer,
    )
    image_reference = SourceImageForMeasurement(
        referenced_sop_class_uid=_PH_SOP_CLASS,
        referenced_sop_instance_uid=_PH_SOP_INSTANCE,
    )
    probability = Measurement(
        name=_sr_codes.PROBABILITY,
        value=_PH_PROBABILITY,
        unit=_sr_codes.PROBABILITY_UNIT,
        referenced_images=[image_reference],
    )
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=_PH_TRACKING_UID, identifier=_PH_TRACKING_ID),
        finding_type=concept,
        algorithm_id=algorithm_id,
        measurements=[probability],
        qualitative_evaluations=[
            QualitativeEvaluation(name=concept, value=_sr_codes.PRESENT if present else _sr_codes.ABSENT)
        ],
        source_images=[
            SourceImageForMeasurementGroup(
                referenced_sop_class_uid=_PH_SOP_CLASS,
                referenced_sop_instance_uid=_PH_SOP_INSTANCE,
            )
        ],
    )


# Type 2 attributes of the Patient and General Study modules that highdicom
# reads from the first evidence dataset; absent in some sources (the NIH
# samples have no birth date), present but empty in the result objects.
_TYPE2_PATIENT_STUDY = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "AccessionNumber", "ReferringPhysicianName", "StudyID",
)


def _header_view(source: pydicom.Dataset) -> pydicom.Dataset:
    """A header-only shallow copy of `source` with the Type 2 patient/study
    attributes present (empty where the source lacks them)."""
    view = pydicom.Dataset()
    for element in source:
        if element.tag.group != 0x7FE0 and element.VR != "SQ" and _valid(element):
            # A new element: the view is edited below, the source must not be.
            view.add(pydicom.DataElement(element.tag, element.VR, element.value))
    for keyword in _TYPE2_PATIENT_STUDY:
        if keyword not in view:
            setattr(view, keyword, None)
    # highdicom checks person names and warns with the name in the message;
    # names are PHI and stay out of logs (house rule 5). The real values are
    # copied onto the result by _copy_patient_and_study.
    view.PatientName = None
    view.ReferringPhysicianName = None
    return view


def _library_view(source: pydicom.Dataset) -> pydicom.Dataset:
    """The header highdicom's Image Library entry is made from.

    For CR/DX highdicom writes the TID 1603 projection descriptors (patient
    orientation, imager pixel spacing) and needs both attributes; many real
    CR images state neither. Such an image is listed with the TID 1602
    descriptors only (modality, rows, columns) rather than with invented
    values. The source itself is never changed.
    """
    view = _header_view(source)
    spacing = source.get("ImagerPixelSpacing", None)
    orientation = source.get("PatientOrientation", None)
    states_projection = (
        orientation is not None and len(orientation) == 2 and all(str(v).strip() for v in orientation)
        and spacing is not None and len(spacing) == 2 and all(float(v) > 0 for v in spacing)
    )
    if not states_projection:
        view.Modality = "OT"  # only selects highdicom's descriptor set; not written to the SR
    return view


def _disclaimer_container(algorithm: AlgorithmInfo) -> ContainerContentItem:
    """TID 1500 row 12 container with the use restrictions as TEXT."""
    text = f"{NOT_FOR_DIAGNOSTIC_USE}: computer-generated triage results, not reviewed by a physician."
    if algorithm.demo:
        text += f" {_DEMO_WARNING}; the probabilities carry no clinical meaning."
    container = ContainerContentItem(
        name=_sr_codes.QUALITATIVE_EVALUATIONS,
        relationship_type=RelationshipTypeValues.CONTAINS,
    )
    container.ContentSequence = [
        TextContentItem(name=codes.DCM.Comment, value=text, relationship_type=RelationshipTypeValues.CONTAINS)
    ]
    return container


def _contributing_equipment(algorithm: AlgorithmInfo) -> hd.ContributingEquipment:
    """IHE AIR: the algorithm as Processing Equipment (DCM 109102)."""
    item = hd.ContributingEquipment(
        manufacturer=algorithm.manufacturer,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=algorithm.name,
        software_versions=algorithm.version,
        # The weights' SHA-256 identifies this model instance as a serial
        # number identifies a device (LO, 64 characters: it fits exactly).
        device_serial_number=algorithm.weights_sha256,
        contribution_description=(  # ST: up to 1024 characters
            f"AI triage of chest radiographs by {algorithm.display_name}; weights SHA-256 "
            f"{algorithm.weights_sha256}; {NOT_FOR_DIAGNOSTIC_USE.lower()}"
        ),
    )
    # Device UID (0018,1002), allowed in Contributing Equipment items
    # (PS3.3 C.12.1): IHE AIR identifies the algorithm instance by it, and it
    # changes with the weights (`device_uid`).
    item.DeviceUID = device_uid(algorithm)
    return item


def _series_description(algorithm: AlgorithmInfo) -> str:
    return _SERIES_DESCRIPTION + (" - DEMO WEIGHTS" if algorithm.demo else "")


def _valid(element: pydicom.DataElement) -> bool:
    """Whether the value is valid for its VR (an invalid one is not copied)."""
    try:
        validate_value(element.VR, element.value, pydicom.config.RAISE)
    except (ValueError, TypeError):
        return False
    return True


def _copy_patient_and_study(source: pydicom.Dataset, target: pydicom.Dataset) -> None:
    """Copy the patient and study identity verbatim; drop invalid values
    (the NIH samples carry Patient's Age "81", not "081Y")."""
    for keyword in _PATIENT_STUDY_KEYWORDS:
        if keyword in source and _valid(source[keyword]):
            target[keyword] = pydicom.DataElement(source[keyword].tag, source[keyword].VR, source[keyword].value)
    for keyword in ("PatientAge", "PatientSize", "PatientWeight"):
        if keyword in target and not _valid(target[keyword]):
            del target[keyword]
    if "SpecificCharacterSet" in source:
        target.SpecificCharacterSet = source.SpecificCharacterSet


def _patient_orientation(source: pydicom.Dataset) -> tuple[str, str] | None:
    value = source.get("PatientOrientation", None)
    if not value or len(value) != 2:
        return None
    row, column = (str(v).strip().upper() for v in value)
    valid = set("LRAPHF")
    if not row or not column or not set(row) <= valid or not set(column) <= valid:
        return None
    try:  # highdicom takes single-letter biped directions only
        hd.PatientOrientationValuesBiped(row)
        hd.PatientOrientationValuesBiped(column)
    except ValueError:
        return None
    return row, column


def _instance_number(source: pydicom.Dataset, number: int) -> int:
    try:
        base = int(source.get("InstanceNumber", 0) or 0)
    except (TypeError, ValueError):
        base = 0
    return base * 100 + number if 0 < base < 10**6 else number


# Transfer syntaxes that are (or may be) lossy; JPEG 2000 (.91) and HTJ2K
# may carry either, so they count as lossy unless the header says "00".
_LOSSY_SYNTAXES = frozenset(
    {
        pydicom.uid.JPEGBaseline8Bit,
        pydicom.uid.JPEGExtended12Bit,
        pydicom.uid.JPEGLSNearLossless,
        pydicom.uid.JPEG2000,
        pydicom.uid.HTJ2K,
    }
)


def _source_lossy(source: pydicom.Dataset) -> bool:
    stated = str(source.get("LossyImageCompression", "")).strip()
    if stated in ("00", "01"):
        return stated == "01"
    meta = getattr(source, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    return bool(syntax) and syntax in _LOSSY_SYNTAXES


def _source_image_item(source: pydicom.Dataset) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    item.PurposeOfReferenceCodeSequence = [CodedConcept.from_code(codes.DCM.SourceImageForImageProcessingOperation)]
    return item
