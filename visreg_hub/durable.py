"""Crash-safe file writes, in one place: what bulk shards, saved indexes, the server's write-ahead log and
training checkpoints rely on so that a crash never loses acknowledged work.

A write is durable once its bytes are fsynced *and* the folder entry naming it is fsynced (a rename or a
new file lives in the folder, not the file). ``write_atomic`` adds all-or-nothing: readers and a restarted
process see either the old file or the complete new one, never half of it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["fsync_dir", "fsync_file", "fsync_tree", "write_atomic"]


def fsync_file(path: Path) -> None:
    """Flush ``path``'s bytes to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
    """Make a rename or file creation in ``folder`` durable."""
    fsync_file(folder)  # a folder is fsynced through a read-only descriptor, like a file


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder below ``folder``, deepest first, then ``folder`` itself."""
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_file() or path.is_dir():
            fsync_file(path)
    fsync_dir(folder)


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)``, fsync, rename over ``path``, fsync the folder: all or nothing after a crash.

    The temporary file sits next to ``path`` (same file system, so the rename is atomic) and is removed if
    ``write`` raises.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
