"""Heatmap Secondary Capture images (PS3.3 A.8.1): the radiograph with a
class activation map in a perceptual colour map and a burned-in legend.

One image per positive finding; when nothing is positive, one summary image
for the most probable finding, so that a reader always sees where the model
looked. Same patient and study as the source, a new series, no Rescale or
VOI attributes copied (the pixels are RGB as displayed).
"""

from __future__ import annotations

from collections.abc import Mapping

import highdicom as hd
import numpy as np
import pydicom

from triage_core.values import AlgorithmInfo, FindingResult, ImageResult

from .equipment import contributing_equipment
from .headers import (
    copy_patient_and_study,
    instance_number,
    patient_orientation,
    set_lossy_attributes,
    source_image_item,
)
from .render import DEMO_WARNING, NOT_FOR_DIAGNOSTIC_USE, HeatmapCaption, backdrop, render_on_backdrop
from .uids import image_key, result_uid

__all__ = ["HEATMAP_SERIES_NUMBER", "build_heatmaps", "heatmaps_by_finding", "series_description", "shown_findings"]

HEATMAP_SERIES_NUMBER = 9902
_SERIES_DESCRIPTION = "CXR Triage AI results - not for diagnostic use"


def series_description(algorithm: AlgorithmInfo) -> str:
    return _SERIES_DESCRIPTION + (" - DEMO WEIGHTS" if algorithm.demo else "")


def image_comments(finding: FindingResult, algorithm: AlgorithmInfo) -> str:
    return (
        f"{finding.finding} probability {finding.probability:.4f} threshold {finding.threshold:.4f}; "
        f"{NOT_FOR_DIAGNOSTIC_USE}" + (f"; {DEMO_WARNING}" if algorithm.demo else "")
    )


def shown_findings(
    source: pydicom.Dataset, result: ImageResult, cams: Mapping[str, np.ndarray], what: str
) -> tuple[tuple[FindingResult, ...], bool]:
    """The findings that get an image: the positive ones, else the most
    probable one as a summary; and whether it is the summary."""
    if str(source.get("SOPInstanceUID", "")) != result.sop_instance_uid:
        raise ValueError(f"{what}: the result is for SOP Instance UID {result.sop_instance_uid}, "
                         f"not the source's {source.get('SOPInstanceUID')}")
    if not result.findings:
        raise ValueError(f"{what}: the result has no findings")
    shown = result.positive or (max(result.findings, key=lambda f: f.probability),)
    missing = [f.finding for f in shown if f.finding not in cams]
    if missing:
        raise ValueError(f"{what}: no CAM for finding(s) {', '.join(missing)}")
    return shown, not result.positive


def build_heatmaps(
    source: pydicom.Dataset,
    display: np.ndarray,
    result: ImageResult,
    cams: Mapping[str, np.ndarray],
    algorithm: AlgorithmInfo,
) -> list[pydicom.Dataset]:
    """RGB Secondary Capture overlays; see `heatmaps_by_finding`."""
    return [image for _, image in heatmaps_by_finding(source, display, result, cams, algorithm)]


def heatmaps_by_finding(
    source: pydicom.Dataset,
    display: np.ndarray,
    result: ImageResult,
    cams: Mapping[str, np.ndarray],
    algorithm: AlgorithmInfo,
) -> list[tuple[str, pydicom.Dataset]]:
    """(finding, image) pairs: RGB Secondary Capture overlays of `cams` on the radiograph `display`.

    Args:
        source: the analysed image (header suffices).
        display: its display array in [0, 1] (`pixels.display_array`).
        result: the findings scored on it.
        cams: finding name -> 2-D class activation map (any size).
        algorithm: the model that produced them.

    Raises:
        ValueError: mismatching SOP Instance UID, no findings, or a missing CAM.
    """
    shown, summary = shown_findings(source, result, cams, "build_heatmaps")
    key = image_key(result)
    orientation = patient_orientation(source)
    grey = backdrop(display)
    images = []
    for number, finding in enumerate(shown, start=1):
        caption = HeatmapCaption(
            finding=finding.finding, probability=finding.probability, threshold=finding.threshold,
            present=finding.present, summary=summary, model_name=algorithm.name,
            model_version=algorithm.version, demo=algorithm.demo,
        )
        rgb = render_on_backdrop(grey, cams[finding.finding], caption.lines(), caption.warnings())
        kind = f"heatmap:{'summary:' if summary else ''}{finding.finding}"
        image = hd.sc.SCImage(
            pixel_array=rgb,
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            study_instance_uid=str(source.StudyInstanceUID),
            series_instance_uid=result_uid(str(source.StudyInstanceUID), algorithm, "heatmap-series"),
            series_number=HEATMAP_SERIES_NUMBER,
            sop_instance_uid=result_uid(key, algorithm, kind),
            instance_number=instance_number(source, number),
            manufacturer=algorithm.manufacturer,
            patient_orientation=orientation or ("L", "F"),
            series_description=series_description(algorithm),
            manufacturer_model_name=algorithm.name,
            software_versions=algorithm.version,
            contributing_equipment=[contributing_equipment(algorithm)],
        )
        if orientation is None:
            # Patient Orientation is Type 2C here: the source does not state
            # it, so neither does the copy (highdicom needs a value to build).
            image.PatientOrientation = None
        copy_patient_and_study(source, image)
        # Only frontal chest radiographs are analysed. Saying so lets readers
        # (and dciodvfy) see that Laterality (Type 2C, General Series) does
        # not apply to this unpaired body part, so it is left out.
        image.BodyPartExamined = "CHEST"
        image.BurnedInAnnotation = "YES"
        image.RecognizableVisualFeatures = "NO"
        set_lossy_attributes(source, image)
        image.DerivationDescription = (
            f"Class activation map of {finding.finding} by {algorithm.name} {algorithm.version} "
            f"blended over the displayed radiograph; {NOT_FOR_DIAGNOSTIC_USE.lower()}"
        )[:1024]
        image.SourceImageSequence = [source_image_item(source)]
        image.ImageComments = image_comments(finding, algorithm)
        images.append((finding.finding, image))
    return images

