"""visreg_hub.durable: the one home of fsync-and-rename (bulk shards, indexes, the WAL, checkpoints)."""

from __future__ import annotations

import os

import pytest

from visreg_hub import durable


def _record_fsyncs(monkeypatch) -> list[int]:
    """Inode numbers in the order ``os.fsync`` sees them (the real fsync still runs)."""
    seen: list[int] = []
    real = os.fsync

    def recording(fd: int) -> None:
        seen.append(os.fstat(fd).st_ino)
        real(fd)

    monkeypatch.setattr(durable.os, "fsync", recording)
    return seen


def test_write_atomic_replaces_whole_file_and_syncs_the_folder(tmp_path, monkeypatch):
    target = tmp_path / "data.bin"
    target.write_bytes(b"old")
    seen = _record_fsyncs(monkeypatch)
    durable.write_atomic(target, lambda p: p.write_bytes(b"new contents"))
    assert target.read_bytes() == b"new contents"
    assert os.listdir(tmp_path) == ["data.bin"]  # no temporary left behind
    # the file's bytes before the rename, then the folder entry that names it
    assert seen[-1] == tmp_path.stat().st_ino and len(seen) == 2


def test_write_atomic_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "data.bin"
    target.write_bytes(b"old")

    def half_then_crash(path):
        path.write_bytes(b"ne")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        durable.write_atomic(target, half_then_crash)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["data.bin"]


def test_fsync_tree_reaches_every_file_and_folder_children_first(tmp_path, monkeypatch):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for relative in ("top.txt", "a/mid.txt", "a/b/deep.txt"):
        (tmp_path / relative).write_text(relative)
    seen = _record_fsyncs(monkeypatch)
    durable.fsync_tree(tmp_path)
    every = [tmp_path, *tmp_path.rglob("*")]
    assert sorted(seen) == sorted(p.stat().st_ino for p in every)
    order = {inode: i for i, inode in enumerate(seen)}
    for path in every[1:]:  # each entry is durable before the folder that names it
        assert order[path.stat().st_ino] < order[path.parent.stat().st_ino], path
