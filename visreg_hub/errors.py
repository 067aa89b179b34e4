"""Exception family of visreg_hub (and where its warnings point).

Every error raised on user input names the bad value and the fix. Subclasses also derive from the
built-in exception a caller would naturally catch (``ValueError``, ``FileNotFoundError``), so both
``except VisregHubError`` and ``except ValueError`` work.
"""

from __future__ import annotations

import errno
import os
import sys


class VisregHubError(Exception):
    """Base class of every error raised by visreg_hub."""


class ConfigError(VisregHubError, ValueError):
    """A configuration value is invalid (unknown key, wrong type, out of range)."""


class CheckpointError(VisregHubError, ValueError):
    """A checkpoint is malformed: missing/unexpected keys, wrong shapes, bad format, checksum mismatch."""


class ModelNotFoundError(VisregHubError, FileNotFoundError):
    """A model name, repository or folder could not be resolved."""


class DataNotFoundError(VisregHubError, FileNotFoundError):
    """A file or folder the user named (an index folder, embeddings or paths file), or one such a folder
    must hold, does not exist."""


class ModelNotPublishedError(VisregHubError, LookupError):
    """A registry entry exists but its weights are not (yet) published."""


class ImageDecodeError(VisregHubError, ValueError):
    """An image could not be decoded; the message names the item and the reason. ``limit``: the cap it is
    over (``"max_pixels"``), None for any other reason."""

    def __init__(self, message: str, *, limit: str | None = None) -> None:
        super().__init__(message)
        self.limit = limit


class UserInputError(VisregHubError, ValueError):
    """A problem the user can fix in what they passed, typed or uploaded (function arguments, arrays of the
    wrong shape, CLI arguments, demo inputs); the message is shown as is, on one line. visreg_hub raises
    no bare ``ValueError``: this is its ``ValueError`` for everything without a more specific type."""


class DeviceError(VisregHubError, ValueError):
    """A device string that is malformed (``bogus``) or names hardware this machine lacks (``cuda``)."""


class HubRequestError(VisregHubError, ConnectionError):
    """A request to the Hugging Face Hub failed: offline mode, no or a refused token, or the Hub is
    unreachable; the message names which, and the way around it."""


class MissingExtraError(VisregHubError, ImportError):
    """An optional dependency is missing; the message names the pip extra that provides it."""


def require_extra(module: str, extra: str):
    """Import an optional dependency or raise :class:`MissingExtraError` naming the extra.

    Args:
        module: importable module name, e.g. ``"faiss"``.
        extra: the pip extra that installs it, e.g. ``"index"``.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"{module!r} is required for this feature but is not installed; "
            f"install it with: pip install 'visreg_hub[{extra}]'"
        ) from exc


def printable(text: str) -> str:
    """``text`` with control characters (terminal escapes, newlines) written as ``\\x1b``-style escapes,
    so a hostile file name cannot drive the terminal it is printed on."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def shown(value: object, limit: int = 80) -> str:
    """``repr(value)`` for an error message, cut to ``limit`` characters: a message never echoes back the
    megabytes someone put in a model name, a header, a field or a file."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text):,} characters)"


def _out_of_memory(exc: BaseException) -> bool:
    text = str(exc)
    return (
        isinstance(exc, MemoryError)
        or type(exc).__name__ == "OutOfMemoryError"
        or "can't allocate memory" in text
        or "out of memory" in text.lower()
    )


def is_expected(exc: BaseException) -> bool:
    """True for failures that describe the input or the machine (project errors, I/O, bad values, out
    of memory); False for what can only be a bug, which a command line asks the user to report."""
    return isinstance(exc, VisregHubError | OSError | ValueError | LookupError) or _out_of_memory(exc)


_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def one_line(exc: BaseException) -> str:
    """The one-line message a command line prints for ``exc``.

    A :class:`VisregHubError`, ``OSError`` or ``ValueError`` message is kept as is; anything else is
    prefixed with its type (``KeyError: 101`` says more than ``101``). Control characters are escaped
    (:func:`printable`). Other libraries' messages are cut to their first line (the rest is often a
    traceback or a dump); ours are one line by design, so a newline in one comes from a name it quotes (a
    file named ``two\nlines.png``) and is escaped, never cut: the reason after the name must not be lost.
    """
    if isinstance(exc, VisregHubError):
        message = str(exc).strip()
    else:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        message = lines[0] if lines else ""
    if _out_of_memory(exc):
        message = f"out of memory ({message or type(exc).__name__}); use a smaller batch, model or image size"
    elif isinstance(exc, RecursionError):
        message = "the input is nested too deeply to process"
    elif isinstance(exc, OSError) and exc.errno in _DISK_FULL and not isinstance(exc, VisregHubError):
        where = f"{exc.filename}: " if exc.filename else ""
        message = f"{where}no space left on the disk; free some space and run the same command again"
    elif not isinstance(exc, VisregHubError | OSError | ValueError) or not message:
        message = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return printable(message)


def user_stacklevel() -> int:
    """``warnings.warn``'s stacklevel of the first caller outside visreg_hub, as seen from the caller of this.

    Python shows a DeprecationWarning only when it is attributed to ``__main__`` (or the user's code under
    pytest); one attributed to visreg_hub's own wrapper is never seen.
    """
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep  # visreg_hub/
    frame, level = sys._getframe(1), 1  # the function that warns: stacklevel 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level
