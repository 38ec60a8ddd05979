"""A highdicom Parametric Map of a class activation map on a projection radiograph.

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

The nominal geometry of that grid: the source's Pixel Spacing, else Imager
Pixel Spacing, else 1 mm (said in the Derivation Description); rows and
columns along the source's Patient Orientation, else the conventional
frontal chest display (rows towards the patient's left, columns towards the
feet).
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
import pydicom
from PIL import Image

__all__ = ["projection_parametric_map"]

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
    specific_character_set: str | Sequence[str] | None,
) -> hd.pm.ParametricMap:
    """A single-frame float32 Parametric Map of `cam` on the pixel grid of `source`.

    Args:
        source: header of the radiograph (Rows, Columns, UIDs, patient and
            study); not changed.
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

    spacing, spacing_stated = _pixel_spacing(source)
    row_direction, column_direction = _orientation(source)
    view = pydicom.Dataset()
    view.update(source)  # a shallow view: the geometry below is the map's, not the source's
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
        specific_character_set=specific_character_set,
    )
    pm.DerivationDescription = (
        "Class activation map of the source radiograph on its pixel grid; the Frame of Reference "
        "belongs to this map only"
        + ("" if spacing_stated else "; the source states no pixel spacing, 1 mm is nominal")
    )
    return pm


def _pixel_spacing(source: pydicom.Dataset) -> tuple[tuple[float, float], bool]:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = source.get(keyword, None)
        try:
            spacing = tuple(float(v) for v in value) if value is not None else ()
        except (TypeError, ValueError):
            continue
        if len(spacing) == 2 and all(v > 0 for v in spacing):
            return (spacing[0], spacing[1]), True
    return (1.0, 1.0), False


def _orientation(source: pydicom.Dataset) -> tuple[tuple[float, ...], tuple[float, ...]]:
    value = source.get("PatientOrientation", None)
    if value is not None and len(value) == 2:
        row, column = (str(v).strip().upper() for v in value)
        opposite = set(row + column) in ({"L", "R"}, {"A", "P"}, {"H", "F"})
        if row in _DIRECTIONS and column in _DIRECTIONS and not opposite:
            return _DIRECTIONS[row], _DIRECTIONS[column]
    return _DIRECTIONS["L"], _DIRECTIONS["F"]
