"""Saving and loading EmbeddingIndex folders, with a checksummed manifest and no pickle.

Folder layout::

    manifest.json   format version, dim, metric, kind, count, model name, pooling, normalized flag,
                    search parameters, sha256 of every other file (written last)
    index.faiss     faiss.write_index output (FAISS's own binary format, not pickle)
    ids.npy         int64 (count,), written and read with allow_pickle=False
    metadata.json   JSON list of length count (dicts or null)

The checksums detect corruption and accidental edits; they are not a signature, so only load index
folders from sources you trust.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from visreg_hub.errors import CheckpointError, require_extra
from visreg_hub.hub.format import sha256_file

if TYPE_CHECKING:  # pragma: no cover
    from visreg_hub.retrieval.index import EmbeddingIndex

logger = logging.getLogger(__name__)

FORMAT_NAME = "visreg_hub.EmbeddingIndex"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
INDEX_NAME = "index.faiss"
IDS_NAME = "ids.npy"
METADATA_NAME = "metadata.json"
_DATA_FILES = (INDEX_NAME, IDS_NAME, METADATA_NAME)
_FAISS_CLASS = {"flat": "IndexFlat", "ivf": "IndexIVFFlat", "hnsw": "IndexHNSWFlat"}


def save_index(index: EmbeddingIndex, folder: str | Path) -> Path:
    """Write ``index`` to ``folder`` (created if needed; existing index files are replaced)."""
    faiss = require_extra("faiss", "index")
    if not index.is_trained:
        raise ValueError("cannot save an untrained IVF index; add() or train() first")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # removing the old manifest first means a crash mid-save leaves a folder that refuses to load
    (folder / MANIFEST_NAME).unlink(missing_ok=True)
    faiss.write_index(index._faiss_index, str(folder / INDEX_NAME))
    np.save(folder / IDS_NAME, index._ids, allow_pickle=False)
    (folder / METADATA_NAME).write_text(json.dumps(index._metadata), encoding="utf-8")
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "dim": index.dim,
        "metric": index.metric,
        "kind": index.kind,
        "count": len(index),
        "model_name": index.model_name,
        "pooling": index.pooling,
        "normalized": index.normalized,
        "normalize": index.normalize,
        "params": {
            "nlist": index.nlist,
            "nprobe": index.nprobe,
            "m": index.m,
            "ef_construction": index.ef_construction,
            "ef_search": index.ef_search,
        },
        "files": {name: sha256_file(folder / name) for name in _DATA_FILES},
    }
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    logger.info("saved %s index of %d vectors to %s", index.kind, len(index), folder)
    return folder


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """Read and validate ``folder/manifest.json`` without loading the index (cheap).

    Raises:
        FileNotFoundError: no manifest in the folder.
        CheckpointError: not valid JSON, not an index manifest, unknown version, missing fields.
    """
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"no {MANIFEST_NAME} in {folder}; pass a folder written by EmbeddingIndex.save "
            f"or `visreg-hub index build`"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path} is not an EmbeddingIndex manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version {version!r}; this visreg_hub reads version {FORMAT_VERSION}. "
            f"Rebuild the index or upgrade visreg_hub"
        )
    missing = [
        key
        for key in ("dim", "metric", "kind", "count", "normalized", "params", "files")
        if key not in manifest
    ]
    if missing:
        raise CheckpointError(f"{path} lacks required fields {missing}")
    if manifest["kind"] not in _FAISS_CLASS or manifest["metric"] not in ("ip", "l2"):
        raise CheckpointError(f"{path} has unknown metric/kind {manifest['metric']!r}/{manifest['kind']!r}")
    if not isinstance(manifest["files"], dict) or set(manifest["files"]) != set(_DATA_FILES):
        raise CheckpointError(f"{path} must list the sha256 of exactly {list(_DATA_FILES)}")
    return manifest


def load_index(cls: type[EmbeddingIndex], folder: str | Path) -> EmbeddingIndex:
    """Load a folder written by :func:`save_index`, verifying every checksum before parsing any file."""
    faiss = require_extra("faiss", "index")
    folder = Path(folder)
    manifest = read_manifest(folder)
    for name, expected in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is listed in the manifest but missing; rebuild the index")
        actual = sha256_file(path)
        if actual != expected:
            raise CheckpointError(
                f"checksum mismatch for {path}: the manifest records sha256 {str(expected)[:12]}..., "
                f"the file has {actual[:12]}...; the file was modified or corrupted, rebuild the index"
            )
    params = manifest["params"]
    index = cls(
        manifest["dim"],
        metric=manifest["metric"],
        kind=manifest["kind"],
        nlist=params.get("nlist"),
        nprobe=params.get("nprobe"),
        m=params.get("m", 32),
        ef_construction=params.get("ef_construction", 40),
        ef_search=params.get("ef_search", 64),
        normalize=bool(manifest.get("normalize", False)),
        model_name=manifest.get("model_name"),
        pooling=manifest.get("pooling"),
    )
    raw = faiss.read_index(str(folder / INDEX_NAME))
    ids = np.load(folder / IDS_NAME, allow_pickle=False)
    metadata = json.loads((folder / METADATA_NAME).read_text(encoding="utf-8"))
    _check_contents(manifest, raw, ids, metadata, faiss, folder)
    if manifest["kind"] == "hnsw":
        raw.hnsw.efSearch = index.ef_search
    if manifest["kind"] == "ivf" and index.nprobe is not None:
        raw.nprobe = min(index.nprobe, raw.nlist)
    index._faiss_index = raw
    index._ids = ids
    index._id_set = set(ids.tolist())
    index._metadata = metadata
    index._all_unit_norm = bool(manifest["normalized"])
    return index


def _check_contents(manifest, raw, ids, metadata, faiss, folder: Path) -> None:
    """Cross-check the parsed files against the manifest; collect every disagreement in one message."""
    problems = []
    if raw.d != manifest["dim"]:
        problems.append(f"dim: manifest says {manifest['dim']}, index.faiss has {raw.d}")
    if raw.ntotal != manifest["count"]:
        problems.append(f"count: manifest says {manifest['count']}, index.faiss has {raw.ntotal}")
    expected_metric = faiss.METRIC_INNER_PRODUCT if manifest["metric"] == "ip" else faiss.METRIC_L2
    if raw.metric_type != expected_metric:
        problems.append(f"metric: manifest says {manifest['metric']!r}, index.faiss has {raw.metric_type}")
    if not type(raw).__name__.startswith(_FAISS_CLASS[manifest["kind"]]):
        problems.append(f"kind: manifest says {manifest['kind']!r}, index.faiss is {type(raw).__name__}")
    if ids.dtype != np.int64 or ids.shape != (manifest["count"],):
        problems.append(f"ids.npy: expected int64 ({manifest['count']},), got {ids.dtype} {ids.shape}")
    if not isinstance(metadata, list) or len(metadata) != manifest["count"]:
        problems.append(f"metadata.json: expected a list of {manifest['count']} entries")
    if problems:
        raise CheckpointError(f"index folder {folder} disagrees with its manifest: " + "; ".join(problems))
