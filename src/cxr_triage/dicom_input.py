"""Reading a file for `cxr-triage predict` (DICOM through dicom_io's pixel path, else PNG/JPEG),
and drawing its heatmaps with dicom_io's renderer, the one the heatmap Secondary Capture uses.

DICOM files also bring the patient metadata a model trained with
``--metadata`` takes (PatientAge, PatientSex, ViewPosition); PNG/JPEG files
bring none, and such a model scores them with age, sex and view unknown.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

import cxr_model
from dicom_io.eligibility import check_eligibility
from dicom_io.pixels import PixelRefused, display_array
from dicom_io.render import HeatmapCaption
from dicom_io.render import render_heatmap as _render


def read_radiograph(path: Path) -> np.ndarray:
    return read_radiograph_and_metadata(path)[0]


def read_radiograph_and_metadata(path: Path) -> tuple[np.ndarray, cxr_model.ImageMetadata | None]:
    """The display-ready image and, for DICOM, its age/sex/view (None for PNG/JPEG)."""
    path = Path(path)
    if path.is_dir():
        raise cxr_model.ModelError("a directory, not an image file (name the files, e.g. DIR/*.dcm)")
    try:
        ds = pydicom.dcmread(path, force=path.suffix.lower() in {".dcm", ".dicom", ""})
        if "PixelData" not in ds and "SOPClassUID" not in ds:
            raise InvalidDicomError("not DICOM")
    except (InvalidDicomError, OSError, ValueError, TypeError, AttributeError):
        try:
            return cxr_model.load_image_file(path), None
        except cxr_model.ImageRefused as exc:
            # Not a radiograph we decline (a colour picture, a multi-frame file) but no image at all:
            # an error, so that `predict` exits non-zero.
            if exc.reason.startswith(("not a readable", "cannot decode")):
                raise cxr_model.ModelError("neither DICOM nor a readable PNG/JPEG image") from None
            raise
    eligibility = check_eligibility(ds)
    if not eligibility.eligible:
        raise cxr_model.ImageRefused(eligibility.reason)
    try:
        return display_array(ds), cxr_model.metadata_from_dicom(ds)
    except PixelRefused as exc:
        raise cxr_model.ImageRefused(str(exc)) from exc


def render_heatmap(image: np.ndarray, cam: np.ndarray, *, max_side: int | None = None, **caption: object) -> np.ndarray:
    """cxr_model's `HeatmapRenderer`: dicom_io's picture, with the legend of `caption`, at the
    heatmap display size (CXR_TRIAGE_HEATMAP_MAX_SIDE, as the service's heatmaps)."""
    if max_side is None:
        from triage_core.settings import Settings

        max_side = Settings().heatmap_max_side
    return _render(image, cam, HeatmapCaption(**caption), max_side)
