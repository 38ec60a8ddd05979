"""Where instances and results are kept: one interface, a local file-system backend (the default,
under the data directory) and an S3-compatible one (``CXR_TRIAGE_STORAGE_URL=s3://bucket/prefix``)
for several nodes and GPU workers on different hosts.

Keys are relative paths made here (``instance_relpath``, ``result_relpath``): hashes, never raw
UIDs. The local backend writes through a temporary file, fsyncs it, renames it and fsyncs the
directory before it returns, so a node that answers 0x0000 after ``write`` has the instance on
disk; the S3 backend returns once the store acknowledged the PUT (S3's own durability).
Backend failures are ``StorageError`` (an OSError, which the node answers with 0xA700).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

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


class StorageError(OSError):
    """The storage backend failed (the message names the key and the backend's answer)."""


class ObjectStore(Protocol):
    """A flat namespace of byte objects under string keys."""

    def write(self, key: str, write: Callable[[BinaryIO], None]) -> int:
        """Store what ``write`` writes to a binary file object; durable when it returns. Returns the size."""

    def write_bytes(self, key: str, data: bytes) -> int: ...

    def write_many(self, items: list[tuple[str, Callable[[BinaryIO], None]]]) -> list[int]:
        """`write` for several objects, durable together when it returns (a study's results)."""

    def open(self, key: str) -> BinaryIO:
        """A readable binary file object (close it); FileNotFoundError when absent."""

    def read_bytes(self, key: str) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def size(self, key: str) -> int: ...

    def delete(self, key: str) -> None:
        """Remove the object; absent is fine."""

    def local_path(self, key: str):
        """A context manager giving a file path with the object's bytes (the file itself, or a copy)."""

    def describe(self, key: str) -> str:
        """Where the object lives, for messages (never its content)."""

    def check_key(self, key: str) -> None:
        """FileNotFoundError when ``key`` would leave the store's directory or prefix."""


class LocalStore:
    """Files under ``root``; keys may not leave it."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        root = self.root.resolve()
        path = (root / key).resolve()
        if not path.is_relative_to(root) or path == root:
            raise FileNotFoundError(f"stored path {key!r} leaves its directory")
        return path

    def write(self, key: str, write: Callable[[BinaryIO], None]) -> int:
        return atomic_write(self.path(key), write)

    def write_many(self, items: list[tuple[str, Callable[[BinaryIO], None]]]) -> list[int]:
        return atomic_write_all([(self.path(key), write) for key, write in items])

    def write_bytes(self, key: str, data: bytes) -> int:
        return self.write(key, lambda handle: handle.write(data))

    def open(self, key: str) -> BinaryIO:
        return open(self.path(key), "rb")

    def read_bytes(self, key: str) -> bytes:
        return self.path(key).read_bytes()

    def exists(self, key: str) -> bool:
        try:
            return self.path(key).is_file()
        except FileNotFoundError:
            return False

    def size(self, key: str) -> int:
        return self.path(key).stat().st_size

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    @contextmanager
    def local_path(self, key: str) -> Iterator[Path]:
        path = self.path(key)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing")
        yield path

    def describe(self, key: str) -> str:
        return str(self.root / key)

    def check_key(self, key: str) -> None:
        self.path(key)


class S3Store:
    """Objects in an S3-compatible bucket (AWS S3, MinIO, Ceph RGW...) under ``prefix``, through boto3.

    A client per process (a forked model process makes its own: connection pools do not survive a fork).
    """

    def __init__(self, bucket: str, prefix: str, *, endpoint_url: str = "", region: str = "",
                 access_key_id: str = "", secret_access_key: str = "") -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._options = {"endpoint_url": endpoint_url or None, "region_name": region or None,
                         "aws_access_key_id": access_key_id or None,
                         "aws_secret_access_key": secret_access_key or None}
        self._client = None
        self._pid = 0
        self._lock = threading.Lock()

    @property
    def client(self):
        if self._client is None or self._pid != os.getpid():
            with self._lock:
                if self._client is None or self._pid != os.getpid():
                    import boto3
                    from botocore.config import Config

                    self._client = boto3.session.Session().client(
                        "s3", config=Config(retries={"max_attempts": 5, "mode": "standard"}), **self._options)
                    self._pid = os.getpid()
        return self._client

    def _key(self, key: str) -> str:
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise FileNotFoundError(f"stored key {key!r} leaves its prefix")
        return f"{self.prefix}/{key}" if self.prefix else key

    def _error(self, exc: Exception, key: str) -> OSError:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
        if code in ("NoSuchKey", "404", "NotFound"):
            return FileNotFoundError(f"{self.describe(key)} is missing")
        return StorageError(f"{self.describe(key)}: {type(exc).__name__}: {exc}"[:500])

    def write(self, key: str, write: Callable[[BinaryIO], None]) -> int:
        buffer = io.BytesIO()
        write(buffer)
        return self.write_bytes(key, buffer.getvalue())

    def write_many(self, items: list[tuple[str, Callable[[BinaryIO], None]]]) -> list[int]:
        return [self.write(key, write) for key, write in items]

    def write_bytes(self, key: str, data: bytes) -> int:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise self._error(exc, key) from exc
        return len(data)

    def open(self, key: str) -> BinaryIO:
        return io.BytesIO(self.read_bytes(key))

    def read_bytes(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise self._error(exc, key) from exc

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except FileNotFoundError:
            return False
        return True

    def size(self, key: str) -> int:
        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self._key(key))["ContentLength"])
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise self._error(exc, key) from exc

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as exc:
            raise self._error(exc, key) from exc

    @contextmanager
    def local_path(self, key: str) -> Iterator[Path]:
        data = self.read_bytes(key)
        with tempfile.NamedTemporaryFile(prefix="cxr-triage-", suffix=".dcm") as handle:
            handle.write(data)
            handle.flush()
            yield Path(handle.name)

    def describe(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def check_key(self, key: str) -> None:
        self._key(key)


@dataclass(frozen=True)
class Storage:
    """The two namespaces: received instances and our result objects."""

    instances: ObjectStore
    results: ObjectStore


def make_storage(settings) -> Storage:
    """The storage ``settings`` configure (CXR_TRIAGE_STORAGE_URL): files under the data directory by
    default, or ``file:///path``, or ``s3://bucket/prefix`` with CXR_TRIAGE_S3_* settings."""
    url = settings.storage_url
    if url.startswith("s3://"):
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        options = {"endpoint_url": settings.s3_endpoint_url, "region": settings.s3_region,
                   "access_key_id": settings.s3_access_key_id, "secret_access_key": settings.s3_secret_access_key}
        return Storage(S3Store(bucket, "/".join(p for p in (prefix.strip("/"), "instances") if p), **options),
                       S3Store(bucket, "/".join(p for p in (prefix.strip("/"), "results") if p), **options))
    if url.startswith("file://"):
        root = Path(url.removeprefix("file://"))
        return Storage(LocalStore(root / "instances"), LocalStore(root / "results"))
    return Storage(LocalStore(settings.instances_dir), LocalStore(settings.results_dir))
