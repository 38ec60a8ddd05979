"""The per-C-STORE work pynetdicom does through pydicom, done with a few byte operations.

Measured with a handler that does nothing (one storescu association, 375 KB
CR instances): pynetdicom spent 0.59 ms encoding and sending each C-STORE-RSP
(the command set is encoded twice through pydicom) and 0.2 ms building and
writing the File Meta Information of each spooled data set, of 1.65 ms per
instance in all. These encoders write the same bytes (tests compare them with
pydicom's and pynetdicom's), and `SpoolFile` hashes the data set while it
arrives, so the SHA-256 the ingest needs costs no second read.
"""

from __future__ import annotations

import hashlib
import os
import struct
import tempfile
from typing import NamedTuple

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

_C_STORE_RSP = 0x8001
_NO_DATA_SET = 0x0101


def _implicit(group: int, element: int, value: bytes) -> bytes:
    return struct.pack("<HHL", group, element, len(value)) + value


def _uid(value: str) -> bytes:
    data = str(value).encode("ascii")
    return data + b"\x00" if len(data) % 2 else data


def encode_c_store_rsp(*, message_id: int, sop_class_uid: str, sop_instance_uid: str, status: int) -> bytes:
    """A C-STORE-RSP command set (PS3.7 9.3.1.2), implicit VR little endian, as pynetdicom encodes it."""
    body = b"".join((
        _implicit(0x0000, 0x0002, _uid(sop_class_uid)),
        _implicit(0x0000, 0x0100, struct.pack("<H", _C_STORE_RSP)),
        _implicit(0x0000, 0x0120, struct.pack("<H", message_id)),
        _implicit(0x0000, 0x0800, struct.pack("<H", _NO_DATA_SET)),
        _implicit(0x0000, 0x0900, struct.pack("<H", status)),
        _implicit(0x0000, 0x1000, _uid(sop_instance_uid)),
    ))
    return _implicit(0x0000, 0x0000, struct.pack("<L", len(body))) + body


class FileMeta(NamedTuple):
    """What pynetdicom's `create_file_meta` puts in a spooled data set's File Meta Information."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    implementation_uid: str = str(PYNETDICOM_IMPLEMENTATION_UID)
    implementation_version: str = PYNETDICOM_IMPLEMENTATION_VERSION


def create_file_meta(*, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, **_: object) -> FileMeta:
    return FileMeta(str(sop_class_uid), str(sop_instance_uid), str(transfer_syntax))


def _explicit(element: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH", 0x0002, element) + vr + b"\x00\x00" + struct.pack("<L", len(value)) + value
    return struct.pack("<HH", 0x0002, element) + vr + struct.pack("<H", len(value)) + value


def encode_file_meta(meta: FileMeta) -> bytes:
    """Group 0002, explicit VR little endian, as pydicom's `write_file_meta_info` writes it."""
    version = meta.implementation_version.encode("ascii")
    if len(version) % 2:
        version += b" "
    body = b"".join((
        _explicit(0x0001, b"OB", b"\x00\x01"),
        _explicit(0x0002, b"UI", _uid(meta.sop_class_uid)),
        _explicit(0x0003, b"UI", _uid(meta.sop_instance_uid)),
        _explicit(0x0010, b"UI", _uid(meta.transfer_syntax)),
        _explicit(0x0012, b"UI", _uid(meta.implementation_uid)),
        _explicit(0x0013, b"SH", version),
    ))
    return _explicit(0x0000, b"UL", struct.pack("<L", len(body))) + body


class SpoolFile:
    """A spooled C-STORE data set: written as it arrives, hashed as it is written.

    Stands in for the `NamedTemporaryFile` pynetdicom writes to (``write``,
    ``file.flush``, ``name``, ``close``); `finish` makes the bytes visible to
    other readers and returns (SHA-256, size). Writes are buffered: pynetdicom's
    per-fragment ``flush`` does nothing, `finish` and `close` flush.
    """

    def __init__(self, directory: str | os.PathLike, prefix: str = "rx-", suffix: str = ".dcm") -> None:
        fd, self.name = tempfile.mkstemp(dir=directory, prefix=prefix, suffix=suffix)
        self._handle = os.fdopen(fd, "wb", buffering=1 << 20)
        self._digest = hashlib.sha256()
        self.size = 0
        self.file = self  # pynetdicom calls ``file.flush()`` after every fragment

    def write(self, data: bytes) -> int:
        self._digest.update(data)
        self.size += len(data)
        return self._handle.write(data)

    def flush(self) -> None:
        """pynetdicom's per-fragment flush: nothing (the buffer is flushed by `finish`)."""

    def finish(self) -> tuple[str, int]:
        self._handle.flush()
        return self._digest.hexdigest(), self.size

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.close()

    def __enter__(self) -> "SpoolFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
