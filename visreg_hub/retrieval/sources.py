"""Streaming reads of embeddings for ``index build``: shard folders, parquet files and .npy files.

Sources, each yielding (vectors, metadata) batches in row order without loading everything:

* a finished folder written by ``visreg-hub embed``: exactly the shards ``part-00000.parquet`` ..
  its ``manifest.json`` lists (a missing shard, an unfinished job or a stray part file is refused);
  metadata ``{"path": ...}`` for files, ``{"path": <tar>, "key": ...}`` for tar members (plus ``cls``,
  and ``path_bytes_hex``/``key_bytes_hex`` for names that are not UTF-8);
* a ``.parquet`` file with an ``embedding`` column (and optionally ``path``/``key``/``cls``);
* a ``.npy`` file (memory-mapped, no pickle) with its JSON sidecar naming the rows.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from visreg_hub import folders
from visreg_hub.errors import ConfigError, VisregHubError, one_line, shown
from visreg_hub.jsonio import read_json_file
from visreg_hub.native_io import library_source, name_fields
from visreg_hub.retrieval.arrays import as_float32_matrix
from visreg_hub.retrieval.files import _pyarrow, read_paths_file, sidecar_path

BATCH_ROWS = 65536
# the embed folder's format (visreg_hub.bulk.output; not imported: that package loads torch)
EMBED_FORMAT = "visreg_hub.embedding_shards"
EMBED_MANIFEST = "manifest.json"
FAILURES_DIR = ".failures"  # each shard's failure records (visreg_hub.bulk.output.FAILURES_DIR)
MAX_EMBED_MANIFEST_BYTES = 64 * 2**20
INFO_FIELDS = ("weights_sha256", "model", "pooling", "normalized")
_SHARD = re.compile(r"part-(\d{5,})\.parquet")
# each shard's parquet schema metadata (visreg_hub.bulk.output.SHARD_JOB_KEY / SHARD_NUMBER_KEY)
SHARD_JOB_KEY = b"visreg_hub.job_id"
SHARD_NUMBER_KEY = b"visreg_hub.shard"


def _shard_name(number: int) -> str:
    return f"part-{number:05d}.parquet"  # as visreg_hub.bulk.output.shard_name


class EmbeddingSourceError(VisregHubError, ValueError):
    """An embeddings source for ``index build`` is missing, empty or malformed."""


def _open_npy(path: Path) -> np.ndarray:
    """``path`` memory-mapped (never unpickled); a file numpy cannot map is an error naming it."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:  # object dtype, damaged header, truncated data
        raise EmbeddingSourceError(
            f"{path} cannot be read as a numeric .npy array ({one_line(exc)}); write it again, e.g. with "
            "`visreg-hub embed`, or np.save of a float array"
        ) from None


@dataclass
class EmbeddingSources:
    """The files to read, their total row count, dimension and what the embed manifest says.

    Attributes:
        files: parquet or npy files in row order.
        count: total rows; dim: embedding width.
        info: model, weights_sha256, pooling, normalized from the embed manifests or sidecars (a field
            is absent if no source records it).
    """

    files: list[Path]
    count: int
    dim: int
    info: dict[str, Any] = field(default_factory=dict)
    names: list[str] | None = None


def parquet_shape(path: Path) -> tuple[int, int | None, dict[bytes, bytes]]:
    """(rows, embedding width, schema metadata) of a parquet file; the width is None for a file of no rows
    whose column has no fixed width (pandas writes an emptied frame's list column with no element type).

    The ``embedding`` column is a fixed-size list of floats (what ``embed`` writes; its width is in the
    footer) or a plain list of floats with one length on every row (what pandas' ``to_parquet`` writes,
    e.g. after filtering the shards: the lengths are read, a batch at a time).
    """
    pa, pq = _pyarrow("reading .parquet")
    try:
        with library_source(path) as source:
            handle = pq.ParquetFile(source)
            schema, rows = handle.schema_arrow, handle.metadata.num_rows
            column = schema.field("embedding") if "embedding" in schema.names else None
            kind = None if column is None else column.type
            if kind is not None and rows == 0 and not pa.types.is_fixed_size_list(kind):
                return 0, None, schema.metadata or {}  # pandas writes no element type for no rows
            variable = kind is not None and (pa.types.is_list(kind) or pa.types.is_large_list(kind))
            if variable and pa.types.is_floating(kind.value_type):
                return rows, _uniform_width(handle, path), schema.metadata or {}
    except EmbeddingSourceError:  # its own message (uneven or null rows), not "unreadable: re-run embed"
        raise
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise EmbeddingSourceError(
            f"{path} is not a readable parquet file ({exc}); if it is a shard of an embed folder, delete it "
            "and re-run the same `visreg-hub embed` command to write it again"
        ) from exc
    if kind is None or not pa.types.is_fixed_size_list(kind) or not pa.types.is_floating(kind.value_type):
        raise EmbeddingSourceError(
            f"{path} has no 'embedding' column of float lists (found {kind or 'none'}); write one list of "
            "floats per row (pandas: a column of equal-length arrays), or a .npy matrix"
        )
    return rows, kind.list_size, schema.metadata or {}


def _uniform_width(handle: Any, path: Path) -> int:
    """The one length of every row of a list<float> ``embedding`` column; refused when rows differ or are
    null (a width cannot be guessed), or when there are none."""
    import pyarrow.compute as pc

    widths: set[int] = set()
    for batch in handle.iter_batches(batch_size=BATCH_ROWS, columns=["embedding"]):
        column = batch.column("embedding")
        if column.null_count:
            raise EmbeddingSourceError(f"{path} has {column.null_count} null 'embedding' rows; drop them")
        lengths = pc.list_value_length(column)
        widths.update({pc.min(lengths).as_py(), pc.max(lengths).as_py()} if len(column) else set())
        if len(widths) > 1:
            raise EmbeddingSourceError(
                f"{path}: 'embedding' rows have different lengths ({min(widths)} to {max(widths)}); every "
                "row needs the same width"
            )
    if not widths or widths == {0}:
        raise EmbeddingSourceError(f"{path} has no embedding values; nothing to index")
    return widths.pop()


def open_sources(paths: list[str | Path], *, paths_file: str | Path | None = None) -> EmbeddingSources:
    """Resolve shard folders and files into :class:`EmbeddingSources` (reads only metadata).

    Args:
        paths: embed output folders and/or .parquet/.npy files.
        paths_file: names the rows of a single .npy file (a JSON list, a sidecar or a text list)
            instead of its sidecar.

    Raises:
        EmbeddingSourceError: a missing, unfinished or inconsistent source.
        ConfigError: the sources were embedded with different models, pooling or normalisation.
    """
    files: list[Path] = []
    infos: list[tuple[str, dict[str, Any]]] = []
    shard_rows: dict[Path, tuple[int, int, int]] = {}  # shard file -> (inputs, failures, rows expected)
    shard_jobs: dict[Path, tuple[int, Any]] = {}  # shard file -> (shard number, the job's id)
    for item in paths:
        path = Path(item).expanduser()
        if path.is_dir():
            parts, info, expected, jobs = _embed_folder(path)
            files.extend(parts)
            shard_rows.update(expected)
            shard_jobs.update(jobs)
        elif path.is_file() and path.suffix.lower() in (".parquet", ".npy"):
            files.append(path)
            sidecar = find_sidecar(path)
            info = {}
            if sidecar is not None:
                _, extra = read_paths_file(sidecar)
                info = _sidecar_info(sidecar, extra)
        elif not path.exists():
            raise EmbeddingSourceError(f"embeddings file not found: {str(item)!r}")
        else:
            raise EmbeddingSourceError(
                f"{str(item)!r} must end with .npy or .parquet, or be a `visreg-hub embed` output folder"
            )
        infos.append((str(path), info))
    seen: dict[Path, Path] = {}
    for path in files:  # the same file given twice (or a folder and one of its shards) would index it twice
        real = path.resolve()
        if real in seen:
            raise EmbeddingSourceError(
                f"{str(path)!r} is given twice (also as {str(seen[real])!r}); each source may be named once, "
                "or every one of its vectors would be indexed twice"
            )
        seen[real] = path
    info = merge_infos(infos)
    count, dim = 0, None
    for path in files:
        if path.suffix.lower() == ".npy":
            array = _open_npy(path)
            if array.ndim != 2:
                raise EmbeddingSourceError(f"{path} must hold an (N, D) array, got shape {array.shape}")
            rows, width = array.shape
            metadata = {}
        else:
            rows, width, metadata = parquet_shape(path)
        if path in shard_rows and rows != shard_rows[path][2]:
            inputs, failed, _ = shard_rows[path]
            raise EmbeddingSourceError(
                f"{path} holds {rows} rows, but this shard of the job had {inputs} inputs and {failed} "
                "failures: the file is not this job's (copied in or damaged); delete it and re-run the same "
                "`visreg-hub embed` command to write it again"
            )
        if path in shard_jobs:
            check_shard_job(path, *shard_jobs[path], metadata)
        if width is None:  # no rows and no width: nothing to index, and nothing to disagree with
            continue
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


def _read_embed_manifest(folder: Path) -> dict[str, Any]:
    """The embed job's ``manifest.json``, checked to be one (size-capped: the folder is not trusted)."""
    manifest = folder / EMBED_MANIFEST
    check_embed_file(folder, manifest)
    if not manifest.is_file():
        raise EmbeddingSourceError(
            f"{folder} has no {EMBED_MANIFEST}, so which part files belong to the job is unknown; pass "
            f"the .parquet files themselves, or embed into a new folder with `visreg-hub embed`"
        )
    data = read_json_file(manifest, error=EmbeddingSourceError, max_bytes=MAX_EMBED_MANIFEST_BYTES)
    if not isinstance(data, dict) or data.get("format") != EMBED_FORMAT:
        raise EmbeddingSourceError(f"{manifest} is not a `visreg-hub embed` manifest")
    return data


def _embed_folder(
    folder: Path,
) -> tuple[list[Path], dict[str, Any], dict[Path, tuple[int, int, int]], dict[Path, tuple[int, Any]]]:
    """(the job's part files in shard order, its model info, per part file its inputs, failures and
    expected rows, and per part file its shard number and the job's id) of a finished `embed` folder.

    why: the manifest, not a glob, says which shards make the job: a missing shard would silently
    shift every later row id, and a part file copied in from another job would mix its rows in.
    """
    data = _read_embed_manifest(folder)
    if data.get("complete") is not True:
        raise EmbeddingSourceError(
            f"{folder} is an unfinished embed job; re-run the same `visreg-hub embed` command to finish it"
        )
    num_shards = data.get("num_shards")
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        raise EmbeddingSourceError(f"{folder}/{EMBED_MANIFEST}: num_shards must be a positive integer")
    present, strays = _part_files(folder, num_shards)
    missing = []
    for number in range(num_shards):  # stops after a few: at most len(present) + 3 steps
        if number not in present:
            missing.append(_shard_name(number))
            if len(missing) == 3:
                break
    if missing:
        raise EmbeddingSourceError(
            f"{folder} is missing shard(s) {', '.join(missing)} of the {num_shards} its manifest lists; "
            f"re-run the same `visreg-hub embed` command to write them again"
        )
    if strays:
        raise EmbeddingSourceError(
            f"{folder} holds part files that are not shards of its job ({', '.join(strays[:3])}); move them "
            f"out of the folder"
        )
    model = data.get("model")
    info = {}
    if isinstance(model, dict):
        info = {"model": model.get("name"), "weights_sha256": model.get("weights_sha256"),
                "pooling": model.get("pooling"), "normalized": model.get("normalize")}  # fmt: skip
    parts = [folder / _shard_name(number) for number in range(num_shards)]
    for part in parts:
        check_embed_file(folder, part)
    jobs = {part: (number, data.get("job_id")) for number, part in enumerate(parts)}
    return parts, info, _expected_rows(folder, data, parts), jobs


def check_shard_job(part: Path, number: int, job_id: Any, metadata: dict[bytes, bytes]) -> None:
    """Refuse a part file that another embed job wrote (or that was renamed from another shard number).

    why: a shard copied in from another job under a valid name (same images, other weights) has the
    right width and often the right row count, so only the job id the embed job writes into each
    shard's parquet metadata tells it apart. A job whose manifest has no ``job_id`` predates them: its
    own shards carry none, so a shard that carries one comes from another job.
    """
    found, shard = metadata.get(SHARD_JOB_KEY), metadata.get(SHARD_NUMBER_KEY)
    expected = job_id.encode() if isinstance(job_id, str) else None
    if found == expected and (expected is None or shard == str(number).encode()):
        return
    if found == expected:
        why = f"it was written as shard {_text(shard)}"
    elif found is None:
        why = "it carries no job id, unlike this job's shards"
    else:
        why = f"it was written by embed job {_text(found)}, this job is {_text(expected)}"
    raise EmbeddingSourceError(
        f"{part} is not shard {number} of the embed job in {part.parent} ({why}): a part file copied from "
        f"another job would mix its embeddings in; delete it and re-run the same `visreg-hub embed` "
        f"command to write it again"
    )


def _text(value: bytes | None) -> str:
    """A short printable form of a job id or shard number from an untrusted file."""
    return "none (an older job)" if value is None else repr(value.decode("utf-8", "replace")[:16])


def _expected_rows(folder: Path, data: dict[str, Any], parts: list[Path]) -> dict[Path, tuple[int, int, int]]:
    """Per shard: (inputs, failures, rows = inputs - failures), from the manifest and ``.failures/``.

    why: a part file copied from another job with the same model, or a truncated copy, has the right
    name and width; only its row count gives it away, and a wrong count shifts every later row id.
    """
    shard_size, inputs = data.get("shard_size"), (data.get("inputs") or {}).get("count")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (shard_size, inputs)):
        return {}  # an older or hand-made manifest: nothing to check against
    expected = {}
    for number, part in enumerate(parts):
        size = max(0, min(shard_size, inputs - number * shard_size))
        failed = shard_failures(folder, number)
        expected[part] = (size, failed, size - failed)
    return expected


def check_embed_file(folder: Path, path: Path) -> None:
    """Refuse a file of an embed output folder that leads out of it (a planted symlink would copy another
    file's lines into ``failures.jsonl``, or its rows into an index) or is no regular file."""
    folders.check_inside(folder, path, error=EmbeddingSourceError, what="embed output folder")


def shard_failures(folder: Path, number: int) -> int:
    """How many inputs of shard ``number`` of the embed folder failed (lines of its ``.failures`` file)."""
    record = folder / FAILURES_DIR / f"part-{number:05d}.jsonl"
    check_embed_file(folder, record)
    if not record.is_file():
        return 0
    with record.open("rb") as handle:
        return sum(1 for line in handle if line.strip())


def _part_files(folder: Path, num_shards: int) -> tuple[set[int], list[str]]:
    """(shard numbers below ``num_shards`` present, sorted names of other ``part-*.parquet`` files)."""
    present: set[int] = set()
    strays: list[str] = []
    with os.scandir(folder) as scan:
        for entry in scan:
            if not (entry.name.startswith("part-") and entry.name.endswith(".parquet")):
                continue
            match = _SHARD.fullmatch(entry.name)
            number = int(match.group(1)) if match else -1
            if match and entry.name == _shard_name(number) and number < num_shards:
                present.add(number)
            else:
                strays.append(entry.name)
    return present, sorted(strays)


def merge_infos(infos: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """One model info for all sources; refuse sources embedded by different model setups.

    why: an index compares every row with a query embedded by the one recorded model; rows from
    another model, pooling or normalisation give meaningless scores without any error. A field one
    source does not record is not compared. Weights digests, when both record one, decide over names
    (one model can be named by registry name or by folder).
    """
    merged: dict[str, Any] = {}
    owner: dict[str, str] = {}
    for source, info in infos:
        for name in INFO_FIELDS:
            value = info.get(name)
            if value is None:
                continue
            named_by_weights = name == "model" and merged.get("weights_sha256") and info.get("weights_sha256")
            if name in merged and merged[name] != value and not named_by_weights:
                raise ConfigError(
                    f"cannot build one index from {owner[name]} and {source}: they were embedded with a "
                    f"different {name} ({shown(merged[name])} vs {shown(value)}); build one index per "
                    f"model setup, or re-embed one source with the other's settings"
                )
            merged.setdefault(name, value)
            owner.setdefault(name, source)
    return merged


# the sidecar fields an index records, with the types its manifest accepts (an index that builds must load)
_SIDECAR_TYPES = {"model": (str,), "pooling": (str,), "normalized": (bool,), "weights_sha256": (str,)}


def _sidecar_info(sidecar: Path, extra: dict[str, Any]) -> dict[str, Any]:
    """The model fields of a ``.npy`` sidecar (each may be missing or null), type-checked.

    Raises:
        EmbeddingSourceError: a field of the wrong type, naming the sidecar (the index would be built, then
            refused by ``load``: its manifest accepts only these types).
    """
    for key, types in _SIDECAR_TYPES.items():
        value = extra.get(key)
        if value is not None and not isinstance(value, types):
            kind = " or ".join("true/false" if t is bool else "a string" for t in types)
            raise EmbeddingSourceError(
                f"{sidecar}: {key!r} must be {kind} or null, got {type(value).__name__} {value!r}; fix the "
                "sidecar or write it again with `visreg-hub embed`"
            )
    info = {key: extra.get(key) for key in ("model", "pooling", "normalized")}
    info["weights_sha256"] = _digest_or_none(extra.get("weights_sha256"))
    return info


def _digest_or_none(value: Any) -> str | None:
    """A sidecar's ``weights_sha256`` if it is one (64 lowercase hex digits), else None: the sidecar is
    untrusted, and the digest only ever feeds a warning in ``search``."""
    return value if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) else None


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
    return [name_fields(name) for name in names]


def iter_batches(sources: EmbeddingSources) -> Iterator[tuple[np.ndarray, list[dict[str, Any] | None]]]:
    """Yield (float32 (B, D) vectors, B metadata dicts) over every row, in order."""
    for path in sources.files:
        if path.suffix.lower() == ".npy":
            array = _open_npy(path)
            metadata = _npy_metadata(path, array.shape[0], sources.names)
            for start in range(0, array.shape[0], BATCH_ROWS):
                rows = np.asarray(array[start : start + BATCH_ROWS])
                block = as_float32_matrix(rows, name=str(path), first_row=start)
                yield block, metadata[start : start + BATCH_ROWS]
            continue
        _, pq = _pyarrow("reading .parquet")
        with library_source(path) as source:
            yield from _parquet_batches(pq.ParquetFile(source), path, sources)


def _parquet_batches(
    handle: Any, path: Path, sources: EmbeddingSources
) -> Iterator[tuple[np.ndarray, list[dict[str, Any] | None]]]:
    """Yield the (B, D) vectors and B metadata dicts of one open parquet embeddings file."""
    columns = ("embedding", "path", "key", "cls", "path_bytes", "key_bytes")
    wanted = [name for name in columns if name in handle.schema_arrow.names]
    row = 0
    for batch in handle.iter_batches(batch_size=BATCH_ROWS, columns=wanted):
        column = batch.column("embedding")
        values = column.flatten().to_numpy(zero_copy_only=False)
        if values.size != len(column) * sources.dim:  # a list<float> file changed since it was measured
            raise EmbeddingSourceError(f"{path}: rows are not all {sources.dim} wide; it changed while read")
        block = as_float32_matrix(values.reshape(len(column), sources.dim), name=str(path), first_row=row)
        fields = {name: batch.column(name).to_pylist() for name in wanted if name != "embedding"}
        names = None
        if sources.names is not None:  # names from --paths replace the shards' own
            names = sources.names[row : row + len(column)]
            fields.pop("path", None), fields.pop("path_bytes", None)
        row += len(column)
        metadata = [
            {_meta_name(name): _meta_value(values[i]) for name, values in fields.items()
             if values[i] is not None} | (name_fields(names[i]) if names else {}) or None
            for i in range(len(column))
        ]  # fmt: skip
        yield block, metadata


def _meta_name(column: str) -> str:
    return f"{column}_hex" if column.endswith("_bytes") else column


def _meta_value(value: Any) -> Any:
    """JSON-safe metadata: the exact bytes of a non-UTF-8 name as hex (see visreg_hub.bulk.output)."""
    return value.hex() if isinstance(value, bytes) else value
