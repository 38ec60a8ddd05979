"""triage_core.storage: atomic writes of one file and of a study's result objects together."""

from __future__ import annotations

import os

import pytest

from triage_core.storage import atomic_write, atomic_write_all


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
