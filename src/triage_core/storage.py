"""Storage layout under the data directory. File names never come from raw UIDs."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def is_valid_uid(value: object) -> bool:
    """A DICOM UID: digits and dots, no leading zeros in components, at most 64 chars."""
    if not isinstance(value, str) or not 0 < len(value) <= 64 or not _UID.match(value):
        return False
    return all(part == "0" or not part.startswith("0") for part in value.split("."))


def uid_key(uid: str) -> str:
    """A file-system-safe name for a UID: a hash, never the UID itself."""
    return hashlib.sha256(uid.encode("ascii", "replace")).hexdigest()[:40]


def instance_relpath(study_instance_uid: str, sop_instance_uid: str) -> str:
    return f"{uid_key(study_instance_uid)}/{uid_key(sop_instance_uid)}.dcm"


def result_relpath(study_instance_uid: str, sop_instance_uid: str) -> str:
    return f"{uid_key(study_instance_uid)}/{uid_key(sop_instance_uid)}.dcm"


def atomic_write(path: Path, write) -> int:
    """Write through a temp file in the same directory, fsync, rename, fsync the directory.

    `write` is called with a binary file object. Returns the size written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=".incoming-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
            size = handle.tell()
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(path.parent, os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return size


def atomic_write_all(items: list[tuple[Path, object]]) -> list[int]:
    """`atomic_write` for several files at once: every temp file is written and fsynced, then all are
    renamed, then each directory is fsynced once (one directory fsync for a study's result objects
    instead of one per object). Returns the sizes written, in order."""
    staged: list[tuple[str, Path]] = []
    sizes: list[int] = []
    try:
        for path, write in items:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=".incoming-", suffix=".tmp")
            staged.append((tmp_name, path))
            with os.fdopen(fd, "wb") as handle:
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())
                sizes.append(handle.tell())
        for tmp_name, path in staged:
            os.replace(tmp_name, path)
    except BaseException:
        for tmp_name, _ in staged:
            try:
                os.unlink(tmp_name)
            except FileNotFoundError:
                pass
        raise
    for directory in sorted({path.parent for _, path in staged}):
        dir_fd = os.open(directory, os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return sizes


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
