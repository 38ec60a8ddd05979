"""Model results as DICOM: a TID 1500 Structured Report and heatmap images.

Everything is encoded by highdicom (house rule 4):

* `build_sr`: Comprehensive 3D SR, PS3.16 TID 1500 "Imaging Measurement
  Report", one TID 1501 measurement group per finding per image (tracking
  identifier and UID, finding, probability as NUM, present/absent at the
  operating threshold, TID 4019 algorithm identification with the threshold
  as a parameter, source image reference), IHE AI Results (AIR) Contributing
  Equipment, VerificationFlag UNVERIFIED.
* `build_heatmaps`: RGB Secondary Capture images: the radiograph with the
  class activation map in a perceptual colour map and a burned-in legend.

Both share the patient and study of their source images and go into new
series. Every UID is derived from the source, the model (name, version,
weights) and the kind of object (`result_uid`), so a retry or a re-run
replaces earlier results rather than adding duplicates.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
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
from pydicom.sr.codedict import codes
from pydicom.valuerep import validate_value

from dicom_node import _sr_codes
from dicom_node._sr_heatmap import render_overlay
from triage_core.values import AlgorithmInfo, ImageResult

__all__ = [
    "HEATMAP_SERIES_NUMBER",
    "NOT_FOR_DIAGNOSTIC_USE",
    "ResultObjects",
    "SR_SERIES_NUMBER",
    "build_heatmaps",
    "build_results",
    "build_sr",
    "result_uid",
]

SR_SERIES_NUMBER = 9901
HEATMAP_SERIES_NUMBER = 9902
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
    """The result objects of one analysis: one SR and its heatmap images."""

    sr: pydicom.Dataset
    heatmaps: tuple[pydicom.Dataset, ...]
    #: The finding each heatmap shows, in the order of `heatmaps` (empty when not known).
    heatmap_findings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "heatmaps", tuple(self.heatmaps))
        object.__setattr__(self, "heatmap_findings", tuple(self.heatmap_findings))
        if self.heatmap_findings and len(self.heatmap_findings) != len(self.heatmaps):
            raise ValueError("heatmap_findings must name one finding per heatmap")

    def __iter__(self):  # sr first, then heatmaps: the order to store and send
        yield self.sr
        yield from self.heatmaps


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
    """The UID of the model as a device: one per set of weights."""
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

    Raises:
        ValueError: sources and results do not match, sources span studies,
            or a finding has no code.
    """
    pairs = _pair(sources, results)
    study_instance_uid = str(pairs[0][0].StudyInstanceUID)
    source_key = "\\".join(sorted(str(ds.SOPInstanceUID) for ds, _ in pairs))

    groups = [
        _measurement_group(source, finding, algorithm)
        for source, result in pairs
        for finding in result.findings
    ]
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
        imaging_measurements=groups,
        title=codes.DCM.ImagingMeasurementReport,
        language_of_content_item_and_descendants=LanguageOfContentItemAndDescendants(
            CodedConcept("en-US", "RFC5646", "English (United States)")
        ),
        referenced_images=[_library_view(ds) for ds, _ in pairs],
    )
    report[0].ContentSequence.append(_disclaimer_container(algorithm))

    sr = Comprehensive3DSR(
        evidence=[_header_view(ds) for ds, _ in pairs],
        content=report[0],
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
    _copy_patient_and_study(pairs[0][0], sr)
    return sr


def build_heatmaps(
    source: pydicom.Dataset,
    display: np.ndarray,
    result: ImageResult,
    cams: Mapping[str, np.ndarray],
    algorithm: AlgorithmInfo,
) -> list[pydicom.Dataset]:
    """RGB Secondary Capture overlays; see `_heatmaps_by_finding`."""
    return [image for _, image in _heatmaps_by_finding(source, display, result, cams, algorithm)]


def _heatmaps_by_finding(
    source: pydicom.Dataset,
    display: np.ndarray,
    result: ImageResult,
    cams: Mapping[str, np.ndarray],
    algorithm: AlgorithmInfo,
) -> list[tuple[str, pydicom.Dataset]]:
    """(finding, image) pairs: RGB Secondary Capture overlays of `cams` on the radiograph `display`.

    One image per positive finding; when nothing is positive, one summary
    image for the most probable finding, so that a reader always sees where
    the model looked.

    Args:
        source: the analysed image (header suffices).
        display: its display array in [0, 1] (`pixels.display_array`).
        result: the findings scored on it.
        cams: finding name -> 2-D class activation map (any size).
        algorithm: the model that produced them.

    Raises:
        ValueError: mismatching SOP Instance UID, no findings, or a missing CAM.
    """
    _pair([source], [result])
    if not result.findings:
        raise ValueError("build_heatmaps: the result has no findings")
    shown = result.positive or (max(result.findings, key=lambda f: f.probability),)
    missing = [f.finding for f in shown if f.finding not in cams]
    if missing:
        raise ValueError(f"build_heatmaps: no CAM for finding(s) {', '.join(missing)}")

    sop_instance_uid = str(source.SOPInstanceUID)
    summary = not result.positive
    orientation = _patient_orientation(source)
    images = []
    for number, finding in enumerate(shown, start=1):
        status = "POSITIVE" if finding.present else "below threshold"
        lines = [
            f"{finding.finding.replace('_', ' ')}: probability {finding.probability:.2f} "
            f"(threshold {finding.threshold:.2f}, {status})"
            + ("  [summary: no finding above its threshold]" if summary else ""),
            f"Model: {algorithm.name} {algorithm.version}",
        ]
        warnings = [NOT_FOR_DIAGNOSTIC_USE] + ([_DEMO_WARNING] if algorithm.demo else [])
        rgb = render_overlay(display, cams[finding.finding], lines, warnings)
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
        # Type 2C in General Series; dciodvfy asks for it on every SC image.
        image.Laterality = source.get("Laterality", None) or None
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


def build_results(
    sources: Sequence[pydicom.Dataset],
    displays: Sequence[np.ndarray],
    results: Sequence[ImageResult],
    cams_per_image: Sequence[Mapping[str, np.ndarray]],
    algorithm: AlgorithmInfo,
) -> ResultObjects:
    """The SR of all `sources` and the heatmaps of each, in one call."""
    if not (len(sources) == len(displays) == len(results) == len(cams_per_image)):
        raise ValueError(
            "build_results: sources, displays, results and cams_per_image must have the same length, got "
            f"{len(sources)}, {len(displays)}, {len(results)}, {len(cams_per_image)}"
        )
    sr = build_sr(sources, results, algorithm)
    pairs: list[tuple[str, pydicom.Dataset]] = []
    for source, display, result, cams in zip(sources, displays, results, cams_per_image):
        pairs.extend(_heatmaps_by_finding(source, display, result, cams, algorithm))
    return ResultObjects(
        sr=sr, heatmaps=tuple(image for _, image in pairs), heatmap_findings=tuple(name for name, _ in pairs)
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


def _measurement_group(
    source: pydicom.Dataset, finding, algorithm: AlgorithmInfo
) -> MeasurementsAndQualitativeEvaluations:
    """TID 1501 group: one finding on one image."""
    concept = _sr_codes.finding_code(finding.finding)
    sop_instance_uid = str(source.SOPInstanceUID)
    parameters = [f"operating threshold {finding.threshold:.4f} (present when probability >= threshold)"]
    parameters += [f"{key}={value}" for key, value in sorted(algorithm.parameters.items())]
    algorithm_id = AlgorithmIdentification(
        name=algorithm.name,
        version=algorithm.version,
        parameters=parameters,
        manufacturer=algorithm.manufacturer,
    )
    image_reference = SourceImageForMeasurement(
        referenced_sop_class_uid=str(source.SOPClassUID),
        referenced_sop_instance_uid=sop_instance_uid,
    )
    probability = Measurement(
        name=_sr_codes.PROBABILITY,
        value=float(finding.probability),
        unit=_sr_codes.PROBABILITY_UNIT,
        referenced_images=[image_reference],
    )
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=result_uid(sop_instance_uid, algorithm, f"tracking:{finding.finding}"),
            identifier=f"{finding.finding} on image {sop_instance_uid}",
        ),
        finding_type=concept,
        algorithm_id=algorithm_id,
        measurements=[probability],
        qualitative_evaluations=[
            QualitativeEvaluation(name=concept, value=_sr_codes.PRESENT if finding.present else _sr_codes.ABSENT)
        ],
        source_images=[
            SourceImageForMeasurementGroup(
                referenced_sop_class_uid=str(source.SOPClassUID),
                referenced_sop_instance_uid=sop_instance_uid,
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
        contribution_description=(
            f"AI triage of chest radiographs by {algorithm.display_name}; weights SHA-256 "
            f"{algorithm.weights_sha256}"
        )[:64],
    )
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
