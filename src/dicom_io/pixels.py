"""Greyscale radiograph pixels as displayed, ready for the model and overlays.

The grayscale pipeline of PS3.3 C.11 (see also PS3.4 N.2.1):

    stored values -> Modality LUT -> VOI LUT -> Presentation LUT -> P-values

`display_array` runs it for single-frame MONOCHROME1/2 images and returns the
P-values scaled to [0, 1] (1 = brightest as displayed: bone white, air black).
Whatever it cannot show faithfully it refuses with `PixelRefused`, whose
message says why in words a PACS administrator understands. It never raises
anything else for bad input.

Decoding is bounded: the header's size is checked against a pixel budget,
and a compressed frame's own header (`codestream`) against Rows and Columns,
before any decoder runs. `pixel_data_problem` is the part of that check that
needs no decoder at all; the DICOM node uses it to refuse inconsistent pixel
data (a truncated native image, a frame larger than the image) on receipt.
"""

from __future__ import annotations

import numpy as np
import pydicom
from pydicom.encaps import generate_frames
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from .codestream import CodestreamError, frame_header

__all__ = ["PixelRefused", "display_array", "pixel_data_problem", "pixel_data_problem_in_file", "read_header"]

_GREYSCALE = ("MONOCHROME1", "MONOCHROME2")
_PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


class PixelRefused(Exception):
    """The pixel data of a dataset cannot be analysed; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def display_array(ds: pydicom.Dataset, *, max_megapixels: float = 50.0) -> np.ndarray:
    """Return the image as displayed: 2-D float32 in [0, 1], 1 = brightest.

    Steps: decode (native or any compressed syntax pydicom's plugins handle:
    pylibjpeg, openjpeg, libjpeg, GDCM), Modality LUT (rescale or LUT
    sequence), VOI LUT (the first window when several are given, or the first
    VOI LUT sequence item), then the inversion that MONOCHROME1 or a
    Presentation LUT Shape of INVERSE asks for (applied once, after the
    LUTs). The result is scaled over the output range of the VOI
    transformation (the window), not over the data's own minimum and maximum,
    so that two encodings of the same displayed image give the same array.
    Without any VOI transformation the modality values' own range is used.

    Raises:
        PixelRefused: colour or palette images, multi-frame images, missing or
            undecodable pixel data, more than `max_megapixels`, more than 16
            bits per sample, or inconsistent image pixel attributes.
    """
    if max_megapixels <= 0:
        raise ValueError("max_megapixels must be positive")
    _check_header(ds, max_megapixels)
    problem = pixel_data_problem(ds)
    if problem:
        raise PixelRefused(problem)

    try:
        stored = _decodable(ds).pixel_array
    except Exception as exc:  # any decoder failure: missing plugin, corrupt stream
        raise PixelRefused(
            f"pixel data could not be decoded (transfer syntax {_transfer_syntax_name(ds)}): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if stored.ndim != 2:
        raise PixelRefused(f"decoded pixel data has shape {stored.shape}, expected one 2-D frame")

    try:
        values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
        windowed, low, high = _apply_voi(values, ds)
    except PixelRefused:
        raise
    except Exception as exc:  # malformed LUT descriptors, bad window values, ...
        raise PixelRefused(f"grayscale transformation failed: {type(exc).__name__}: {exc}") from exc

    if not (np.isfinite(low) and np.isfinite(high)) or high == low:
        # A flat image (or an empty window range) has no contrast to show.
        out = np.zeros(windowed.shape, dtype=np.float32)
    else:
        out = ((windowed - low) / (high - low)).astype(np.float32)
        np.clip(out, 0.0, 1.0, out=out)
    if _inverted(ds):
        out = 1.0 - out
    return np.ascontiguousarray(out, dtype=np.float32)


def _check_header(ds: pydicom.Dataset, max_megapixels: float) -> None:
    """Refuse from the header alone, before spending time on decoding."""
    if not any(keyword in ds for keyword in _PIXEL_DATA_KEYWORDS):
        raise PixelRefused("no pixel data in the dataset")
    if "PixelData" not in ds:
        raise PixelRefused("float pixel data (parametric maps) is not a radiograph")
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if not photometric:
        raise PixelRefused("Photometric Interpretation is missing")
    if photometric not in _GREYSCALE:
        raise PixelRefused(
            f"photometric interpretation {photometric} is not greyscale; "
            "only MONOCHROME1/MONOCHROME2 radiographs are analysed"
        )
    samples = _int_attr(ds, "SamplesPerPixel", 1)
    if samples != 1:
        raise PixelRefused(f"{samples} samples per pixel; a greyscale radiograph has 1")
    frames = _int_attr(ds, "NumberOfFrames", 1)
    if frames > 1:
        raise PixelRefused(f"multi-frame image ({frames} frames); only single-frame radiographs are analysed")
    rows, columns = _int_attr(ds, "Rows", 0), _int_attr(ds, "Columns", 0)
    if rows <= 0 or columns <= 0:
        raise PixelRefused(f"image size {rows}x{columns} is missing or empty")
    megapixels = rows * columns / 1e6
    if megapixels > max_megapixels:
        raise PixelRefused(
            f"image of {columns}x{rows} ({megapixels:.1f} megapixels) is larger than "
            f"the limit of {max_megapixels:g} megapixels"
        )
    bits_allocated = _int_attr(ds, "BitsAllocated", 0)
    bits_stored = _int_attr(ds, "BitsStored", bits_allocated)
    if bits_allocated > 16 or bits_stored > 16:
        raise PixelRefused(
            f"{bits_stored} bits stored in {bits_allocated} allocated; at most 16 bits are supported"
        )
    if bits_allocated not in (8, 16):
        raise PixelRefused(f"{bits_allocated} bits allocated; 8 or 16 are supported")
    if not 1 <= bits_stored <= bits_allocated:
        raise PixelRefused(f"Bits Stored {bits_stored} is inconsistent with Bits Allocated {bits_allocated}")


def pixel_data_problem(ds: pydicom.Dataset, transfer_syntax_uid: str | None = None) -> str | None:
    """Why the pixel data of `ds` contradicts the dataset's own header, or None.

    Native pixel data must hold Rows x Columns x Samples x Frames values of
    Bits Allocated; the first frame of compressed pixel data must state in
    its own header the Rows, Columns and Samples per Pixel of the dataset.
    Nothing is decoded. `transfer_syntax_uid` defaults to the file meta's
    (or, without one, the encoding the dataset was read with).
    `pixel_data_problem_in_file` makes the same check on a file without
    reading its pixel data into memory.
    """
    if "PixelData" not in ds:
        return None
    syntax = transfer_syntax_uid or _stated_syntax(ds)
    geometry = _geometry(ds)
    if isinstance(geometry, str):
        return geometry
    element = ds["PixelData"]
    if syntax is None or not UID(syntax).is_compressed:
        value = element.value
        return _native_problem(len(value) if value is not None else 0, geometry)
    try:
        first = next(generate_frames(element.value, number_of_frames=geometry[3]))
    except StopIteration:
        return "encapsulated pixel data holds no frame"
    except Exception as exc:  # malformed items or offsets
        return f"encapsulated pixel data cannot be parsed: {type(exc).__name__}: {exc}"
    return _frame_problem(first, syntax, geometry)


def read_header(path) -> tuple[pydicom.Dataset, int]:
    """The data set of a DICOM file up to its Pixel Data, and the offset where Pixel Data (or the
    end of the file) begins: what `pixel_data_problem_in_file` and the DICOM node read once."""
    with open(path, "rb") as handle:
        ds = pydicom.dcmread(handle, stop_before_pixels=True, force=True)
        return ds, handle.tell()


def pixel_data_problem_in_file(path, transfer_syntax_uid: str | None = None, *,
                               header: tuple[pydicom.Dataset, int] | None = None) -> str | None:
    """`pixel_data_problem` for a DICOM file, reading only its header and, for
    compressed pixel data, its first frame: a data set of any size is checked
    without holding it in memory (the DICOM node streams C-STOREs to disk).
    `header` is `read_header(path)` when the caller has it already.

    Raises:
        Exception: whatever pydicom raises for a header it cannot parse.
    """
    ds, offset = header if header is not None else read_header(path)
    with open(path, "rb") as handle:
        size = handle.seek(0, 2)
        syntax = transfer_syntax_uid or _stated_syntax(ds)
        handle.seek(offset)
        head = handle.read(12)
        if len(head) < 8 or head[:4] != b"\xe0\x7f\x10\x00":  # (7FE0,0010) little endian
            return None
        implicit = (syntax == ImplicitVRLittleEndian) if syntax else ds.original_encoding[0] is True
        if implicit:
            length, value_start = int.from_bytes(head[4:8], "little"), offset + 8
        else:
            if len(head) < 12:
                return "Pixel Data element header is cut short"
            length, value_start = int.from_bytes(head[8:12], "little"), offset + 12
        geometry = _geometry(ds)
        if isinstance(geometry, str):
            return geometry
        if syntax is None or not UID(syntax).is_compressed:
            if length == 0xFFFFFFFF:
                return "native pixel data has an undefined length"
            return _native_problem(min(length, max(0, size - value_start)), geometry)
        handle.seek(value_start)
        try:
            first = next(generate_frames(handle, number_of_frames=geometry[3]))
        except StopIteration:
            return "encapsulated pixel data holds no frame"
        except Exception as exc:  # malformed items or offsets
            return f"encapsulated pixel data cannot be parsed: {type(exc).__name__}: {exc}"
        return _frame_problem(first, syntax, geometry)


def _geometry(ds: pydicom.Dataset) -> tuple[int, int, int, int, int] | str:
    """(rows, columns, samples, frames, bits allocated), or why they cannot be used."""
    try:
        rows, columns = _int_attr(ds, "Rows", 0), _int_attr(ds, "Columns", 0)
        samples = _int_attr(ds, "SamplesPerPixel", 1)
        frames = max(1, _int_attr(ds, "NumberOfFrames", 1))
        bits = _int_attr(ds, "BitsAllocated", 0)
    except PixelRefused as exc:
        return exc.reason
    if rows <= 0 or columns <= 0 or bits <= 0:
        return f"image pixel attributes are missing (Rows {rows}, Columns {columns}, Bits Allocated {bits})"
    return rows, columns, samples, frames, bits


def _native_problem(size: int, geometry: tuple[int, int, int, int, int]) -> str | None:
    rows, columns, samples, frames, bits = geometry
    needed = (rows * columns * samples * frames * bits + 7) // 8
    if size < needed:
        return (f"truncated pixel data: {size} of {needed} bytes ({columns}x{rows} pixels x {samples} "
                f"sample(s) x {frames} frame(s) at {bits} bits)")
    return None


def _frame_problem(first: bytes, syntax: str, geometry: tuple[int, int, int, int, int]) -> str | None:
    rows, columns, samples = geometry[:3]
    try:
        header = frame_header(first, syntax)
    except CodestreamError as exc:
        return f"compressed frame ({UID(syntax).name}): {exc}"
    if header is None:
        return None
    if (header.rows, header.columns) != (rows, columns):
        return f"{header.codec} frame is {header.columns}x{header.rows} but Rows/Columns say {columns}x{rows}"
    if header.components != samples:
        return f"the {header.codec} frame has {header.components} component(s) but Samples per Pixel is {samples}"
    return None


def _stated_syntax(ds: pydicom.Dataset) -> str | None:
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax:
        return str(syntax)
    implicit_vr, little_endian = getattr(ds, "original_encoding", (None, None))
    if implicit_vr is None:
        return None
    return str(ImplicitVRLittleEndian if implicit_vr else ExplicitVRLittleEndian)


def _int_attr(ds: pydicom.Dataset, keyword: str, default: int) -> int:
    value = ds.get(keyword, None)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise PixelRefused(f"{keyword} {value!r} is not an integer") from exc


def _decodable(ds: pydicom.Dataset) -> pydicom.Dataset:
    """`ds`, or a shallow copy that states the transfer syntax it was read with.

    A dataset read with ``dcmread(force=True)`` from a file without a Part 10
    header has no Transfer Syntax UID, which pydicom needs to decode; the
    encoding it was parsed with says which native syntax it is. The caller's
    dataset is left unchanged.
    """
    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID"):
        return ds
    implicit_vr, little_endian = getattr(ds, "original_encoding", (None, None))
    if implicit_vr is None or little_endian is None:
        raise PixelRefused("transfer syntax is not stated and cannot be inferred")
    if not little_endian:
        raise PixelRefused("big endian pixel data is not supported")
    # Element by element: Dataset(ds) would share the element dictionary.
    copy = pydicom.Dataset()
    for element in ds:
        copy.add(element)
    copy.file_meta = pydicom.dataset.FileMetaDataset()
    for element in meta if meta is not None else ():
        copy.file_meta.add(element)
    copy.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit_vr else ExplicitVRLittleEndian
    return copy


def _transfer_syntax_name(ds: pydicom.Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    return f"{uid.name} ({uid})" if uid else "not stated"


def _apply_voi(values: np.ndarray, ds: pydicom.Dataset) -> tuple[np.ndarray, float, float]:
    """Apply the VOI LUT; return the result and its output range (low, high).

    The range is that of the transformation, not of the data: for a window it
    is the [y_min, y_max] that pydicom's windowing maps to (PS3.3
    C.11.2.1.2), for a VOI LUT sequence [0, 2^n - 1] with n the bits per
    entry (PS3.3 C.11.2.1.1).
    """
    if ds.get("VOILUTSequence"):
        item = ds.VOILUTSequence[0]
        # A LUT is indexed by integers; modality output is integral unless a
        # fractional rescale made it otherwise (then pydicom truncates).
        indices = np.floor(values).astype(np.int64)
        windowed = np.asarray(apply_voi_lut(indices, ds, index=0, prefer_lut=True), dtype=np.float64)
        return windowed, 0.0, float(2 ** _lut_output_bits(item) - 1)
    if "WindowCenter" in ds and "WindowWidth" in ds and _window_values_present(ds):
        windowed = np.asarray(apply_voi_lut(values, ds, index=0, prefer_lut=False), dtype=np.float64)
        low, high = _window_output_range(ds)
        return windowed, low, high
    # No VOI transformation: identity, scaled over the data's own range,
    # leaving out Pixel Padding Value (the collimator blank some CR/DX write).
    padding = _padding_mask(ds, values)
    sample = values[~padding] if padding is not None and (~padding).any() else values
    return values, float(sample.min()), float(sample.max())


def _window_values_present(ds: pydicom.Dataset) -> bool:
    center, width = ds["WindowCenter"], ds["WindowWidth"]
    return center.VM >= 1 and width.VM >= 1 and center.value not in (None, "") and width.value not in (None, "")


def _window_output_range(ds: pydicom.Dataset) -> tuple[float, float]:
    """The output range pydicom's `apply_windowing` maps a window onto."""
    bits_stored = int(ds.BitsStored)
    if ds.get("ModalityLUTSequence"):
        y_min, y_max = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    elif int(ds.get("PixelRepresentation", 0)) == 0:
        y_min, y_max = 0.0, float(2**bits_stored - 1)
    else:
        y_min, y_max = float(-(2 ** (bits_stored - 1))), float(2 ** (bits_stored - 1) - 1)
    slope, intercept = ds.get("RescaleSlope", None), ds.get("RescaleIntercept", None)
    if slope is not None and intercept is not None:
        y_min, y_max = y_min * float(slope) + float(intercept), y_max * float(slope) + float(intercept)
    # With a negative slope pydicom's y_range is negative; (x - y_min) / y_range
    # is still the window's fraction, so return the pair in pydicom's order.
    return y_min, y_max


def _lut_output_bits(item: pydicom.Dataset) -> int:
    """Bits of a VOI LUT's output: the descriptor's, unless the entries need
    fewer (a 12-bit LUT declared as 16 bits is common; DCMTK makes the same
    correction)."""
    declared = int(item.LUTDescriptor[2])
    if not 8 <= declared <= 16:
        raise PixelRefused(f"VOI LUT with {declared} bits per entry; 8 to 16 are supported")
    needed = max(1, int(_lut_entries(item).max()).bit_length())
    return needed if needed in (8, 10, 12) and needed < declared else declared


def _lut_entries(item: pydicom.Dataset) -> np.ndarray:
    descriptor = [int(v) for v in item.LUTDescriptor]
    entries = descriptor[0] or 2**16
    element = item["LUTData"]
    if isinstance(element.value, (bytes, bytearray)):
        # OW: 16 bits an entry whatever the nominal depth, as pydicom reads it;
        # only little-endian transfer syntaxes are accepted by this node.
        data = np.frombuffer(bytes(element.value[: 2 * entries]), dtype="<u2")
    else:
        data = np.atleast_1d(np.asarray(element.value, dtype=np.int64))
    data = data[:entries]
    if data.size == 0:
        raise PixelRefused("VOI LUT sequence has no LUT data")
    return data


def _padding_mask(ds: pydicom.Dataset, values: np.ndarray) -> np.ndarray | None:
    if "PixelPaddingValue" not in ds or ds.get("ModalityLUTSequence"):
        return None
    try:
        padding = float(ds.PixelPaddingValue)
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
    except (TypeError, ValueError):
        return None
    return values == padding * slope + intercept


def _inverted(ds: pydicom.Dataset) -> bool:
    """Whether the displayed image is the inverse of the VOI output.

    MONOCHROME1 means "minimum value is white". In the DX, MG and IO IODs a
    Presentation LUT Shape of INVERSE is required exactly for MONOCHROME1
    images (PS3.3 C.8.11.1.1): both state the same single inversion, so the
    two are never applied twice. INVERSE on a MONOCHROME2 image inverts it.
    """
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    shape = str(ds.get("PresentationLUTShape", "") or "").strip().upper()
    return photometric == "MONOCHROME1" or shape == "INVERSE"
