"""The index folder's ``manifest.json``: read it and validate every field's type and range.

The manifest comes from an index folder, which is not trusted: a wrong type, a huge number or a
deeply nested document must give a :class:`~visreg_hub.errors.CheckpointError` naming the field, never
a ``TypeError``/``RecursionError`` later on.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from visreg_hub import folders
from visreg_hub.errors import CheckpointError, DataNotFoundError
from visreg_hub.filehash import sha256_file
from visreg_hub.models.config import POOLINGS
from visreg_hub.retrieval.limits import MAX_DIM, PARAM_LIMITS

FORMAT_NAME = "visreg_hub.EmbeddingIndex"
FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
DATA_FILES = ("index.faiss", "ids.npy", "metadata.jsonl")
__all__ = ["folder_path", "read_manifest", "verify_files"]
MAX_MANIFEST_BYTES = 1 << 20
MAX_COUNT = 1 << 40
_HEX64 = re.compile(r"[0-9a-f]{64}")
# (name, allowed None, upper bound) of the positive integer search/build parameters
_NULLABLE = ("nlist", "nprobe", "pq_m")
_PARAMS = tuple((name, name in _NULLABLE, high) for name, high in PARAM_LIMITS.items())


def _int(value: Any, name: str, low: int, high: int, path: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise CheckpointError(f"{path}: {name} must be an integer in [{low}, {high}], got {value!r}")
    return value


def _optional_str(value: Any, name: str, path: Path) -> None:
    if value is not None and not isinstance(value, str):
        raise CheckpointError(f"{path}: {name} must be a string or null, got {type(value).__name__}")


def folder_path(folder: str | bytes | os.PathLike) -> Path:
    """An index folder given as str, bytes (named as ``os.fsdecode`` names them) or os.PathLike."""
    try:
        return Path(os.fsdecode(folder))
    except TypeError:
        raise TypeError(
            f"an index folder must be a str, bytes or os.PathLike path, got {type(folder).__name__}"
        ) from None


def _served_snapshot(folder: Path) -> str:
    """The snapshot a serve store's CURRENT names (``snapshot-NNNNNN``), for the message only."""
    try:
        with (folder / "CURRENT").open("rb") as handle:
            name = json.loads(handle.read(4096)).get("snapshot")
    except (OSError, ValueError, AttributeError):
        name = None
    return name if isinstance(name, str) and re.fullmatch(r"snapshot-\d{6}", name) else "snapshot-NNNNNN"


def check_inside(folder: Path, path: Path) -> None:
    """Refuse an index file that leads out of the folder or is no regular file, before it is opened: its
    bytes, or their digest in an error, must not leak another file."""
    folders.check_inside(folder, path, error=CheckpointError, what="index folder")


def verify_files(folder: str | bytes | os.PathLike, manifest: dict[str, Any]) -> None:
    """Check every data file the manifest lists against its recorded sha256.

    Raises:
        FileNotFoundError: a listed file is missing.
        CheckpointError: a file's content differs from what was saved.
    """
    folder = folder_path(folder)
    for name, expected in manifest["files"].items():
        path = folder / name
        check_inside(folder, path)
        if not path.is_file():
            raise DataNotFoundError(f"{path} is listed in the manifest but missing; rebuild the index")
        actual = sha256_file(path)
        if actual != expected:
            raise CheckpointError(
                f"checksum mismatch for {path}: the manifest records sha256 {str(expected)[:12]}..., "
                f"the file has {actual[:12]}...; the file was modified or corrupted, rebuild the index"
            )


def read_manifest(folder: str | bytes | os.PathLike) -> dict[str, Any]:
    """Read and validate ``folder/manifest.json`` without loading the index (cheap).

    Raises:
        FileNotFoundError: no manifest in the folder.
        CheckpointError: not valid JSON, not an index manifest, unknown version, a missing field or a
            field of the wrong type or range.
    """
    from visreg_hub.retrieval.factory import KINDS

    folder = folder_path(folder)
    path = folder / MANIFEST_NAME
    if folder.is_file():
        raise DataNotFoundError(
            f"{folder} is a file, not an index folder; pass the folder written by EmbeddingIndex.save or "
            f"`visreg-hub index build` (embeddings files are indexed with `visreg-hub index build`)"
        )
    check_inside(folder, path)
    if not path.is_file():
        if (folder / "CURRENT").is_file():
            raise DataNotFoundError(
                f"{folder} is a `visreg-hub serve` index store (a snapshot plus a write-ahead log), not an "
                f"index folder: stop the server (SIGTERM takes a final snapshot), then pass "
                f"{folder / _served_snapshot(folder)}"
            )
        raise DataNotFoundError(
            f"no {MANIFEST_NAME} in {folder}; pass a folder written by EmbeddingIndex.save "
            f"or `visreg-hub index build`"
        )
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise CheckpointError(f"{path} is larger than {MAX_MANIFEST_BYTES} bytes; not an index manifest")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"{path} is not valid (or is too deeply nested) UTF-8 JSON") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        if isinstance(manifest, dict) and manifest.get("format") == "visreg_hub.embedding_shards":
            raise CheckpointError(
                f"{folder} holds embeddings (`visreg-hub embed` output), not an index: build one first with "
                f"`visreg-hub index build {folder} -o INDEX`"
            )
        raise CheckpointError(f"{path} is not an EmbeddingIndex manifest")
    version = manifest.get("format_version")
    if version == 1:
        raise CheckpointError(
            f"{path} is a format 1 index (written before stable ids and remove); this visreg_hub reads "
            f"format {FORMAT_VERSION}: rebuild it with `visreg-hub index build` or EmbeddingIndex.save"
        )
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version {version!r}; this visreg_hub reads version {FORMAT_VERSION}. "
            f"Rebuild the index or upgrade visreg_hub"
        )
    required = ("dim", "metric", "kind", "count", "ntotal", "next_id", "normalized", "normalize", "params",
                "files", "model_name", "pooling", "build")  # fmt: skip
    missing = [key for key in required if key not in manifest]
    if missing:
        raise CheckpointError(f"{path} lacks required fields {missing}")
    _int(manifest["dim"], "dim", 1, MAX_DIM, path)
    count = _int(manifest["count"], "count", 0, MAX_COUNT, path)
    ntotal = _int(manifest["ntotal"], "ntotal", 0, MAX_COUNT, path)
    if ntotal < count:  # HNSW keeps removed vectors (ntotal >= count); no index holds fewer than count
        raise CheckpointError(
            f"{path}: count {count} is more than the index's ntotal {ntotal}; rebuild the index"
        )
    _int(manifest["next_id"], "next_id", 0, (1 << 63) - 1, path)
    if not isinstance(manifest["kind"], str) or manifest["kind"] not in KINDS:
        raise CheckpointError(f"{path}: kind must be one of {KINDS}, got {manifest['kind']!r}")
    if not isinstance(manifest["metric"], str) or manifest["metric"] not in ("ip", "l2"):
        raise CheckpointError(f"{path}: metric must be 'ip' or 'l2', got {manifest['metric']!r}")
    if manifest["kind"] != "hnsw" and manifest["ntotal"] != count:
        raise CheckpointError(f"{path}: ntotal must equal count for kind {manifest['kind']!r}")
    for key in ("normalized", "normalize"):
        if not isinstance(manifest[key], bool):
            raise CheckpointError(f"{path}: {key} must be true or false, got {manifest[key]!r}")
    for key in ("model_name", "pooling"):
        _optional_str(manifest[key], key, path)
    if manifest["pooling"] is not None and manifest["pooling"] not in POOLINGS:
        got = manifest["pooling"]
        raise CheckpointError(f"{path}: pooling must be one of {POOLINGS} or null, got {got!r}")
    if not isinstance(manifest["build"], dict):
        raise CheckpointError(f"{path}: build must be an object, got {type(manifest['build']).__name__}")
    params = manifest["params"]
    if not isinstance(params, dict):
        raise CheckpointError(f"{path}: params must be an object, got {type(params).__name__}")
    for name, nullable, high in _PARAMS:
        if name not in params:
            raise CheckpointError(f"{path}: params lacks {name!r}")
        if not (nullable and params[name] is None):
            _int(params[name], f"params.{name}", 1, high, path)
    if manifest["kind"] in ("ivf", "ivfsq8", "ivfpq") and params["nlist"] is None:
        raise CheckpointError(f"{path}: params.nlist is required for kind {manifest['kind']!r}")
    files = manifest["files"]
    if not isinstance(files, dict) or set(files) != set(DATA_FILES):
        raise CheckpointError(f"{path} must list the sha256 of exactly {list(DATA_FILES)}")
    bad = [
        name for name, digest in files.items() if not isinstance(digest, str) or not _HEX64.fullmatch(digest)
    ]
    if bad:
        raise CheckpointError(f"{path}: files.{bad[0]} must be a 64-character lowercase hex sha256")
    return manifest
