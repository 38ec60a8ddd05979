"""Parametric Maps (PS3.3 A.75) of class activation maps on a projection radiograph.

One Parametric Map per analysed image holds the maps of every finding the
model scores, one frame each (a channel with its own Real World Value
Mapping, whose LUT Label names the finding), in the model's label order.
Each is stored at the CAM's own resolution (the model's feature-map grid over
the radiograph: 7 x 7 for DenseNet121 at 224 px), as float32: a few kilobytes
for all fourteen, where one map on the radiograph's own grid took megabytes.
A viewer interpolates them over the image; the geometry says exactly where
each cell lies.

A chest radiograph (CR, DX, or DX in a Secondary Capture) has no Frame of
Reference, while the Parametric Map IOD as dciodvfy checks it requires one,
with Pixel Measures, Plane Orientation and Plane Position functional groups.
So the map gets a Frame of Reference of its own, shared with no other
object, in which the radiograph's first pixel centre is the origin: rows and
columns run along the source's Patient Orientation (else the conventional
frontal chest display: rows towards the patient's left, columns towards the
feet), the radiograph's pixel spacing is its Pixel Spacing, else its Imager
Pixel Spacing (at the detector, so larger than the anatomy by the geometric
magnification), else 1 mm. A map cell spans (source rows / map rows) x
(source columns / map columns) radiograph pixels, so its spacing is that
multiple of the radiograph's, and its first cell centre lies half a cell in
from the radiograph's corner. The Derivation Image Sequence names the
radiograph (Spatial Locations Preserved NO: another grid over the same
area); the Derivation Description says which geometry the source stated and
which is assumed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import highdicom as hd
import numpy as np
import pydicom

from triage_core.values import AlgorithmInfo, ImageResult

from .equipment import contributing_equipment
from .headers import copy_patient_and_study, header_view, instance_number, patient_orientation, pixel_spacing
from .headers import set_lossy_attributes
from .render import DEMO_WARNING, NOT_FOR_DIAGNOSTIC_USE
from .sc import series_description, shown_findings
from .uids import image_key, result_uid

__all__ = ["ALL_FINDINGS", "PARAMETRIC_MAP_SERIES_NUMBER", "build_parametric_maps", "parametric_maps_by_finding",
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
    cams: Sequence[tuple[str, np.ndarray]],
    series_instance_uid: str,
    series_number: int,
    sop_instance_uid: str,
    frame_of_reference_uid: str,
    instance_number: int,
    manufacturer: str,
    manufacturer_model_name: str,
    software_versions: str,
    device_serial_number: str,
    content_description: str,
    series_description: str,
    contributing_equipment: Sequence[hd.ContributingEquipment],
) -> hd.pm.ParametricMap:
    """A float32 Parametric Map of `cams`, (name, map) pairs: maps over the whole of `source` on one
    grid of their own, a frame (channel) each, named by its Real World Value Mapping.

    Args:
        source: header of the radiograph (Rows, Columns, UIDs, geometry);
            not changed. Patient and study identity and the character set
            are the caller's to copy (`copy_patient_and_study`).
        cams: (finding name, 2-D map with values in [0, 1] over the whole
            radiograph, on a grid of its own no finer than the radiograph's),
            all of one shape: stored as they are.

    Raises:
        ValueError: no map, maps of different shapes, or a map that is not 2-D.
    """
    if not cams:
        raise ValueError("a parametric map needs at least one map")
    shapes = {np.shape(cam) for _, cam in cams}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2 or min(next(iter(shapes))) < 1:
        raise ValueError(f"cams must be 2-D maps of one shape, got shapes {sorted(shapes)}")
    values = np.stack([np.asarray(cam, dtype=np.float32) for _, cam in cams], axis=-1)[None]  # (1, r, c, channels)
    # Into [0, 1] in two passes: fmax maps NaN (and -inf) to 0, minimum +inf to 1.
    values = np.fmax(values, np.float32(0.0))
    np.minimum(values, np.float32(1.0), out=values)
    rows, columns = int(source.Rows), int(source.Columns)
    map_rows, map_columns = values.shape[1:3]
    if map_rows > rows or map_columns > columns:
        raise ValueError(f"a {map_columns}x{map_rows} map is finer than its {columns}x{rows} radiograph")

    stated_spacing = pixel_spacing(source)
    row_spacing, column_spacing = stated_spacing[0] if stated_spacing else (1.0, 1.0)
    orientation = patient_orientation(source)
    row_direction, column_direction = (np.asarray(_DIRECTIONS[letter]) for letter in (orientation or ("L", "F")))
    # The radiograph's grid in the map's own frame: first pixel centre at the origin.
    view = header_view(source)
    view.FrameOfReferenceUID = frame_of_reference_uid
    view.PositionReferenceIndicator = None
    view.ImagePositionPatient = [0.0, 0.0, 0.0]
    view.ImageOrientationPatient = [*map(float, row_direction), *map(float, column_direction)]
    view.PixelSpacing = [row_spacing, column_spacing]
    view.SliceThickness = None
    # The map's grid: cells of (rows / map_rows) x (columns / map_columns) source pixels.
    cell_rows, cell_columns = rows / map_rows, columns / map_columns
    first_centre = ((cell_columns - 1) / 2 * column_spacing) * row_direction + \
        ((cell_rows - 1) / 2 * row_spacing) * column_direction
    pixel_measures = hd.PixelMeasuresSequence(
        pixel_spacing=[row_spacing * cell_rows, column_spacing * cell_columns], slice_thickness=None)
    plane_orientation = hd.PlaneOrientationSequence(
        coordinate_system="PATIENT", image_orientation=[*map(float, row_direction), *map(float, column_direction)])
    plane_positions = [hd.PlanePositionSequence(
        coordinate_system="PATIENT", image_position=[float(v) for v in first_centre])]

    mappings = [
        [hd.pm.RealWorldValueMapping(
            lut_label=name[:16],
            lut_explanation=f"Class activation map of {name} (relative relevance 0-1)"[:64],
            unit=_UNITLESS,
            value_range=(0.0, 1.0),
            slope=1.0,
            intercept=0.0,
        )]
        for name, _ in cams
    ]
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
        real_world_value_mappings=mappings,
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.5, window_width=1.0)],
        content_label="CAM",
        content_description=content_description,
        content_qualification=hd.ContentQualificationValues.RESEARCH,
        image_flavor=hd.pm.ImageFlavorValues.VOLUME,
        derived_pixel_contrast=hd.pm.DerivedPixelContrastValues.NONE,
        series_description=series_description,
        contributing_equipment=contributing_equipment,
        pixel_measures=pixel_measures,
        plane_orientation=plane_orientation,
        plane_positions=plane_positions,
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
        f"Class activation maps of the source radiograph, frame n for finding n of "
        f"{', '.join(name for name, _ in cams)}, at the model's own resolution ({map_columns}x{map_rows} "
        f"cells over its {columns}x{rows} pixels); the Frame of Reference belongs to these maps only, with the "
        f"radiograph's first pixel centre at its origin; {spacing_note}; {orientation_note}"
    )[:1024]
    return pm


def build_parametric_maps(
    source: pydicom.Dataset,
    result: ImageResult,
    cams: Mapping[str, np.ndarray],
    algorithm: AlgorithmInfo,
) -> list[pydicom.Dataset]:
    """The Parametric Map of the CAMs of one image; see `parametric_maps_by_finding`."""
    return [image for _, image in parametric_maps_by_finding(source, result, cams, algorithm)]


#: What a result row names as the finding of the map that holds every finding's map.
ALL_FINDINGS = "all"


def parametric_maps_by_finding(
    source: pydicom.Dataset,
    result: ImageResult,
    cams: Mapping[str, np.ndarray],
    algorithm: AlgorithmInfo,
) -> list[tuple[str, pydicom.Dataset]]:
    """[("all", map)]: one Parametric Map of the image with a frame per finding of `result`, in its
    order (the model's labels), each the float32 CAM as given (the model's own resolution over the
    radiograph, see the module docstring) with a Real World Value Mapping that states its meaning:
    the finding, relative relevance 0 to 1, no units.

    Raises:
        ValueError: mismatching SOP Instance UID, no findings, or a missing CAM.
    """
    shown_findings(source, result, cams, "build_parametric_maps")
    missing = [f.finding for f in result.findings if f.finding not in cams]
    if missing:
        raise ValueError(f"build_parametric_maps: no CAM for finding(s) {', '.join(missing)}")
    key = image_key(result)
    # LO, 64 characters: the warnings first, so that they are never cut.
    description = (NOT_FOR_DIAGNOSTIC_USE + ("; DEMO WEIGHTS" if algorithm.demo else "")
                   + f"; CAMs of {len(result.findings)} findings")
    pm = projection_parametric_map(
        source=source,
        cams=[(f.finding, cams[f.finding]) for f in result.findings],
        series_instance_uid=result_uid(str(source.StudyInstanceUID), algorithm, "parametric-map-series"),
        series_number=PARAMETRIC_MAP_SERIES_NUMBER,
        sop_instance_uid=result_uid(key, algorithm, "parametric-map"),
        frame_of_reference_uid=result_uid(key, algorithm, "parametric-map-frame-of-reference"),
        instance_number=instance_number(source, 1),
        manufacturer=algorithm.manufacturer,
        manufacturer_model_name=algorithm.name,
        software_versions=algorithm.version,
        device_serial_number=algorithm.weights_sha256,
        content_description=description[:64],
        series_description=series_description(algorithm),
        contributing_equipment=[contributing_equipment(algorithm)],
    )
    copy_patient_and_study(source, pm)
    pm.BodyPartExamined = "CHEST"  # see sc.heatmaps_by_finding
    set_lossy_attributes(source, pm)
    scores = "; ".join(f"{f.finding} {f.probability:.4f} (threshold {f.threshold:.4f}"
                       f"{', POSITIVE' if f.present else ''})" for f in result.findings)
    pm.ImageComments = (f"Frames in this order: {scores}; {NOT_FOR_DIAGNOSTIC_USE}"
                        + (f"; {DEMO_WARNING}" if algorithm.demo else ""))[:10240]
    return [(ALL_FINDINGS, pm)]
