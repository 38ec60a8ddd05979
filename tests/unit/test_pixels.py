"""dicom_io.pixels: the displayed radiograph, checked on real files.

Mostly metamorphic: two encodings of the same displayed image must give the
same array, whatever the photometric interpretation, LUTs or compression.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, RLELossless

from dicom_io.pixels import PixelRefused, display_array
from tests.conftest import need

DATA = Path(__file__).resolve().parents[1] / "data"
CXR_FILES = sorted((DATA / "cxr_dicom").glob("*.dcm"))
CR_MONO1 = DATA / "cxr_dicom" / "cr_chest_pa_mono1_10bit_explicit_le.dcm"
CR_MONO1_RAW = DATA / "cxr_dicom" / "cr_chest_pa_mono1_10bit_no_part10_header.dcm"
RG1_J2K = DATA / "cxr_dicom" / "cr_chest_pa_mono1_15bit_j2k_lossy.dcm"
NIH = DATA / "cxr_dicom" / "nih_00000001_000_cardiomegaly.dcm"
DOG = DATA / "not_cxr_dicom" / "dx_dog_thorax_lateral.dcm"


def _read(path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(path, force=True)


def _with_pixels(ds: pydicom.Dataset, array: np.ndarray) -> pydicom.Dataset:
    """A copy of `ds` whose native pixel data is `array`."""
    out = copy.deepcopy(ds)
    out.PixelData = np.ascontiguousarray(array).astype(ds.pixel_array.dtype).tobytes()
    return out


def test_reference_files_are_present() -> None:
    assert len(CXR_FILES) == 7


@pytest.mark.parametrize("path", CXR_FILES, ids=lambda p: p.name)
def test_real_chest_radiograph_is_displayed_in_unit_range(path: Path) -> None:
    array = display_array(_read(path))
    assert array.ndim == 2 and array.dtype == np.float32
    assert array.shape == (_read(path).Rows, _read(path).Columns)
    assert 0.0 <= float(array.min()) and float(array.max()) <= 1.0
    assert float(array.max()) - float(array.min()) > 0.5  # real contrast, not a flat image


@pytest.mark.parametrize("path", CXR_FILES, ids=lambda p: p.name)
def test_air_border_is_darker_than_mediastinum(path: Path) -> None:
    """Bone white, air black: the outer 5 % frame (air, collimation, soft
    tissue of the shoulders) is darker than the central vertical strip in the
    middle rows (mediastinum and spine). Fails for an inversion error."""
    array = display_array(_read(path))
    rows, columns = array.shape
    b = max(1, round(0.05 * min(rows, columns)))
    border = np.concatenate([array[:b].ravel(), array[-b:].ravel(), array[:, :b].ravel(), array[:, -b:].ravel()])
    mediastinum = array[int(0.35 * rows) : int(0.65 * rows), int(0.45 * columns) : int(0.55 * columns)]
    assert float(border.mean()) + 0.1 < float(mediastinum.mean())


def test_file_without_part10_header_reads_with_force_and_matches_the_part10_file() -> None:
    raw = pydicom.dcmread(CR_MONO1_RAW, force=True)
    assert "TransferSyntaxUID" not in raw.file_meta
    np.testing.assert_array_equal(display_array(raw), display_array(_read(CR_MONO1)))
    assert "TransferSyntaxUID" not in raw.file_meta  # the caller's dataset is left as it was


def test_monochrome1_and_its_inverted_monochrome2_twin_display_the_same() -> None:
    mono1 = _read(CR_MONO1)
    assert mono1.PhotometricInterpretation == "MONOCHROME1" and mono1.BitsStored == 10
    top = 2**mono1.BitsStored - 1
    twin = _with_pixels(mono1, top - mono1.pixel_array.astype(np.int32))
    twin.PhotometricInterpretation = "MONOCHROME2"
    # The LINEAR window of PS3.3 C.11.2.1.2.1 centres on c - 0.5: the window
    # that shows x' = top - x as 1 - window(x) is centred on top + 1 - c.
    twin.WindowCenter = top + 1 - float(mono1.WindowCenter)
    np.testing.assert_allclose(display_array(twin), display_array(mono1), atol=1e-6)


def test_monochrome1_twin_without_window_displays_the_same() -> None:
    mono1 = _read(CR_MONO1)
    del mono1.WindowCenter, mono1.WindowWidth
    twin = _with_pixels(mono1, 1023 - mono1.pixel_array.astype(np.int32))
    twin.PhotometricInterpretation = "MONOCHROME2"
    np.testing.assert_allclose(display_array(twin), display_array(mono1), atol=1e-6)


def test_window_bounds_not_data_range_set_the_scale() -> None:
    """A window maps to the same grey whatever else is in the image."""
    ds = _read(CR_MONO1)
    stored = ds.pixel_array.copy()
    marked = stored.copy()
    marked[:5, :5] = 0  # a burned-in black corner outside the window
    a, b = display_array(ds), display_array(_with_pixels(ds, marked))
    np.testing.assert_array_equal(a[10:, 10:], b[10:, 10:])


def test_rescale_is_applied_before_the_window() -> None:
    ds = _read(CR_MONO1)
    shifted = _with_pixels(ds, ds.pixel_array.astype(np.int32) + 100)
    shifted.BitsStored, shifted.HighBit = 11, 10
    shifted.RescaleSlope, shifted.RescaleIntercept = 1, -100
    np.testing.assert_allclose(display_array(shifted), display_array(ds), atol=1e-3)


def test_voi_lut_sequence_is_used_like_the_equivalent_window() -> None:
    ds = _read(CR_MONO1)
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    x = np.arange(1024, dtype=np.float64)
    fraction = np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
    lut = pydicom.Dataset()
    lut.LUTDescriptor = [1024, 0, 16]
    lut.LUTData = np.round(fraction * 65535).astype("<u2").tobytes()
    with_lut = copy.deepcopy(ds)
    del with_lut.WindowCenter, with_lut.WindowWidth
    with_lut.VOILUTSequence = [lut]
    with_lut["VOILUTSequence"][0]["LUTData"].VR = "OW"
    np.testing.assert_allclose(display_array(with_lut), display_array(ds), atol=1e-4)


def test_first_of_several_windows_is_used() -> None:
    ds = _read(CR_MONO1)
    several = copy.deepcopy(ds)
    several.WindowCenter = [ds.WindowCenter, 100]
    several.WindowWidth = [ds.WindowWidth, 50]
    np.testing.assert_array_equal(display_array(several), display_array(ds))


def test_lossless_rle_transcode_displays_the_same() -> None:
    ds = _read(CR_MONO1)
    expected = display_array(ds)
    ds.compress(RLELossless)
    assert ds.file_meta.TransferSyntaxUID == RLELossless
    np.testing.assert_array_equal(display_array(ds), expected)


def test_lossless_jpeg2000_transcode_displays_the_same() -> None:
    ds = _read(CR_MONO1)
    expected = display_array(ds)
    try:
        ds.compress(JPEG2000Lossless)
    except (RuntimeError, NotImplementedError, ValueError) as exc:
        need(False, f"no JPEG 2000 encoder (pylibjpeg-openjpeg is a project dependency): {exc}")
    np.testing.assert_array_equal(display_array(ds), expected)


def test_presentation_lut_shape_inverse_inverts_monochrome2() -> None:
    ds = _read(NIH)
    inverse = copy.deepcopy(ds)
    inverse.PresentationLUTShape = "INVERSE"
    np.testing.assert_allclose(display_array(inverse), 1.0 - display_array(ds), atol=1e-6)


def test_monochrome1_with_inverse_shape_is_inverted_once() -> None:
    """DX requires INVERSE exactly for MONOCHROME1: one inversion, not two."""
    dog = _read(DOG)
    assert dog.PhotometricInterpretation == "MONOCHROME1" and dog.PresentationLUTShape == "INVERSE"
    plain = copy.deepcopy(dog)
    del plain.PresentationLUTShape
    np.testing.assert_array_equal(display_array(dog), display_array(plain))


def test_jpeg2000_15_bit_is_decoded() -> None:
    ds = _read(RG1_J2K)
    array = display_array(ds)
    assert array.shape == (1955, 1841)


# --- refusals ------------------------------------------------------------------


def _refusal(ds: pydicom.Dataset, **kwargs) -> str:
    with pytest.raises(PixelRefused) as info:
        display_array(ds, **kwargs)
    assert str(info.value) == info.value.reason
    return info.value.reason


@pytest.mark.parametrize("photometric", ["RGB", "YBR_FULL", "PALETTE COLOR"])
def test_colour_photometric_is_refused(photometric: str) -> None:
    ds = _read(NIH)
    ds.PhotometricInterpretation = photometric
    reason = _refusal(ds)
    assert photometric in reason and "MONOCHROME" in reason


def test_multi_frame_is_refused() -> None:
    ds = _read(NIH)
    ds.NumberOfFrames = 2
    assert "multi-frame" in _refusal(ds) and "2 frames" in _refusal(ds)


def test_missing_pixel_data_is_refused() -> None:
    ds = _read(NIH)
    del ds.PixelData
    assert _refusal(ds) == "no pixel data in the dataset"


def test_too_many_megapixels_is_refused() -> None:
    reason = _refusal(_read(NIH), max_megapixels=0.5)
    assert "1.0 megapixels" in reason and "0.5" in reason


def test_more_than_16_bits_is_refused() -> None:
    ds = _read(NIH)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 31
    assert "at most 16 bits" in _refusal(ds)


def test_undecodable_pixel_data_is_refused_with_the_syntax_named() -> None:
    ds = _read(RG1_J2K)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 50]
    reason = _refusal(ds)
    assert reason.startswith("pixel data could not be decoded") and "JPEG 2000" in reason


def test_truncated_native_pixel_data_is_refused() -> None:
    ds = _read(NIH)
    ds.PixelData = ds.PixelData[:1000]
    assert _refusal(ds) == "truncated pixel data: 1000 of 1048576 bytes (1024x1024 pixels x 1 sample(s) x 1 frame(s) at 8 bits)"
