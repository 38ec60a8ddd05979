"""The storage interface: the local backend (atomic, fsynced, confined to its directory) and the
S3-compatible backend against a real S3 server on loopback (moto's, as its own process)."""

from __future__ import annotations

import pydicom
import pytest

from tests.conftest import DATA
from triage_core.settings import Settings
from triage_core.storage import LocalStore, S3Store, StorageError, instance_relpath

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
