"""On-disk cache of exported graphs, so a model is exported to ONNX once per machine, not once per process.

Layout: ``<cache dir>/<key>/model.onnx`` plus ``entry.json`` (the file's SHA-256 and size, what was
exported and with which versions). The cache dir is ``$VISREG_HUB_CACHE/onnx``, else
``$XDG_CACHE_HOME/visreg_hub/onnx``, else ``~/.cache/visreg_hub/onnx``.

* The key is a SHA-256 over the weights' bytes (every tensor, in key order, with its name, dtype and
  shape), the model config, the export options (pooling, precision, fusions) and the versions that shape
  the graph (visreg_hub, torch, onnx, onnxruntime), so new weights, a new revision or a new exporter
  never reuse an old graph, and the same weights under any name or path do.
* Writing is atomic: the export goes to a temporary folder inside the cache dir, ``entry.json`` is written
  last, and the folder is renamed into place (a concurrent writer of the same key loses the race
  harmlessly). A half-written entry therefore never has the final name.
* Reading verifies: an entry whose ``entry.json`` is missing or unreadable, or whose ``model.onnx`` size or
  SHA-256 differs from the recorded one, is logged, deleted and exported again; it is never trusted. So is
  an entry that is a file or a (dangling) symlink rather than a folder.
* The cache is per user. A graph is a program that ``encode()`` runs, and the digest only shows the file
  is the one ``entry.json`` records: whoever can write an entry can record another graph, and no test run
  can prove a graph honest (it can recognise the test's inputs). So an entry is used only if it, its
  graph and its record belong to this user (or to root: a read-only cache an administrator filled) and
  are not writable by others, and only from a cache dir that others cannot rename entries in: neither
  it nor any folder above it (links resolved) belongs to another user or is writable by others without
  the sticky bit (as /tmp has). Group write is allowed: with the user-private groups of most
  Linux systems (umask 002) every file a user makes is group-writable; entries this module writes are
  0755 folders of 0644 files less the umask's read and search bits (never group- or world-writable), so
  a cache root filled for others can be read by them. Anything else, or an entry this user cannot read,
  raises :class:`OnnxCacheError` naming the fix, and is never deleted (it is not this user's). Entries,
  graphs and records that are links, FIFOs or devices are never followed or read.
* A trusted graph is still run once against the model (``check``) before it is used, which catches a
  damaged or mismatched export; an entry that fails is exported again.
* A staging folder left by an export that was killed (``kill -9``, the OOM killer) holds a whole graph;
  staging folders older than :data:`STALE_STAGING_SECONDS` are deleted whenever a graph is exported.
* Processes that miss the same key at once take turns (an ``flock`` on ``.lock-<key>``): one exports, the
  others wait and read its entry.
* A cache dir that cannot be created or written raises :class:`OnnxCacheError` naming the folder and the
  fix, before any export work; ``backend="auto"`` then falls back to torch (``backends.backend_for``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visreg_hub.durable import current_umask
from visreg_hub.errors import MissingExtraError, VisregHubError
from visreg_hub.filehash import sha256_file
from visreg_hub.hub.format import weights_digest

logger = logging.getLogger(__name__)

ENTRY_VERSION = 1
MODEL_FILE, ENTRY_FILE = "model.onnx", "entry.json"
ENV_CACHE = "VISREG_HUB_CACHE"
# why hours: an export of ViT-L with int8 and validation takes minutes on a slow CPU, so a staging folder
# this old belongs to a process that died; a younger one may be a concurrent export still writing
STALE_STAGING_SECONDS = 6 * 3600
_STAGING = re.compile(r"^\.[0-9a-f]{40}-")  # ".<key>-<random>", as cached_export's mkdtemp names them


class OnnxCacheError(VisregHubError, OSError):
    """The ONNX export cache dir cannot be created or written; the message names the folder and the fix."""


def cache_dir() -> Path:
    """Where exported graphs are kept (see the module docstring for the environment variables)."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser() / "onnx"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return base / "visreg_hub" / "onnx"


def _versions() -> dict[str, str]:
    from importlib import metadata

    from visreg_hub import __version__

    found = {"visreg_hub": __version__, "torch": torch.__version__}
    for package in ("onnx", "onnxscript", "onnxruntime"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "absent"
    return found


def cache_key(model: nn.Module, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(hex key, the description it hashes) for ``model`` exported with ``options``."""
    description = {
        "entry_version": ENTRY_VERSION,
        "weights_sha256": weights_digest(model),
        "config": model.config.to_dict(),
        "options": options,
        "versions": _versions(),
    }
    text = json.dumps(description, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:40], description


MAX_ENTRY_BYTES = 1 << 20  # entry.json holds a description and a digest: a few KB


def _regular(path: Path) -> bool:
    """A regular file that is not a symlink (a link could lead the cache to run a graph kept elsewhere)."""
    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except OSError:
        return False


def _foreign(path: Path) -> str | None:
    """Why ``path`` (not followed) is not this user's to trust, or None. See the module docstring."""
    if not hasattr(os, "getuid"):  # Windows: no owners and modes in this sense; the user's own profile
        return None
    try:
        status = path.lstat()
    except OSError as exc:
        return f"cannot be inspected ({exc.strerror or exc})"
    if status.st_uid not in (os.getuid(), 0):
        return f"belongs to another user (uid {status.st_uid})"
    if status.st_mode & stat.S_IWOTH and not stat.S_ISLNK(status.st_mode):
        return "is writable by others"  # (a link's own mode means nothing; it is never followed)
    return None


def _check_root(root: Path) -> None:
    """Refuse a cache dir where others could swap this user's entries: the dir or any folder above it
    (links resolved) that belongs to another user (root excepted), or that others can write without the
    sticky bit (whoever can rename the ``onnx`` folder, or a folder above it, replaces every graph in it
    between a check and the next open)."""
    if not hasattr(os, "getuid"):
        return
    folder = Path(os.path.realpath(root))
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # created later, by this user
    for path in (folder, *folder.parents):
        try:
            status = path.stat()
        except OSError:
            continue
        if status.st_uid not in (os.getuid(), 0):
            why = f"{path} belongs to another user (uid {status.st_uid}), who could replace the graphs in it"
        elif status.st_mode & stat.S_IWOTH and not status.st_mode & stat.S_ISVTX:
            why = f"{path} is writable by others, who could replace the graphs in it"
        else:
            continue
        raise OnnxCacheError(
            f"the ONNX export cache {root} is not safe to run graphs from: {why}; set {ENV_CACHE} to a "
            "folder of your own (on a file system with Unix permissions: not a FAT/NTFS mount), or make a "
            "world-writable one sticky (chmod +t)"
        )


def _unreadable_error(entry: Path, exc: OSError) -> OnnxCacheError:
    return OnnxCacheError(
        f"the ONNX cache entry {entry} cannot be read by this user ({exc.strerror or exc}); ask its owner "
        f"to make it readable (chmod -R a+rX), set {ENV_CACHE} to a folder of your own, or load the model "
        "with backend='torch'"
    )


def _untrusted_error(entry: Path, why: str) -> OnnxCacheError:
    return OnnxCacheError(
        f"the ONNX cache entry {entry} {why}, so its graph is not run: the cache is per user; set "
        f"{ENV_CACHE} to a folder of your own, or load the model with backend='torch'"
    )


def _verified(entry: Path) -> Path | None:
    """``entry/model.onnx`` if the entry is complete and its digest matches; else None (why is logged)."""
    model_file, record_file = entry / MODEL_FILE, entry / ENTRY_FILE
    for path in (entry, record_file, model_file):
        why = _foreign(path) if path == entry or path.is_symlink() or path.exists() else None
        if why is not None:
            raise _untrusted_error(path, why)
    problem = None
    if not _regular(record_file):  # a FIFO would block the read, /dev/zero would fill memory
        problem = "not a regular file"
    else:
        try:
            with record_file.open("rb") as handle:
                data = handle.read(MAX_ENTRY_BYTES + 1)
            if len(data) > MAX_ENTRY_BYTES:
                problem = f"over {MAX_ENTRY_BYTES} bytes"
            else:
                record = json.loads(data)
                expected, size = str(record["sha256"]), int(record["size"])
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
            problem = str(exc)
    if problem is not None:
        logger.warning("ONNX cache entry %s has no readable %s (%s); exporting again", entry, ENTRY_FILE,
                       problem)  # fmt: skip
        return None
    if not _regular(model_file) or model_file.stat().st_size != size or sha256_file(model_file) != expected:
        logger.warning("ONNX cache entry %s does not match its recorded SHA-256; exporting again", entry)
        return None
    return model_file


def _remove(entry: Path) -> None:
    """Delete a cache entry whatever it is: folder, file or (dangling) symlink."""
    if entry.is_symlink() or (entry.exists() and not entry.is_dir()):
        entry.unlink(missing_ok=True)  # rmtree refuses both, and the rename into place would then fail
    else:
        shutil.rmtree(entry, ignore_errors=True)


def _newest_mtime(folder: Path) -> float:
    """Latest modification time of ``folder`` and everything in it (a live export keeps touching it)."""
    newest = folder.lstat().st_mtime
    for parent, dirs, files in os.walk(folder):
        for name in (*dirs, *files):
            with contextlib.suppress(OSError):  # removed meanwhile by its owner
                newest = max(newest, os.lstat(os.path.join(parent, name)).st_mtime)
    return newest


def sweep_stale_staging(root: Path, max_age: float = STALE_STAGING_SECONDS) -> list[Path]:
    """Delete the staging folders in ``root`` untouched for ``max_age`` seconds; return what was deleted."""
    removed = []
    cutoff = time.time() - max_age
    for path in root.iterdir():
        try:
            if not _STAGING.match(path.name) or not path.is_dir() or path.is_symlink():
                continue
            if _newest_mtime(path) < cutoff:
                shutil.rmtree(path)
                removed.append(path)
        except OSError as exc:  # another process swept it first, or no permission: not this export's problem
            logger.debug("could not sweep %s: %s", path, exc)
    if removed:
        logger.info("removed %d stale staging folder(s) of killed ONNX exports in %s", len(removed), root)
    return removed


def _cache_error(root: Path, exc: OSError) -> OnnxCacheError:
    return OnnxCacheError(
        f"cannot write the ONNX export cache {root} ({exc.strerror or exc}); set {ENV_CACHE} to a "
        "writable folder, or load the model with backend='torch'"
    )


def _writable_root(root: Path, key: str) -> Path:
    """Create ``root`` and a staging folder in it; an OSError becomes an :class:`OnnxCacheError`."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
    except OSError as exc:
        raise _cache_error(root, exc) from exc


@contextlib.contextmanager
def _export_lock(root: Path, key: str) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``root/.lock-<key>`` so processes export one key one at a time.

    Without it, every process that starts on an empty cache (the workers of a server, ranks of a job)
    runs the same export. The lock dies with its process (``flock``), so a killed export never blocks the
    next one. Where ``fcntl`` does not exist (Windows) nothing is locked: the atomic rename keeps the
    cache sound, and only the duplicate work remains.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    try:
        root.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(root / f".lock-{key}", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        handle = os.fdopen(descriptor, "r+")  # closed below, after the unlock
    except OSError as exc:
        raise _cache_error(root, exc) from exc
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("another process is exporting the same graph to %s; waiting for it", root)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _cached(entry: Path, check: Callable[[Path], None] | None = None) -> Path | None:
    """The verified graph of ``entry``; a broken one (file, link, bad digest, failed ``check``) is removed.

    Raises:
        OnnxCacheError: the entry is another user's to trust (see the module docstring), or this user
            cannot read it (a cache another user filled with private modes).
    """
    try:
        return _cached_or_removed(entry, check)
    except PermissionError as exc:
        raise _unreadable_error(entry, exc) from exc


def _cached_or_removed(entry: Path, check: Callable[[Path], None] | None) -> Path | None:
    if not (entry.is_symlink() or entry.exists()):  # exists() alone is False for a dangling symlink
        return None
    real_folder = entry.is_dir() and not entry.is_symlink()
    found = _verified(entry) if real_folder else None
    if found is not None and check is not None:
        try:
            check(found)
        except MissingExtraError:  # this process cannot run the check; the entry may be fine for others
            raise
        except VisregHubError as exc:  # a graph that is not what the key says (a damaged or bad export)
            logger.warning("ONNX cache entry %s fails its check against the model (%s); exporting again",
                           entry, exc)  # fmt: skip
            found = None
    if found is not None:
        logger.info("using the cached ONNX export %s", found)
        return found
    if not real_folder:
        why = _foreign(entry)
        if why is not None:
            raise _untrusted_error(entry, why)
        logger.warning("ONNX cache entry %s is not a folder; exporting again", entry)
    _remove(entry)
    if os.path.lexists(
        entry
    ):  # why check now: the export would run (seconds) and then fail to take its place
        raise OnnxCacheError(
            f"ONNX cache entry {entry} is damaged and cannot be removed (a read-only folder in it?); delete "
            f"it, or set {ENV_CACHE} to a folder you can write"
        )
    return None


def cached_export(
    model: nn.Module,
    options: dict[str, Any],
    export: Callable[[Path], None],
    root: Path | None = None,
    check: Callable[[Path], None] | None = None,
) -> Path:
    """The path of ``model``'s verified cached graph for ``options``, exporting it first if needed.

    Processes that miss the same key at once export it one at a time (:func:`_export_lock`): the first
    exports, the others wait and then read its entry.

    Args:
        model: the encoder (its weights and config are part of the key).
        options: export options that change the graph (pooling, precision, fusions, ...), JSON-able.
        export: writes the graph to the path it is given (and validates it); called only on a miss.
        root: cache dir (None: :func:`cache_dir`).
        check: called with a graph found in the cache (this user's, see the module docstring) before it
            is used (e.g. run it against the model on a probe batch); a
            :class:`~visreg_hub.errors.VisregHubError` from it means the entry is removed and exported
            again, except :class:`~visreg_hub.errors.MissingExtraError` (this process cannot check it).

    Returns:
        ``<root>/<key>/model.onnx``.

    Raises:
        OnnxCacheError: ``root`` cannot be created or written (checked before ``export`` runs), others
            can replace entries in it, or the entry is another user's (see the module docstring).
    """
    root = cache_dir() if root is None else Path(root)
    _check_root(root)
    key, description = cache_key(model, options)
    entry = root / key
    found = _cached(entry, check)
    if found is not None:
        return found
    with _export_lock(root, key):
        found = _cached(entry, check)  # exported by another process while this one waited
        if found is not None:
            return found
        staging = _writable_root(root, key)
        sweep_stale_staging(root)
        try:
            export(staging / MODEL_FILE)
            model_file = staging / MODEL_FILE
            record = {**description, "sha256": sha256_file(model_file), "size": model_file.stat().st_size}
            (staging / ENTRY_FILE).write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
            # never writable by others, readable as the umask allows: see the module docstring
            mask = current_umask() & 0o077
            for written in (model_file, staging / ENTRY_FILE):
                written.chmod(0o644 & ~mask)
            staging.chmod(0o755 & ~mask)  # mkdtemp made it 0700: nobody else could read a shared cache
            try:
                staging.rename(entry)
            except OSError as exc:  # another writer (no lock on this system) finished first: use its entry
                if not entry.is_dir() or _verified(entry) is None:
                    raise OnnxCacheError(
                        f"the ONNX export could not be put in place at {entry} ({exc.strerror or exc}); "
                        f"delete that entry, or set {ENV_CACHE} to a folder you can write"
                    ) from exc
                shutil.rmtree(staging, ignore_errors=True)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    logger.info("cached the ONNX export of %s in %s", model.config.name or "the model", entry)
    return entry / MODEL_FILE
