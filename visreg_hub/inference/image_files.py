"""Image files on disk: why a path cannot be opened as an image file, and opening it without blocking.

Shared by :func:`~visreg_hub.inference.images.decode_image` (which opens the file) and the folder walks of
:mod:`visreg_hub.inference.inputs` (which report an entry without opening it), so both give one reason.
"""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

from visreg_hub.errors import ImageDecodeError

# Why an image-named path cannot be decoded; decode_image and the folder walks (inputs.py) share them.
DANGLING_LINK_REASON = "a symlink whose target does not exist; fix or remove the link"
NOT_REGULAR_REASON = "not a regular file (a FIFO, socket or device); only image files are embedded"
FILE_NOT_FOUND_REASON = "file not found; check the path"


def unreadable_entry_reason(exc: OSError) -> str:
    """Why a path whose status cannot be read (ELOOP: a symlink loop, EACCES, ...) is not decoded."""
    return f"cannot read this entry ({exc.strerror or exc}); fix or remove it"


def file_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be opened as an image file (without the path), or None: a regular file.

    Links are followed (``os.stat``). Checked before any open: opening a FIFO blocks forever.
    """
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):  # ENOTDIR: a parent in the path is a file
        return DANGLING_LINK_REASON if os.path.islink(path) else FILE_NOT_FOUND_REASON
    except OSError as exc:
        return unreadable_entry_reason(exc)
    if stat.S_ISDIR(mode):
        return "is a directory, not an image file; pass the folder to encode() to embed the images in it"
    if not stat.S_ISREG(mode):
        return NOT_REGULAR_REASON
    return None


def open_regular_file(path: Path, label: str) -> io.BufferedReader:
    """``path`` opened for reading, refused unless it is a regular file (checked by :func:`file_problem`
    before opening, and on the open descriptor).

    why the non-blocking open: the path may have been replaced by a FIFO since it was checked; opening
    one in blocking mode waits for a writer, forever. Regular files ignore the flag.
    """
    problem = file_problem(path)
    if problem is not None:
        raise ImageDecodeError(f"{label}: {problem}")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        descriptor = os.open(path, flags)
    except OSError as exc:
        raise ImageDecodeError(f"{label}: file cannot be read ({exc})") from exc
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise ImageDecodeError(f"{label}: {NOT_REGULAR_REASON}")
        if hasattr(os, "set_blocking"):  # back to blocking reads (network filesystems may honour the flag)
            os.set_blocking(descriptor, True)
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise
