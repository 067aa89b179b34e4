"""Streaming reads of embeddings for ``index build``: shard folders, parquet files and .npy files.

Sources, each yielding (vectors, metadata) batches in row order without loading everything:

* a folder written by ``visreg-hub embed`` (``manifest.json`` + ``part-*.parquet``): metadata
  ``{"path": ...}`` for files, ``{"path": <tar>, "key": ...}`` for tar members (plus ``cls``);
* a ``.parquet`` file with an ``embedding`` column (and optionally ``path``/``key``/``cls``);
* a ``.npy`` file (memory-mapped, no pickle) with its JSON sidecar naming the rows.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from visreg_hub.errors import VisregHubError
from visreg_hub.retrieval.arrays import as_float32_matrix
from visreg_hub.retrieval.files import _pyarrow, read_paths_file, sidecar_path

BATCH_ROWS = 65536


class EmbeddingSourceError(VisregHubError, ValueError):
    """An embeddings source for ``index build`` is missing, empty or malformed."""


@dataclass
class EmbeddingSources:
    """The files to read, their total row count, dimension and what the embed manifest says.

    Attributes:
        files: parquet or npy files in row order.
        count: total rows; dim: embedding width.
        info: model, pooling, normalize from the embed manifest or sidecar ({} if unknown).
    """

    files: list[Path]
    count: int
    dim: int
    info: dict[str, Any] = field(default_factory=dict)
    names: list[str] | None = None


def _parquet_shape(path: Path) -> tuple[int, int]:
    pa, pq = _pyarrow("reading .parquet")
    try:
        handle = pq.ParquetFile(path)
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise EmbeddingSourceError(f"{path} is not a readable parquet file: {exc}") from exc
    column = handle.schema_arrow.field("embedding") if "embedding" in handle.schema_arrow.names else None
    if column is None or not pa.types.is_fixed_size_list(column.type):
        raise EmbeddingSourceError(f"{path} has no fixed-size-list 'embedding' column; write it with embed")
    return handle.metadata.num_rows, column.type.list_size


def open_sources(paths: list[str | Path], *, paths_file: str | Path | None = None) -> EmbeddingSources:
    """Resolve shard folders and files into :class:`EmbeddingSources` (reads only metadata).

    Args:
        paths: embed output folders and/or .parquet/.npy files.
        paths_file: names the rows of a single .npy file (a JSON list, a sidecar or a text list)
            instead of its sidecar.
    """
    files: list[Path] = []
    info: dict[str, Any] = {}
    for item in paths:
        path = Path(item).expanduser()
        if path.is_dir():
            manifest = path / "manifest.json"
            parts = sorted(path.glob("part-*.parquet"))
            if not parts:
                raise EmbeddingSourceError(
                    f"{path} holds no part-*.parquet shards; run `visreg-hub embed` first"
                )
            if manifest.is_file():
                try:
                    data = json.loads(manifest.read_text(encoding="utf-8"))
                except (ValueError, RecursionError) as exc:
                    raise EmbeddingSourceError(f"{manifest} is not valid JSON") from exc
                model = data.get("model") if isinstance(data, dict) else None
                if isinstance(model, dict):
                    info = {"model": model.get("name"), "pooling": model.get("pooling"),
                            "normalized": model.get("normalize")}  # fmt: skip
                if isinstance(data, dict) and data.get("complete") is False:
                    raise EmbeddingSourceError(
                        f"{path} is an unfinished embed job ({len(parts)} shards so far); re-run the "
                        f"same `visreg-hub embed` command to finish it first"
                    )
            files.extend(parts)
        elif path.is_file() and path.suffix.lower() in (".parquet", ".npy"):
            files.append(path)
            sidecar = find_sidecar(path)
            if sidecar is not None:
                _, extra = read_paths_file(sidecar)
                info = {key: extra.get(key) for key in ("model", "pooling", "normalized")}
        elif not path.exists():
            raise EmbeddingSourceError(f"embeddings file not found: {str(item)!r}")
        else:
            raise EmbeddingSourceError(
                f"{str(item)!r} must end with .npy or .parquet, or be a `visreg-hub embed` output folder"
            )
    count, dim = 0, None
    for path in files:
        if path.suffix.lower() == ".npy":
            array = np.load(path, mmap_mode="r", allow_pickle=False)
            if array.ndim != 2:
                raise EmbeddingSourceError(f"{path} must hold an (N, D) array, got shape {array.shape}")
            rows, width = array.shape
        else:
            rows, width = _parquet_shape(path)
        if dim is not None and width != dim:
            raise EmbeddingSourceError(f"{path} has {width}-dimensional embeddings, the others {dim}")
        count, dim = count + rows, width
    if not count:
        raise EmbeddingSourceError(f"no embeddings in {[str(p) for p in paths]}")
    names = None
    if paths_file is not None:
        if len(files) != 1:
            raise EmbeddingSourceError("--paths names the rows of one embeddings file; pass exactly one")
        names, _ = read_paths_file(paths_file)
        if len(names) != count:
            raise EmbeddingSourceError(
                f"{paths_file} lists {len(names)} paths but {files[0]} holds {count} embeddings; "
                f"pass the paths file written together with these embeddings"
            )
    return EmbeddingSources(files, count, int(dim), info, names)


def find_sidecar(path: Path) -> Path | None:
    """``emb.npy.json`` (written since format 2 of the sidecar), else a legacy ``emb.json``."""
    for candidate in (sidecar_path(path), path.with_suffix(".json")):
        if candidate.is_file():
            return candidate
    return None


def _npy_metadata(path: Path, rows: int, names: list[str] | None) -> list[dict[str, Any] | None]:
    sidecar = find_sidecar(path)
    if names is None and sidecar is None:
        return [None] * rows
    if names is None:
        names, _ = read_paths_file(sidecar)
    if len(names) != rows:
        raise EmbeddingSourceError(f"{sidecar} names {len(names)} rows but {path} has {rows}")
    return [{"path": name} for name in names]


def iter_batches(sources: EmbeddingSources) -> Iterator[tuple[np.ndarray, list[dict[str, Any] | None]]]:
    """Yield (float32 (B, D) vectors, B metadata dicts) over every row, in order."""
    for path in sources.files:
        if path.suffix.lower() == ".npy":
            array = np.load(path, mmap_mode="r", allow_pickle=False)
            metadata = _npy_metadata(path, array.shape[0], sources.names)
            for start in range(0, array.shape[0], BATCH_ROWS):
                block = as_float32_matrix(np.asarray(array[start : start + BATCH_ROWS]), name=str(path))
                yield block, metadata[start : start + BATCH_ROWS]
            continue
        _, pq = _pyarrow("reading .parquet")
        handle = pq.ParquetFile(path)
        wanted = [name for name in ("embedding", "path", "key", "cls") if name in handle.schema_arrow.names]
        row = 0
        for batch in handle.iter_batches(batch_size=BATCH_ROWS, columns=wanted):
            column = batch.column("embedding")
            values = column.flatten().to_numpy(zero_copy_only=False)
            block = as_float32_matrix(values.reshape(len(column), sources.dim), name=str(path))
            fields = {name: batch.column(name).to_pylist() for name in wanted if name != "embedding"}
            if sources.names is not None:
                fields["path"] = sources.names[row : row + len(column)]
            row += len(column)
            metadata = [
                {name: values[i] for name, values in fields.items() if values[i] is not None} or None
                for i in range(len(column))
            ]
            yield block, metadata
