"""Exception family of visreg_hub.

Every error raised on user input names the bad value and the fix. Subclasses also derive from the
built-in exception a caller would naturally catch (``ValueError``, ``FileNotFoundError``), so both
``except VisregHubError`` and ``except ValueError`` work.
"""

from __future__ import annotations


class VisregHubError(Exception):
    """Base class of every error raised by visreg_hub."""


class ConfigError(VisregHubError, ValueError):
    """A configuration value is invalid (unknown key, wrong type, out of range)."""


class CheckpointError(VisregHubError, ValueError):
    """A checkpoint is malformed: missing/unexpected keys, wrong shapes, bad format, checksum mismatch."""


class ModelNotFoundError(VisregHubError, FileNotFoundError):
    """A model name, repository or folder could not be resolved."""


class ModelNotPublishedError(VisregHubError, LookupError):
    """A registry entry exists but its weights are not (yet) published."""


class ImageDecodeError(VisregHubError, ValueError):
    """An image could not be decoded; the message names the item and the reason."""


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
