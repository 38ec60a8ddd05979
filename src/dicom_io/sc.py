"""Heatmap Secondary Capture images (PS3.3 A.8.1): the radiograph with a
class activation map in a perceptual colour map and a burned-in legend.

A PACS must be able to afford them, so they are made at a display size
(longest side `max_side`, 768 px by default) and JPEG baseline compressed
(the Lossy Image Compression attributes say so, with the ratio), and a study
with many positive findings does not get one image per finding: the most
urgent `per_finding` positive findings get an image each, and when there are
more, one overview image shows every positive finding as a labelled tile.
When nothing is positive, one image shows the most probable finding, so that
a reader always sees where the model looked. Same patient and study as the
source, a new series, no Rescale or VOI attributes copied (the pixels are
RGB as displayed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import highdicom as hd
import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit

from triage_core.values import AlgorithmInfo, FindingResult, ImageResult

from .equipment import contributing_equipment
from .headers import (
    copy_patient_and_study,
    instance_number,
    patient_orientation,
    set_lossy_attributes,
    source_image_item,
)
from .render import (
    DEMO_WARNING,
    MAX_SIDE,
    NOT_FOR_DIAGNOSTIC_USE,
    HeatmapCaption,
    backdrop,
    render_on_backdrop,
    render_overview,
)
from .uids import image_key, result_uid

__all__ = ["HEATMAP_SERIES_NUMBER", "HeatmapOptions", "OVERVIEW", "build_heatmaps", "heatmaps_by_finding",
           "series_description", "shown_findings"]

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
    source: pydicom.Dataset, result: ImageResult, cams: Mapping[str, np.ndarray], what: str,
    rank: Mapping[str, int] | None = None,
) -> tuple[tuple[FindingResult, ...], bool]:
    """The findings that get a map: the positive ones, most urgent first (the lowest `rank`, then the
    highest probability; unranked findings last), else the most probable one as a summary; and whether
    it is the summary."""
    if str(source.get("SOPInstanceUID", "")) != result.sop_instance_uid:
        raise ValueError(f"{what}: the result is for SOP Instance UID {result.sop_instance_uid}, "
                         f"not the source's {source.get('SOPInstanceUID')}")
    if not result.findings:
        raise ValueError(f"{what}: the result has no findings")
    rank = rank or {}
    last = max(rank.values(), default=0) + 1
    positive = sorted(result.positive, key=lambda f: (rank.get(f.finding, last), -f.probability))
    shown = tuple(positive) or (max(result.findings, key=lambda f: f.probability),)
    missing = [f.finding for f in shown if f.finding not in cams]
    if missing:
        raise ValueError(f"{what}: no CAM for finding(s) {', '.join(missing)}")
    return shown, not result.positive


@dataclass(frozen=True)
class HeatmapOptions:
    """How heatmaps are made (settings CXR_TRIAGE_HEATMAP_MAX_SIDE, CXR_TRIAGE_HEATMAP_FINDINGS,
    CXR_TRIAGE_HEATMAP_COMPRESSION)."""

    max_side: int = MAX_SIDE
    per_finding: int = 2
    compress: bool = True
    #: Who gets an image of their own: the lowest rank first, then the highest probability
    #: (triage_core.priority.heatmap_rank: the model card's urgency classes).
    rank: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 64 <= self.max_side <= 4096:
            raise ValueError("max_side must be 64 to 4096 pixels")
        if self.per_finding < 0:
            raise ValueError("per_finding must not be negative")
        object.__setattr__(self, "rank", dict(self.rank))


def build_heatmaps(
    source: pydicom.Dataset,
    display: np.ndarray,
    result: ImageResult,
    cams: Mapping[str, np.ndarray],
    algorithm: AlgorithmInfo,
    options: HeatmapOptions = HeatmapOptions(),
) -> list[pydicom.Dataset]:
    """RGB Secondary Capture overlays; see `heatmaps_by_finding`."""
    return [image for _, image in heatmaps_by_finding(source, display, result, cams, algorithm, options)]


OVERVIEW = "overview"


def heatmaps_by_finding(
    source: pydicom.Dataset,
    display: np.ndarray,
    result: ImageResult,
    cams: Mapping[str, np.ndarray],
    algorithm: AlgorithmInfo,
    options: HeatmapOptions = HeatmapOptions(),
) -> list[tuple[str, pydicom.Dataset]]:
    """(finding, image) pairs: RGB Secondary Capture overlays of `cams` on the radiograph `display`;
    the overview image is paired with the name "overview".

    Args:
        source: the analysed image (header suffices).
        display: its display array in [0, 1] (`pixels.display_array`).
        result: the findings scored on it.
        cams: finding name -> 2-D class activation map (any size).
        algorithm: the model that produced them.
        options: display size, how many findings get an image each, compression, urgency order.

    Raises:
        ValueError: mismatching SOP Instance UID, no findings, or a missing CAM.
    """
    shown, summary = shown_findings(source, result, cams, "build_heatmaps", options.rank)
    key = image_key(result)
    grey = backdrop(display, options.max_side)
    pictures: list[tuple[str, str, np.ndarray, str, str]] = []  # (name, kind, rgb, comments, derivation)
    for finding in shown[: max(1, options.per_finding)]:
        caption = _caption(finding, algorithm, summary)
        rgb = render_on_backdrop(grey, cams[finding.finding], caption.lines(), caption.warnings())
        pictures.append((
            finding.finding, f"heatmap:{'summary:' if summary else ''}{finding.finding}", rgb,
            image_comments(finding, algorithm),
            f"Class activation map of {finding.finding} by {algorithm.name} {algorithm.version} "
            f"blended over the displayed radiograph; {NOT_FOR_DIAGNOSTIC_USE.lower()}",
        ))
    if len(shown) > max(1, options.per_finding):
        tiles = [(cams[f.finding], f"{f.finding.replace('_', ' ')} {f.probability:.2f} (t {f.threshold:.2f})")
                 for f in shown]
        lines = [f"{len(shown)} positive findings, each at its operating threshold (t)",
                 f"Model: {algorithm.name} {algorithm.version}"]
        warnings = [NOT_FOR_DIAGNOSTIC_USE] + ([DEMO_WARNING] if algorithm.demo else [])
        rgb = render_overview(display, tiles, lines, warnings, options.max_side)
        names = ", ".join(f"{f.finding} {f.probability:.4f} (threshold {f.threshold:.4f})" for f in shown)
        pictures.append((
            OVERVIEW, "heatmap:overview", rgb,
            (f"Overview of {len(shown)} positive findings: {names}; {NOT_FOR_DIAGNOSTIC_USE}"
             + (f"; {DEMO_WARNING}" if algorithm.demo else ""))[:10240],
            f"Class activation maps of {len(shown)} positive findings by {algorithm.name} {algorithm.version}, "
            f"one tile each over the displayed radiograph; {NOT_FOR_DIAGNOSTIC_USE.lower()}",
        ))
    orientation = patient_orientation(source)
    images = []
    for number, (name, kind, rgb, comments, derivation) in enumerate(pictures, start=1):
        image = hd.sc.SCImage(
            pixel_array=rgb,
            photometric_interpretation="YBR_FULL_422" if options.compress else "RGB",
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
            transfer_syntax_uid=JPEGBaseline8Bit if options.compress else ExplicitVRLittleEndian,
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
        set_lossy_attributes(source, image, also=_jpeg_step(image, rgb) if options.compress else None)
        image.DerivationDescription = derivation[:1024]
        image.SourceImageSequence = [source_image_item(source)]
        image.ImageComments = comments
        images.append((name, image))
    return images


def _caption(finding: FindingResult, algorithm: AlgorithmInfo, summary: bool) -> HeatmapCaption:
    return HeatmapCaption(
        finding=finding.finding, probability=finding.probability, threshold=finding.threshold,
        present=finding.present, summary=summary, model_name=algorithm.name,
        model_version=algorithm.version, demo=algorithm.demo,
    )


def _jpeg_step(image: pydicom.Dataset, rgb: np.ndarray) -> tuple[str, str]:
    """(ratio, method) of our own JPEG compression of `rgb` into `image`'s Pixel Data."""
    encoded = len(image.PixelData)
    return f"{rgb.nbytes / max(1, encoded):.2f}"[:16], "ISO_10918_1"
