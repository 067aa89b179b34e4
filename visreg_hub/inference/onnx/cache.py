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
  SHA-256 differs from the recorded one, is logged, deleted and exported again; it is never trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visreg_hub.hub.format import weights_digest

logger = logging.getLogger(__name__)

ENTRY_VERSION = 1
MODEL_FILE, ENTRY_FILE = "model.onnx", "entry.json"


def cache_dir() -> Path:
    """Where exported graphs are kept (see the module docstring for the environment variables)."""
    if os.environ.get("VISREG_HUB_CACHE"):
        return Path(os.environ["VISREG_HUB_CACHE"]).expanduser() / "onnx"
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


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verified(entry: Path) -> Path | None:
    """``entry/model.onnx`` if the entry is complete and its digest matches; else None (why is logged)."""
    model_file, record_file = entry / MODEL_FILE, entry / ENTRY_FILE
    try:
        record = json.loads(record_file.read_text())
        expected, size = str(record["sha256"]), int(record["size"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("ONNX cache entry %s has no readable %s (%s); exporting again", entry, ENTRY_FILE, exc)
        return None
    if not model_file.is_file() or model_file.stat().st_size != size or _sha256_file(model_file) != expected:
        logger.warning("ONNX cache entry %s does not match its recorded SHA-256; exporting again", entry)
        return None
    return model_file


def cached_export(
    model: nn.Module, options: dict[str, Any], export: Callable[[Path], None], root: Path | None = None
) -> Path:
    """The path of ``model``'s verified cached graph for ``options``, exporting it first if needed.

    Args:
        model: the encoder (its weights and config are part of the key).
        options: export options that change the graph (pooling, precision, fusions, ...), JSON-able.
        export: writes the graph to the path it is given (and validates it); called only on a miss.
        root: cache dir (None: :func:`cache_dir`).

    Returns:
        ``<root>/<key>/model.onnx``.
    """
    root = cache_dir() if root is None else Path(root)
    key, description = cache_key(model, options)
    entry = root / key
    if entry.exists():
        found = _verified(entry)
        if found is not None:
            logger.info("using the cached ONNX export %s", found)
            return found
        shutil.rmtree(entry, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
    try:
        export(staging / MODEL_FILE)
        model_file = staging / MODEL_FILE
        record = {**description, "sha256": _sha256_file(model_file), "size": model_file.stat().st_size}
        (staging / ENTRY_FILE).write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
        try:
            staging.rename(entry)
        except OSError:  # another process finished the same key first: use its entry if it is sound
            if _verified(entry) is None:
                raise
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("cached the ONNX export of %s in %s", model.config.name or "the model", entry)
    return entry / MODEL_FILE
