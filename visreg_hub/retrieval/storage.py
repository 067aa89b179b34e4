"""Saving and loading EmbeddingIndex folders, with a checksummed manifest and no pickle.

Folder layout (format version 2)::

    manifest.json    format version, dim, metric, kind, factory string, count, FAISS ntotal, next_id,
                     model name, pooling, normalized flag, search parameters, build info (memory,
                     measured recall), sha256 of every other file (written last)
    index.faiss      faiss.write_index output of an IDMap2 index (FAISS's binary format, not pickle)
    ids.npy          int64 (count,) live ids in insertion order, read with allow_pickle=False
    metadata.jsonl   one JSON object (or null) per line, aligned with ids.npy

Nothing in an index folder is trusted: the manifest is validated field by field, every checksum is
verified, and every file is checked against the manifest (the FAISS file by walking its structure
with :mod:`visreg_hub.retrieval.faiss_file`) before FAISS or numpy allocate anything from it. The
checksums detect corruption and accidental edits; they are not a signature.

Format version 1 folders (positions instead of an id map, written before ``remove`` existed) are
refused with a message saying to rebuild them.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from visreg_hub.durable import fsync_dir, fsync_tree, remove_dead_staging, write_atomic
from visreg_hub.errors import CheckpointError, ConfigError, DataNotFoundError, UserInputError, require_extra
from visreg_hub.filehash import sha256_file
from visreg_hub.native_io import read_faiss, write_faiss
from visreg_hub.retrieval.factory import KINDS
from visreg_hub.retrieval.faiss_file import check_faiss_file
from visreg_hub.retrieval.limits import MAX_METADATA_BYTES
from visreg_hub.retrieval.manifest import (
    DATA_FILES,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    folder_path,
    read_manifest,
    verify_files,
)
from visreg_hub.retrieval.records import metadata_problem

if TYPE_CHECKING:  # pragma: no cover
    from visreg_hub.retrieval.index import EmbeddingIndex

logger = logging.getLogger(__name__)

INDEX_NAME, IDS_NAME, METADATA_NAME = DATA_FILES
__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "KINDS",
    "load_index",
    "read_manifest",
    "save_index",
    "verify_index",
]


def save_index(index: EmbeddingIndex, folder: str | Path, *, overwrite: bool = True) -> Path:
    """Write ``index`` to ``folder`` (created if needed; an earlier index there is replaced unless
    ``overwrite=False``, a folder holding anything else is refused: see :func:`check_index_output`).

    With ``overwrite=False`` the check happens at the swap itself (a rename fails onto a non-empty folder),
    so of two builds racing into one new folder the second refuses instead of replacing the first's index.

    The whole index is written and synced in a hidden sibling folder first, then swapped in by two
    renames, so a crash leaves either the earlier index or the new one in ``folder``. Between the two
    renames (microseconds) ``folder`` is missing and the earlier index sits in ``.<name>.replaced-<pid>``;
    :func:`load_index` names it if that ever happens.
    """
    if not index.is_trained:
        raise UserInputError("cannot save an untrained IVF index; add() or train() first")
    folder = output_folder(folder)
    check_index_output(folder)
    if not overwrite and _holds_index(folder):  # before writing anything (checked again at the swap)
        raise _already_holds_an_index(folder, during=False)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staged = folder.parent / f".{folder.name}.saving-{os.getpid()}"
    replaced = folder.parent / f".{folder.name}.replaced-{os.getpid()}"
    remove_dead_staging(folder.parent, f".{folder.name}.saving-")  # full copies left by killed saves
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir()
    try:
        _write_index_files(index, staged)
        fsync_tree(staged)
        if not overwrite and _holds_index(folder):
            raise _already_holds_an_index(folder)
        if not overwrite and _is_new(folder):
            _rename_into_new(staged, folder)
        elif folder.exists() or folder.is_symlink():
            shutil.rmtree(replaced, ignore_errors=True)
            os.replace(folder, replaced)
            os.replace(staged, folder)
            fsync_dir(folder.parent)
            shutil.rmtree(replaced, ignore_errors=True)
        else:
            os.replace(staged, folder)
            fsync_dir(folder.parent)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    # the earlier index a killed save left between its two renames: this save's index replaces it now
    remove_dead_staging(folder.parent, f".{folder.name}.replaced-")
    logger.info("saved %s index of %d vectors to %s", index.kind, len(index), folder)
    return folder


def _holds_index(folder: Path) -> bool:
    return (folder / MANIFEST_NAME).exists()


def _is_new(folder: Path) -> bool:
    """Nothing or an empty folder at ``folder`` (a symlink counts as something: its target is written)."""
    if folder.is_symlink():
        return False
    return not folder.exists() or (folder.is_dir() and not any(folder.iterdir()))


def _already_holds_an_index(folder: Path, *, during: bool = True) -> UserInputError:
    """``during``: the index appeared while this save wrote its own (another build into the same folder)."""
    when = " (written while this build ran, e.g. by another build into the same folder)" if during else ""
    return UserInputError(
        f"{folder} already holds an index{when}; nothing was replaced: pass overwrite=True (--overwrite) "
        "to replace it, or choose another output folder"
    )


def _rename_into_new(staged: Path, folder: Path) -> None:
    """Move ``staged`` to the new (absent or empty) ``folder`` atomically, refusing if it filled meanwhile.

    why: rename(2) onto a non-empty directory fails (ENOTEMPTY / EEXIST), so of two builds racing into one
    new folder exactly one wins and the other refuses, instead of the last replacing the first's index.

    Raises:
        UserInputError: ``folder`` was filled (by another build) since this one checked it.
    """
    try:
        os.rename(staged, folder)
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        raise _already_holds_an_index(folder) from None
    fsync_dir(folder.parent)


def _write_index_files(index: EmbeddingIndex, folder: Path) -> None:
    """The data files, then the manifest naming their checksums, into the (new, empty) ``folder``."""
    require_extra("faiss", "index")  # the missing-extra error before any file is touched
    write_atomic(folder / INDEX_NAME, lambda p: write_faiss(index._faiss_index, p))
    write_atomic(folder / IDS_NAME, lambda p: p.write_bytes(_npy_bytes(index.ids)))

    def write_metadata(path: Path) -> None:
        with path.open("w", encoding="utf-8") as handle:
            for text in index._meta.values():
                handle.write(("null" if text is None else text) + "\n")

    write_atomic(folder / METADATA_NAME, write_metadata)
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "dim": index.dim,
        "metric": index.metric,
        "kind": index.kind,
        "factory": index.factory,
        "count": len(index),
        "ntotal": int(index._faiss_index.ntotal),
        "next_id": index.next_id,
        "model_name": index.model_name,
        "pooling": index.pooling,
        "normalized": index.normalized,
        "normalize": index.normalize,
        "params": {
            "nlist": index.nlist,
            "nprobe": index.nprobe,
            "pq_m": index.pq_m,
            "m": index.m,
            "ef_construction": index.ef_construction,
            "ef_search": index.ef_search,
        },
        "build": index.build_info,
        "files": {name: sha256_file(folder / name) for name in DATA_FILES},
    }
    text = json.dumps(manifest, indent=2) + "\n"
    write_atomic(folder / MANIFEST_NAME, lambda p: p.write_text(text, encoding="utf-8"))


# what an interrupted write of the index files leaves in the folder (visreg_hub.durable.write_atomic)
_LEFTOVER = re.compile(r"\.(manifest\.json|index\.faiss|ids\.npy|metadata\.jsonl)\.tmp-[0-9a-f]+")


def output_folder(folder: str | bytes | os.PathLike) -> Path:
    """The folder an index is written to: a symlink given as the output means its target (the usual
    reason for the link is to put a large index on another disk), so the swap replaces the target."""
    folder = folder_path(folder)
    return folder.resolve() if folder.is_symlink() else folder


def check_index_output(folder: str | Path) -> None:
    """Refuse to write an index into ``folder`` unless it is new, empty or holds an earlier index.

    why: saving replaces ``manifest.json``; into an ``embed`` output folder (the same file name) it
    would destroy the embed job, and into any other folder it would mix the index with unrelated files.
    Hidden names (``.name.tmp-PID`` left by a killed save) are ignored.

    Raises:
        ConfigError: ``folder`` is a file, holds other files, or has a manifest that is not an index's.
    """
    folder = output_folder(folder)
    if folder.resolve() == Path.cwd().resolve():
        raise ConfigError(
            "the index output cannot be the current folder (it is replaced as a whole); pass a new folder"
        )
    if not folder.exists():
        return
    if not folder.is_dir():
        raise ConfigError(f"index output {folder} exists and is not a folder; pass a new folder name")
    allowed = {MANIFEST_NAME, *DATA_FILES}
    others: list[str] = []
    with os.scandir(folder) as scan:
        for entry in scan:
            # hidden entries count too (.git, notes): the folder is replaced as a whole; only a killed
            # save's own temporary files may be left behind
            if entry.name not in allowed and not _LEFTOVER.fullmatch(entry.name):
                others.append(entry.name)
                if len(others) == 3:
                    break
    if others:
        raise ConfigError(
            f"index output folder {folder} holds files that are not an index ({', '.join(sorted(others))}"
            f"{', ...' if len(others) == 3 else ''}); pass a new or empty folder"
        )
    manifest = folder / MANIFEST_NAME
    if manifest.exists() and not _is_index_manifest(manifest):
        raise ConfigError(
            f"{manifest} is not an index manifest (is {folder} a `visreg-hub embed` output folder?); "
            f"writing an index there would destroy it: pass a new or empty folder"
        )


def _is_index_manifest(path: Path) -> bool:
    """Whether ``path`` names this format (only the format field; size-capped, the folder is not trusted)."""
    try:
        if not path.is_file() or path.stat().st_size > MAX_MANIFEST_BYTES:
            return False
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT_NAME


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _read_ids(path: Path, count: int) -> np.ndarray:
    """ids.npy as int64 (count,), with the header checked before numpy allocates from it."""
    with path.open("rb") as handle:
        try:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle, max_header_size=1024)
        except (ValueError, OSError, SyntaxError) as exc:
            raise CheckpointError(f"{path} is not a plain .npy array: {exc}; rebuild the index") from exc
        if version != (1, 0):
            raise CheckpointError(
                f"{path} is not a plain .npy array: npy version {version}; rebuild the index"
            )
        header_end = handle.tell()
    if dtype != np.dtype("<i8") or fortran or shape != (count,):
        raise CheckpointError(
            f"{path}: expected little-endian int64 of shape ({count},), got {dtype} {shape}; "
            f"rebuild the index"
        )
    if path.stat().st_size != header_end + 8 * count:
        raise CheckpointError(f"{path} has {path.stat().st_size} bytes, not a ({count},) int64 array")
    return np.load(path, allow_pickle=False)


def _read_metadata(path: Path, count: int) -> list[str | None]:
    """metadata.jsonl as compact JSON texts; each line a JSON object or null."""
    texts: list[str | None] = []
    with path.open("rb") as handle:
        # bounded reads: a line is refused at MAX_METADATA_BYTES instead of being read whole first
        lines = iter(lambda: handle.readline(MAX_METADATA_BYTES + 2), b"")
        for number, raw in enumerate(lines, 1):
            if number > count:
                raise CheckpointError(f"{path} has more than the manifest's {count} lines; rebuild the index")
            if len(raw.rstrip(b"\n")) > MAX_METADATA_BYTES:
                raise CheckpointError(
                    f"{path} line {number} is over {MAX_METADATA_BYTES:,} bytes, more than an index keeps "
                    "per item (the file was modified); rebuild the index"
                )
            try:
                value = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise CheckpointError(
                    f"{path} line {number} is not valid UTF-8 ({exc.reason} at byte {exc.start}); "
                    f"rebuild the index"
                ) from exc
            except (ValueError, RecursionError) as exc:
                raise CheckpointError(
                    f"{path} line {number} is not valid (or too deeply nested) JSON"
                ) from exc
            if value is not None and not isinstance(value, dict):
                raise CheckpointError(
                    f"{path} line {number} must be a JSON object or null, got {type(value).__name__}"
                )
            problem = None if value is None else metadata_problem(value)
            if problem is not None:
                raise CheckpointError(f"{path} line {number} {problem}; rebuild the index")
            texts.append(None if value is None else json.dumps(value, separators=(",", ":")))
    if len(texts) != count:
        raise CheckpointError(f"{path} has {len(texts)} lines but the manifest says count={count}")
    return texts


@dataclass
class VerifiedFolder:
    """An index folder that passed every check of :func:`verify_index` (nothing of FAISS loaded yet)."""

    folder: Path
    manifest: dict[str, Any]
    ids: np.ndarray
    texts: list[str | None]
    faiss_ids: np.ndarray


def verify_index(folder: str | bytes | os.PathLike) -> VerifiedFolder:
    """Every check :func:`load_index` makes, without handing the FAISS file to FAISS.

    why: the one home of index-folder verification: ``load`` and ``visreg-hub index inspect`` both call
    it, so an inspect that passes means a load that works (checksums alone said "verified" for folders
    whose files were consistent with a fixed-up manifest but not with each other).

    Raises:
        FileNotFoundError: no such folder (naming an interrupted save's leftover) or a missing file.
        CheckpointError: a manifest field, checksum, ids.npy, metadata.jsonl or index.faiss is wrong.
    """
    folder = folder_path(folder)
    if not folder.exists():
        leftovers = sorted(folder.parent.glob(f".{folder.name}.replaced-*")) if folder.parent.is_dir() else []
        if leftovers:
            raise DataNotFoundError(
                f"{folder} does not exist, but a save into it was interrupted: the earlier index is in "
                f"{leftovers[-1]}; rename that folder to {folder.name} to use it"
            )
    manifest = read_manifest(folder)
    verify_files(folder, manifest)
    count = manifest["count"]
    ids = _read_ids(folder / IDS_NAME, count)
    texts = _read_metadata(folder / METADATA_NAME, count)
    with open(folder / INDEX_NAME, "rb") as handle:
        faiss_ids = check_faiss_file(
            handle,
            folder / INDEX_NAME,
            kind=manifest["kind"],
            dim=manifest["dim"],
            ntotal=manifest["ntotal"],
            metric=manifest["metric"],
            params=manifest["params"],
        )
    _check_ids(ids, faiss_ids, manifest, folder)
    return VerifiedFolder(folder, manifest, ids, texts, faiss_ids)


def load_index(cls: type[EmbeddingIndex], folder: str | Path) -> EmbeddingIndex:
    """Load a folder written by :func:`save_index`; everything is verified (:func:`verify_index`) before
    FAISS parses it."""
    require_extra("faiss", "index")  # the missing-extra error before any file is touched
    checked = verify_index(folder)
    folder, manifest = checked.folder, checked.manifest
    with open(folder / INDEX_NAME, "rb") as handle:
        try:
            raw = read_faiss(handle)
        except RuntimeError as exc:  # the structure check should make this unreachable
            raise CheckpointError(f"FAISS cannot read {folder / INDEX_NAME}: rebuild the index") from exc
    params = manifest["params"]
    index = cls(
        manifest["dim"],
        metric=manifest["metric"],
        kind=manifest["kind"],
        nlist=params["nlist"],
        nprobe=params["nprobe"],
        pq_m=params["pq_m"],
        m=params["m"],
        ef_construction=params["ef_construction"],
        ef_search=params["ef_search"],
        normalize=manifest["normalize"],
        model_name=manifest["model_name"],
        pooling=manifest["pooling"],
    )
    index._faiss_index = raw
    index._meta = dict(zip(checked.ids.tolist(), checked.texts, strict=True))
    index._tombstones = set(checked.faiss_ids.tolist()) - set(index._meta)
    index._next_id = manifest["next_id"]
    index._all_unit_norm = manifest["normalized"]
    index.build_info = manifest["build"]
    return index


def _check_ids(ids: np.ndarray, faiss_ids: np.ndarray, manifest: dict[str, Any], folder: Path) -> None:
    """ids.npy must be unique, >= 0, below next_id, and (with tombstones only for HNSW) FAISS's id map."""
    problems = []
    if ids.size and int(ids.min()) < 0:
        problems.append(f"ids.npy holds negative id {int(ids.min())}")
    if np.unique(ids).size != ids.size:
        problems.append("ids.npy holds duplicate ids")
    if np.unique(faiss_ids).size != faiss_ids.size:
        problems.append("index.faiss maps two vectors to one id")
    if ids.size and int(ids.max()) >= manifest["next_id"]:
        problems.append(f"next_id {manifest['next_id']} is not above the largest id {int(ids.max())}")
    if not np.isin(ids, faiss_ids).all():
        problems.append("ids.npy lists ids that index.faiss does not hold")
    if manifest["kind"] != "hnsw" and faiss_ids.size != ids.size:
        problems.append(f"index.faiss holds {faiss_ids.size} vectors for {ids.size} ids")
    if problems:
        raise CheckpointError(f"index folder {folder} is inconsistent: " + "; ".join(problems))
