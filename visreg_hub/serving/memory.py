"""Keep a long-running server's memory near its baseline after bursts of large images (glibc only).

glibc raises its mmap threshold after large blocks are freed, so later large image buffers come from
the heap arenas, which it rarely gives back: a server that decoded many big uploads kept gigabytes of
freed memory. A fixed threshold keeps every buffer of at least 1 MiB in its own mapping, returned to
the OS on free, and :func:`trim` hands back what the arenas still hold once the server is idle.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(name) if name else None
            _LIBC = (
                libc
                if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim")
                else False
            )
        except OSError:
            _LIBC = False
    return _LIBC


def bound_allocator(mmap_threshold: int = 1 << 20) -> bool:
    """Fix glibc's mmap threshold (buffers >= ``mmap_threshold`` bytes are unmapped on free).

    Returns:
        False where the C library is not glibc (nothing changed).
    """
    libc = _libc()
    if not libc:
        return False
    ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)))
    ok &= bool(libc.mallopt(_M_TRIM_THRESHOLD, int(mmap_threshold)))
    logger.debug("glibc mmap threshold fixed at %d bytes: %s", mmap_threshold, ok)
    return ok


def trim() -> None:
    """Return free heap memory to the OS (``malloc_trim(0)``); a no-op outside glibc."""
    libc = _libc()
    if libc:
        libc.malloc_trim(0)
