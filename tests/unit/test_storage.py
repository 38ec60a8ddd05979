"""The storage interface: the local backend (atomic, fsynced, confined to its directory) and the
S3-compatible backend against a real S3 server on loopback (moto's, as its own process)."""

from __future__ import annotations

import os

import pydicom
import pytest

from tests.conftest import DATA
from triage_core.settings import Settings
from triage_core.storage import LocalStore, S3Store, StorageError, atomic_write, atomic_write_all, instance_relpath

CHEST = DATA / "cxr_dicom" / "cr_chest_pa_mono1_10bit_explicit_le.dcm"


def _exercise(store) -> None:
    key = instance_relpath("1.2.3", "1.2.3.4")
    data = CHEST.read_bytes()
    assert not store.exists(key)
    assert store.write_bytes(key, data) == len(data)
    assert store.exists(key) and store.size(key) == len(data)
    assert store.read_bytes(key) == data
    with store.open(key) as handle:
        assert pydicom.dcmread(handle).SOPInstanceUID == pydicom.dcmread(CHEST).SOPInstanceUID
    with store.local_path(key) as path:
        assert path.read_bytes() == data
    pair = [instance_relpath("1.2.3", "1.2.3.6"), instance_relpath("1.2.3", "1.2.3.7")]
    assert store.write_many([(k, lambda handle, k=k: handle.write(k.encode())) for k in pair]) == [len(k) for k in pair]
    assert [store.read_bytes(k) for k in pair] == [k.encode() for k in pair]
    for k in pair:
        store.delete(k)
    ds = pydicom.dcmread(CHEST)
    other = instance_relpath("1.2.3", "1.2.3.5")
    size = store.write(other, lambda handle: ds.save_as(handle, enforce_file_format=True))
    assert store.size(other) == size > 0
    store.delete(key)
    store.delete(key)  # absent is fine
    assert not store.exists(key)
    with pytest.raises(FileNotFoundError):
        store.read_bytes(key)
    with pytest.raises(FileNotFoundError):
        store.check_key("../outside.dcm")


def test_local_store(tmp_path):
    store = LocalStore(tmp_path / "instances")
    _exercise(store)
    assert not list((tmp_path / "instances").rglob(".incoming-*"))  # no temporary file left behind


def test_s3_store_against_a_real_s3_server(s3_server):
    s3_server.client().create_bucket(Bucket="cxr-test")
    store = S3Store("cxr-test", "site-a/instances", endpoint_url=s3_server.url, region="us-east-1",
                    access_key_id="test-key", secret_access_key="test-secret-7f3c")
    _exercise(store)
    listed = s3_server.client().list_objects_v2(Bucket="cxr-test")["Contents"]
    assert [o["Key"] for o in listed] == [f"site-a/instances/{instance_relpath('1.2.3', '1.2.3.5')}"]


def test_s3_failures_are_storage_errors_naming_the_object(s3_server):
    store = S3Store("no-such-bucket", "x", endpoint_url=s3_server.url, region="us-east-1",
                    access_key_id="k", secret_access_key="s")
    with pytest.raises(StorageError, match="s3://no-such-bucket/x/a.dcm") as error:
        store.write_bytes("a.dcm", b"x")
    assert isinstance(error.value, OSError)  # the node answers it with 0xA700


def test_settings_choose_the_backend(tmp_path):
    local = Settings(data_dir=tmp_path / "var").storage
    assert isinstance(local.instances, LocalStore) and local.instances.root == (tmp_path / "var" / "instances").resolve()
    s3 = Settings(data_dir=tmp_path / "var", storage_url="s3://bucket/pre/fix", s3_endpoint_url="http://127.0.0.1:1").storage
    assert isinstance(s3.results, S3Store) and s3.results.describe("k") == "s3://bucket/pre/fix/results/k"


def test_atomic_write_all_writes_every_file_or_none(tmp_path, monkeypatch):
    targets = [tmp_path / "study" / f"{n}.dcm" for n in range(3)]
    fsyncs = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (fsyncs.append(fd), real_fsync(fd)))
    sizes = atomic_write_all([(path, lambda handle, n=n: handle.write(b"x" * (n + 1))) for n, path in enumerate(targets)])
    assert sizes == [1, 2, 3] and [p.read_bytes() for p in targets] == [b"x", b"xx", b"xxx"]
    assert len(fsyncs) == 3 + 1  # each file, then their one directory
    assert not list((tmp_path / "study").glob(".incoming-*"))

    def broken(handle):
        handle.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_all([(targets[0], lambda handle: handle.write(b"new")), (targets[1], broken)])
    # Nothing was replaced (renames happen only after every file is durable), nothing left behind.
    assert [p.read_bytes() for p in targets] == [b"x", b"xx", b"xxx"]
    assert not list((tmp_path / "study").glob(".incoming-*"))


def test_atomic_write_replaces_whole(tmp_path):
    path = tmp_path / "a" / "b.dcm"
    assert atomic_write(path, lambda handle: handle.write(b"one")) == 3
    assert atomic_write(path, lambda handle: handle.write(b"second")) == 6
    assert path.read_bytes() == b"second" and not list(path.parent.glob(".incoming-*"))
