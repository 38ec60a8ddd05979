"""The frame header of compressed pixel data, read without decoding.

A compressed frame states its own size: the SOF segment of JPEG (ISO/IEC
10918-1 B.2.2) and JPEG-LS (ISO/IEC 14495-1 C.2.2, SOF55), the SIZ segment
of JPEG 2000 and HTJ2K (ISO/IEC 15444-1 A.5.1). A decoder allocates what
the stream says, not what Rows and Columns say, so a frame that claims
12000 x 12000 in a 512 x 512 image costs hundreds of megabytes before any
check on the decoded array could run. `frame_header` reads those few bytes
so that the size is checked first. RLE (PS3.5 G) states no size of its
own: its decoder fills the Rows x Columns the dataset declares.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pydicom.uid import UID

__all__ = ["CodestreamError", "FrameHeader", "frame_header"]

_JPEG_SYNTAXES = frozenset({
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
})
_JPEG_LS_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"})
_J2K_SYNTAXES = frozenset({
    "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.92", "1.2.840.10008.1.2.4.93",
    "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203",
})
_RLE = "1.2.840.10008.1.2.5"

# Start-of-frame markers: SOF0-3, 5-7, 9-11, 13-15 (10918-1 Table B.1) and SOF55 (14495-1).
_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7})
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD9)})  # TEM, RSTn, SOI
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"


class CodestreamError(ValueError):
    """The frame's own header is missing or malformed."""


@dataclass(frozen=True)
class FrameHeader:
    """What a compressed frame says about itself."""

    rows: int
    columns: int
    components: int
    bits: int
    codec: str


def frame_header(frame: bytes, transfer_syntax_uid: str) -> FrameHeader | None:
    """The header of one compressed frame, or None for syntaxes whose streams
    state no size (RLE) and for native (uncompressed) syntaxes.

    Raises:
        CodestreamError: the frame does not start like a stream of its syntax
            or its header is cut short.
    """
    syntax = str(UID(transfer_syntax_uid))
    if syntax in _JPEG_SYNTAXES:
        return _jpeg(frame, "JPEG")
    if syntax in _JPEG_LS_SYNTAXES:
        return _jpeg(frame, "JPEG-LS")
    if syntax in _J2K_SYNTAXES:
        return _j2k(frame)
    return None


def _jpeg(data: bytes, codec: str) -> FrameHeader:
    if data[:2] != b"\xff\xd8":
        raise CodestreamError(f"{codec} frame does not start with an SOI marker")
    position, end = 2, len(data)
    while position < end:
        if data[position] != 0xFF:
            raise CodestreamError(f"{codec} frame: expected a marker at byte {position}")
        while position < end and data[position] == 0xFF:  # fill bytes
            position += 1
        if position >= end:
            break
        marker = data[position]
        position += 1
        if marker in _STANDALONE:
            continue
        if position + 2 > end:
            break
        (length,) = struct.unpack(">H", data[position:position + 2])
        if marker in _SOF_MARKERS:
            if length < 8 or position + 8 > end:
                break
            bits, rows, columns, components = struct.unpack(">BHHB", data[position + 2:position + 8])
            return FrameHeader(rows, columns, components, bits, codec)
        if marker in (0xDA, 0xD9):  # SOS or EOI before any SOF
            raise CodestreamError(f"{codec} frame has no start-of-frame segment before its scan")
        position += length
    raise CodestreamError(f"{codec} frame header is cut short (no start-of-frame segment)")


def _j2k(data: bytes) -> FrameHeader:
    codestream = _jp2_codestream(data) if data.startswith(_JP2_SIGNATURE) else data
    if codestream[:4] != b"\xff\x4f\xff\x51":
        raise CodestreamError("JPEG 2000 frame does not start with SOC and SIZ markers")
    if len(codestream) < 4 + 38 + 1:
        raise CodestreamError("JPEG 2000 SIZ segment is cut short")
    (_, _, xsiz, ysiz, xosiz, yosiz, _, _, _, _, csiz) = struct.unpack(">HHIIIIIIIIH", codestream[4:4 + 38])
    if xsiz <= xosiz or ysiz <= yosiz or csiz < 1:
        raise CodestreamError("JPEG 2000 SIZ segment states an empty image")
    bits = (codestream[42] & 0x7F) + 1
    return FrameHeader(ysiz - yosiz, xsiz - xosiz, csiz, bits, "JPEG 2000")


def _jp2_codestream(data: bytes) -> bytes:
    """The contiguous codestream box of a JP2 file (not conformant in DICOM, but seen)."""
    position = 0
    while position + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        header = 8
        if length == 1 and position + 16 <= len(data):
            (length,) = struct.unpack(">Q", data[position + 8:position + 16])
            header = 16
        if kind == b"jp2c":
            return data[position + header:position + length if length else len(data)]
        if length < header:
            break
        position += length
    raise CodestreamError("JP2 file without a codestream box")
