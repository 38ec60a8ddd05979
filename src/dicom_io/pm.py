"""Parametric Maps (PS3.3 A.75) of class activation maps on a projection radiograph.

A chest radiograph (CR, DX, or DX in a Secondary Capture) has no Frame of
Reference, while the Parametric Map IOD as dciodvfy checks it requires one,
with Pixel Measures, Plane Orientation and Plane Position functional groups
(and highdicom 0.28's own no-Frame-of-Reference path leaves the Dimension
Index Values of the frame empty, which its reader then rejects). So the map
gets a Frame of Reference of its own, shared with no other object: it only
states the map's own pixel grid. The one-to-one pixel correspondence with
the radiograph is what matters to a viewer, and it is stated by the
Derivation Image Sequence (Spatial Locations Preserved YES) that highdicom
writes for the source image: same Rows and Columns, same pixels.

The geometry of that grid is the source's own: its Pixel Spacing, else its
Imager Pixel Spacing (at the detector, so larger than the anatomy by the
geometric magnification), else 1 mm; rows and columns along the source's
Patient Orientation, else the conventional frontal chest display (rows
towards the patient's left, columns towards the feet). The Derivation
Description says which of these the source stated and which are assumed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import highdicom as hd
import numpy as np
import pydicom
from PIL import Image

from triage_core.values import AlgorithmInfo, ImageResult

from .equipment import contributing_equipment
from .headers import copy_patient_and_study, header_view, instance_number, patient_orientation, pixel_spacing
from .headers import set_lossy_attributes
from .render import NOT_FOR_DIAGNOSTIC_USE
from .sc import image_comments, series_description, shown_findings
from .uids import image_key, result_uid

__all__ = ["PARAMETRIC_MAP_SERIES_NUMBER", "build_parametric_maps", "parametric_maps_by_finding",
           "projection_parametric_map"]

PARAMETRIC_MAP_SERIES_NUMBER = 9903

# Patient direction letters (PS3.3 C.7.6.1.1.1) as LPS unit vectors.
_DIRECTIONS = {
    "L": (1.0, 0.0, 0.0), "R": (-1.0, 0.0, 0.0),
    "P": (0.0, 1.0, 0.0), "A": (0.0, -1.0, 0.0),
    "H": (0.0, 0.0, 1.0), "F": (0.0, 0.0, -1.0),
}
_UNITLESS = hd.sr.CodedConcept("1", "UCUM", "no units")


def projection_parametric_map(
    *,
    source: pydicom.Dataset,
    cam: np.ndarray,
    series_instance_uid: str,
    series_number: int,
    sop_instance_uid: str,
    frame_of_reference_uid: str,
    instance_number: int,
    manufacturer: str,
    manufacturer_model_name: str,
    software_versions: str,
    device_serial_number: str,
    lut_explanation: str,
    content_description: str,
    series_description: str,
    contributing_equipment: Sequence[hd.ContributingEquipment],
) -> hd.pm.ParametricMap:
    """A single-frame float32 Parametric Map of `cam` on the pixel grid of `source`.

    Args:
        source: header of the radiograph (Rows, Columns, UIDs, geometry);
            not changed. Patient and study identity and the character set
            are the caller's to copy (`copy_patient_and_study`).
        cam: 2-D map with values in [0, 1]; resampled bilinearly to the
            source's Rows x Columns when its shape differs.
        lut_explanation: what the values mean, for the Real World Value Map.

    Raises:
        ValueError: `cam` is not a 2-D map.
    """
    cam = np.asarray(cam)
    if cam.ndim != 2 or min(cam.shape) < 1:
        raise ValueError(f"cam must be a 2-D map, got shape {cam.shape}")
    rows, columns = int(source.Rows), int(source.Columns)
    values = np.asarray(cam, dtype=np.float32)
    if values.shape != (rows, columns):
        image = Image.fromarray(np.ascontiguousarray(values), mode="F")
        values = np.asarray(image.resize((columns, rows), Image.Resampling.BILINEAR), dtype=np.float32)
    # Into [0, 1] in two passes: fmax maps NaN (and -inf) to 0, minimum +inf to 1.
    values = np.fmax(values, np.float32(0.0))
    np.minimum(values, np.float32(1.0), out=values)

    stated_spacing = pixel_spacing(source)
    spacing = stated_spacing[0] if stated_spacing else (1.0, 1.0)
    orientation = patient_orientation(source)
    row_direction, column_direction = (_DIRECTIONS[letter] for letter in (orientation or ("L", "F")))
    view = header_view(source)  # the geometry below is the map's, not the source's
    view.FrameOfReferenceUID = frame_of_reference_uid
    view.PositionReferenceIndicator = None
    view.ImagePositionPatient = [0.0, 0.0, 0.0]
    view.ImageOrientationPatient = [*row_direction, *column_direction]
    view.PixelSpacing = list(spacing)
    view.SliceThickness = None

    mapping = hd.pm.RealWorldValueMapping(
        lut_label="CAM",
        lut_explanation=lut_explanation[:64],
        unit=_UNITLESS,
        value_range=(0.0, 1.0),
        slope=1.0,
        intercept=0.0,
    )
    pm = hd.pm.ParametricMap(
        source_images=[view],
        pixel_array=values,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=manufacturer,
        manufacturer_model_name=manufacturer_model_name,
        software_versions=software_versions,
        device_serial_number=device_serial_number,
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.5, window_width=1.0)],
        content_label="CAM",
        content_description=content_description,
        content_qualification=hd.ContentQualificationValues.RESEARCH,
        image_flavor=hd.pm.ImageFlavorValues.VOLUME,
        derived_pixel_contrast=hd.pm.DerivedPixelContrastValues.NONE,
        series_description=series_description,
        contributing_equipment=contributing_equipment,
    )
    if stated_spacing is None:
        spacing_note = "the source states no pixel spacing, 1 mm is nominal"
    elif stated_spacing[1] == "ImagerPixelSpacing":
        spacing_note = "pixel spacing is the source's Imager Pixel Spacing (at the detector, not corrected for magnification)"
    else:
        spacing_note = "pixel spacing is the source's Pixel Spacing"
    orientation_note = (
        f"orientation is the source's Patient Orientation (rows towards {orientation[0]}, columns towards "
        f"{orientation[1]})" if orientation
        else "the source states no Patient Orientation: rows towards L, columns towards F (a frontal chest "
             "as displayed) are assumed"
    )
    pm.DerivationDescription = (
        "Class activation map of the source radiograph on its pixel grid; the Frame of Reference "
        f"belongs to this map only; {spacing_note}; {orientation_note}"
    )[:1024]
    return pm


def build_parametric_maps(
    source: pydicom.Dataset,
    result: ImageResult,
    cams: Mapping[str, np.ndarray],
    algorithm: AlgorithmInfo,
) -> list[pydicom.Dataset]:
    """Parametric Maps of the CAMs; see `parametric_maps_by_finding`."""
    return [image for _, image in parametric_maps_by_finding(source, result, cams, algorithm)]


def parametric_maps_by_finding(
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
    shown, summary = shown_findings(source, result, cams, "build_parametric_maps")
    key = image_key(result)
    maps = []
    for number, finding in enumerate(shown, start=1):
        kind = f"parametric-map:{'summary:' if summary else ''}{finding.finding}"
        # LO, 64 characters: the warnings first, so that they are never cut.
        description = (
            NOT_FOR_DIAGNOSTIC_USE + ("; DEMO WEIGHTS" if algorithm.demo else "") + f"; CAM of {finding.finding}"
        )
        pm = projection_parametric_map(
            source=source,
            cam=cams[finding.finding],
            series_instance_uid=result_uid(str(source.StudyInstanceUID), algorithm, "parametric-map-series"),
            series_number=PARAMETRIC_MAP_SERIES_NUMBER,
            sop_instance_uid=result_uid(key, algorithm, kind),
            frame_of_reference_uid=result_uid(key, algorithm, "parametric-map-frame-of-reference"),
            instance_number=instance_number(source, number),
            manufacturer=algorithm.manufacturer,
            manufacturer_model_name=algorithm.name,
            software_versions=algorithm.version,
            device_serial_number=algorithm.weights_sha256,
            lut_explanation=f"Class activation map of {finding.finding} (relative relevance 0-1)",
            content_description=description[:64],
            series_description=series_description(algorithm),
            contributing_equipment=[contributing_equipment(algorithm)],
        )
        copy_patient_and_study(source, pm)
        pm.BodyPartExamined = "CHEST"  # see sc.heatmaps_by_finding
        set_lossy_attributes(source, pm)
        pm.ImageComments = image_comments(finding, algorithm)
        maps.append((finding.finding, pm))
    return maps
