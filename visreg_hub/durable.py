"""Crash-safe file writes, in one place: what bulk shards, saved indexes, the server's write-ahead log and
training checkpoints rely on so that a crash never loses acknowledged work.

A write is durable once its bytes are fsynced *and* the folder entry naming it is fsynced (a rename or a
new file lives in the folder, not the file). ``write_atomic`` adds all-or-nothing: readers and a restarted
process see either the old file or the complete new one, never half of it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from visreg_hub.errors import UserInputError

__all__ = [
    "check_writable",
    "current_umask",
    "exclusive_lock",
    "fsync_dir",
    "fsync_file",
    "fsync_tree",
    "remove_dead_staging",
    "write_atomic",
    "write_atomic_pair",
]

logger = logging.getLogger(__name__)


def check_writable(path: Path) -> None:
    """Create ``path``'s folder and a file in it, then remove the file: an output that cannot be written
    (a read-only or foreign folder) fails here, before hours of embedding or index building.

    Raises:
        UserInputError: naming ``path`` and the reason.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.probe-"):
            pass
    except OSError as exc:
        raise UserInputError(f"cannot write {path}: {exc.strerror or exc}; choose another output") from None


def current_umask() -> int:
    """This process's umask, read without setting it (``os.umask`` sets it, process-wide, for an instant in
    which another thread's new file would get the wrong mode); 0o022 where it cannot be read."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def try_lock(path: Path, *, shared: bool = False) -> int | None:
    """Take a non-blocking ``flock`` on ``path`` (created if missing, never through a symlink).

    Returns:
        The descriptor that holds it (closing it releases the lock; so does the process ending), or None
        when another holder has it: a conflicting lock, or another open of the file in this process.

    Raises:
        ImportError: no ``fcntl`` (Windows): callers decide whether to run unlocked.
    """
    import fcntl

    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(descriptor, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        return None
    return descriptor


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the block: processes that take the
    same lock run the block one at a time. The lock dies with its process, so a killed holder never blocks
    the next. Where ``fcntl`` does not exist (Windows) the block runs unlocked."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # closing releases the lock


def _pid_alive(pid: int) -> bool:
    """A process with this id exists on this machine (another user's counts: it may be writing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process, or a number no kill() takes: not proven dead
    return True


def remove_dead_staging(folder: Path, prefix: str) -> list[Path]:
    """Remove the ``<prefix><pid>`` entries in ``folder`` whose process is gone; return what was removed.

    Saves stage into ``<prefix><pid>`` (a whole copy of a model or an index) and remove it when done; one
    killed mid-way (``kill -9``, the OOM killer) leaves it behind, and the next save runs under another pid,
    so without this every interrupted save would leave another full copy. A live pid's entry is another
    save still writing and is left alone (a recycled pid only delays the removal).
    """
    pattern = re.compile(re.escape(prefix) + r"(\d+)")
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or int(match[1]) == os.getpid() or _pid_alive(int(match[1])):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError as exc:  # another process removed it first, or not ours to remove
            logger.debug("could not remove %s: %s", entry, exc)
            continue
        removed.append(entry)
        logger.info("removed %s, left by a save that was interrupted", entry)
    return removed


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


def _temporary_beside(path: Path) -> Path:
    """A new, empty regular file next to ``path`` with an unguessable name, created with ``O_EXCL``: a
    link planted at a predictable name (``.emb.npy.tmp-<pid>``) once redirected the write to a file
    elsewhere. Its mode follows the umask, as the file written in place would (``mkstemp``'s is 0600)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    while True:
        candidate = path.with_name(f".{path.name}.tmp-{secrets.token_hex(8)}")
        try:
            os.close(os.open(candidate, flags, 0o666))
            return candidate
        except FileExistsError:  # 2^64 names: only an attacker's guess gets here, and then a new name
            continue


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)``, fsync, rename over ``path``, fsync the folder: all or nothing after a crash.

    The temporary file sits next to ``path`` (same file system, so the rename is atomic) and is removed if
    ``write`` raises.
    """
    tmp = _temporary_beside(path)
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic_pair(
    path: Path, write: Callable[[Path], None], sidecar: Path, write_sidecar: Callable[[Path], None]
) -> None:
    """Replace a data file ``path`` and the ``sidecar`` describing it (``write(tmp)``, ``write_sidecar(tmp)``)
    so that a crash or a full disk never pairs a sidecar with data it does not describe, and never leaves
    half a file under either name.

    Both are written to temporary names beside them and fsynced first (a full disk fails here, replacing
    nothing); then the old sidecar goes, the data is renamed into place, and the new sidecar last: a crash
    in between leaves the new data without a sidecar, never a wrong pairing.
    """
    staged = [(path, write), (sidecar, write_sidecar)]
    temporaries: list[Path] = []
    try:
        for target, writer in staged:
            temporaries.append(_temporary_beside(target))
            writer(temporaries[-1])
            fsync_file(temporaries[-1])
        sidecar.unlink(missing_ok=True)
        for temporary, (target, _) in zip(temporaries, staged, strict=True):
            os.replace(temporary, target)
        fsync_dir(path.parent)
    finally:
        for temporary in temporaries:
            temporary.unlink(missing_ok=True)
