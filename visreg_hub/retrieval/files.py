"""Embedding files: (N, E) vectors in ``.npy`` or ``.parquet`` plus a JSON sidecar naming each row.

``write_embeddings("emb.npy", ...)`` writes ``emb.npy`` (float32, no pickle) and ``emb.npy.json``::

    {"format": "visreg_hub.embeddings", "format_version": 1, "model": ..., "pooling": ..., "normalized": ...,
     "dim": E, "count": N, "paths": [N file paths, row order], "failures": [{"path": ..., "reason": ...}]}

A ``.parquet`` file holds the columns ``path`` (string) and ``embedding`` (fixed-size list of float32);
it needs pyarrow, which is optional. ``visreg-hub embed`` writes these files and ``index build`` reads them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from visreg_hub.durable import write_atomic_pair
from visreg_hub.errors import DataNotFoundError, MissingExtraError, UserInputError
from visreg_hub.jsonio import parse_json
from visreg_hub.native_io import library_source, split_name, write_parquet
from visreg_hub.retrieval.arrays import as_float32_matrix

SUFFIXES = (".npy", ".parquet")
SIDECAR_FORMAT = "visreg_hub.embeddings"


@dataclass
class EmbeddingFile:
    """What :func:`read_embeddings` returns.

    Attributes:
        embeddings: float32 (N, E).
        paths: N file paths in row order, or None when neither the file nor a sidecar names them.
        info: the sidecar's other fields (model, pooling, normalized, failures), {} without a sidecar.
    """

    embeddings: np.ndarray
    paths: list[str] | None
    info: dict[str, Any] = field(default_factory=dict)


def _pyarrow(purpose: str):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise MissingExtraError(
            f"{purpose} needs pyarrow, which is not installed; run `pip install 'visreg_hub[parquet]'` or "
            "use .npy"
        ) from exc
    return pa, pq


def check_suffix(path: str | Path, what: str = "embeddings file", *, need_pyarrow: bool = True) -> Path:
    """Reject paths that are neither ``.npy`` nor ``.parquet`` (and ``.parquet`` without pyarrow)."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise UserInputError(
            f"{what} {str(path)!r} must end with .npy or .parquet (got {path.suffix or 'no suffix'!r})"
        )
    if need_pyarrow and path.suffix.lower() == ".parquet":
        _pyarrow(f"{path.suffix} {what}")
    return path


def sidecar_path(path: str | Path) -> Path:
    """``emb.npy`` -> ``emb.npy.json``, ``emb.parquet`` -> ``emb.parquet.json`` (one sidecar per file;
    ``emb.json``, written by earlier versions for both, is still read when the new name is absent)."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def write_embeddings(
    path: str | Path,
    embeddings: Any,
    *,
    paths: Sequence[str],
    failures: Sequence[tuple[str, str]] = (),
    model: str | None = None,
    pooling: str | None = None,
    normalized: bool | None = None,
    weights_sha256: str | None = None,
) -> Path:
    """Write (N, E) embeddings to ``.npy``/``.parquet`` and the JSON sidecar.

    Args:
        path: output file, ``.npy`` or ``.parquet``.
        embeddings: (N, E) floating array.
        paths: N file paths, one per row.
        failures: (path, reason) of inputs that could not be embedded.
        model, pooling, normalized: how the embeddings were made (recorded for ``index build``/``search``).
        weights_sha256: the model's :func:`~visreg_hub.hub.format.weights_digest`; the index records it
            so that ``search`` can tell when a model folder of the same name now holds other weights.

    Returns:
        the sidecar path.
    """
    path = check_suffix(path, "output")
    array = as_float32_matrix(embeddings, name="embeddings")
    if len(paths) != array.shape[0]:
        raise UserInputError(f"got {len(paths)} paths for {array.shape[0]} embeddings; pass one path per row")

    def write_vectors(target: Path) -> None:
        if path.suffix.lower() == ".npy":
            with open(target, "wb") as handle:  # a file object: np.save would append .npy to the tmp name
                np.save(handle, array, allow_pickle=False)
            return
        pa, _ = _pyarrow("writing .parquet")
        column = pa.FixedSizeListArray.from_arrays(pa.array(array.reshape(-1)), array.shape[1])
        split = [split_name(name) for name in paths]
        columns = {"path": pa.array([text for text, _ in split], pa.string()), "embedding": column}
        if any(raw is not None for _, raw in split):  # names that are not UTF-8: exact bytes, as embed writes
            columns["path_bytes"] = pa.array([raw for _, raw in split], pa.binary())
        write_parquet(pa.table(columns), target)

    sidecar = {
        "format": SIDECAR_FORMAT,
        "format_version": 1,
        "model": model,
        "weights_sha256": weights_sha256,
        "pooling": pooling,
        "normalized": normalized,
        "dim": int(array.shape[1]),
        "count": int(array.shape[0]),
        "paths": list(paths),
        "failures": [{"path": p, "reason": reason} for p, reason in failures],
    }
    text = json.dumps(sidecar, indent=2) + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic_pair(
            path, write_vectors, sidecar_path(path), lambda target: target.write_text(text, "utf-8")
        )
    except OSError as exc:
        raise UserInputError(
            f"cannot write {path}: {exc.strerror or exc}; free some space or choose another output "
            "(an earlier file there was left as it was)"
        ) from exc
    return sidecar_path(path)


def read_paths_file(path: str | Path) -> tuple[list[str], dict[str, Any]]:
    """Read file paths: a JSON list of strings, a sidecar (object with ``paths``), or one path per line.

    Returns:
        (paths, other fields of a sidecar or {}).
    """
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"paths file not found: {str(path)!r}")
    if path.suffix.lower() != ".json":
        # as embed reads its .txt lists: a name that is not UTF-8 keeps its bytes (os.fsdecode's form)
        with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
            return [line.strip() for line in handle.read().splitlines() if line.strip()], {}
    # deep nesting, bad JSON, bytes that are not UTF-8: one clear error naming the file
    data = parse_json(path.read_bytes(), str(path), error=UserInputError)
    paths = data.get("paths") if isinstance(data, dict) else data
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise UserInputError(f"{path} must hold a JSON list of file paths or an object with a 'paths' list")
    info = {key: value for key, value in data.items() if key != "paths"} if isinstance(data, dict) else {}
    return paths, info


def read_embeddings(path: str | Path, *, paths_file: str | Path | None = None) -> EmbeddingFile:
    """Read an embeddings file and the paths naming its rows.

    Args:
        path: ``.npy`` (read with allow_pickle=False) or ``.parquet``.
        paths_file: where the row paths are; None uses the sidecar next to ``path`` if it exists, else
            the parquet ``path`` column.

    Raises:
        FileNotFoundError: missing file. ValueError: wrong suffix, non-numeric array, row-count mismatch.
    """
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"embeddings file not found: {str(path)!r}")
    check_suffix(path)
    paths = None
    if path.suffix.lower() == ".npy":
        try:
            raw = np.load(path, allow_pickle=False)
        except ValueError as exc:  # object arrays need pickle, which is never allowed
            raise UserInputError(f"{path} is not a plain numeric .npy array: {exc}") from exc
    else:
        _, pq = _pyarrow("reading .parquet")
        with library_source(path) as source:
            table = pq.read_table(source)
        if "embedding" not in table.column_names:
            raise UserInputError(f"{path} has no 'embedding' column (columns: {table.column_names})")
        column = table.column("embedding").combine_chunks()
        values = column.flatten().to_numpy(zero_copy_only=False)
        if len(column) == 0 or values.size % len(column):
            raise UserInputError(f"{path}: the 'embedding' column must hold equal-length vectors")
        raw = values.reshape(len(column), -1)
        paths = table.column("path").to_pylist() if "path" in table.column_names else None
        if paths is not None and "path_bytes" in table.column_names:
            exact = table.column("path_bytes").to_pylist()
            paths = [os.fsdecode(raw) if raw else text for text, raw in zip(paths, exact, strict=True)]
    embeddings = as_float32_matrix(raw, name=f"embeddings in {path}")
    info: dict[str, Any] = {}
    legacy = path.with_suffix(".json")
    source = (
        Path(paths_file)
        if paths_file is not None
        else sidecar_path(path)
        if sidecar_path(path).is_file() or not legacy.is_file()
        else legacy
    )
    if paths_file is not None or source.is_file():
        paths, info = read_paths_file(source)
    if paths is not None and len(paths) != embeddings.shape[0]:
        raise UserInputError(
            f"{source} lists {len(paths)} paths but {path} holds {embeddings.shape[0]} embeddings; "
            f"pass the paths file written together with these embeddings"
        )
    return EmbeddingFile(embeddings=embeddings, paths=paths, info=info)
