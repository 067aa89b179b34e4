"""The output folder of a bulk embedding job: parquet shards, failures and the manifest.

Layout::

    OUTDIR/manifest.json        what was embedded how (model, pooling, dim, normalisation, input
                                listing digest and count, shard size) and which shards are done
    OUTDIR/part-00000.parquet   columns path, key, embedding (fixed-size list of float32), cls, json,
                                path_bytes, key_bytes
    OUTDIR/failures.jsonl       one {"path", "key", "reason"} per unreadable input (complete runs)
    OUTDIR/.failures/part-00000.jsonl   the failures of each shard that has any, written before the shard

A shard is the commit unit: its failures file, then its parquet file, are each written to a temporary
name, fsynced and renamed, and the folder fsynced. A shard whose parquet file exists is complete;
anything else is redone. Rows are the shard's readable inputs in listing order.

File names that are not valid UTF-8 (Python holds their odd bytes as surrogate escapes) cannot go into
a parquet string or a UTF-8 JSON line as they are: ``path``/``key`` then hold a readable form with each
such byte written ``\\xNN``, and ``path_bytes``/``key_bytes`` (parquet binary; ``path_bytes_hex``/
``key_bytes_hex`` in the failures JSON) the exact bytes, null/absent for every UTF-8 name. The exact
name is ``os.fsdecode(path_bytes)`` when set, else ``path``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from visreg_hub.durable import exclusive_lock, fsync_dir, try_lock, write_atomic
from visreg_hub.errors import MissingExtraError, VisregHubError
from visreg_hub.native_io import split_name, write_parquet
from visreg_hub.retrieval.sources import check_embed_file

FORMAT_NAME = "visreg_hub.embedding_shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
FAILURES_NAME = "failures.jsonl"
FAILURES_DIR = ".failures"
_SHARD = re.compile(r"part-(\d{5,})\.parquet")
# parquet schema metadata of every shard: which job wrote it and as which shard (read by index build,
# visreg_hub.retrieval.sources, which keeps a copy of these names: it must not import this torch package)
SHARD_JOB_KEY = b"visreg_hub.job_id"
SHARD_NUMBER_KEY = b"visreg_hub.shard"
logger = logging.getLogger(__name__)


class OutputMismatchError(VisregHubError, ValueError):
    """The output folder holds another job's embeddings (different model, inputs or settings)."""


def pyarrow():
    """``(pyarrow, pyarrow.parquet)``, or an error naming the extra."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise MissingExtraError(
            "bulk embedding writes parquet shards and needs pyarrow: pip install 'visreg_hub[parquet]'"
        ) from exc
    return pa, pq


def shard_name(number: int) -> str:
    return f"part-{number:05d}.parquet"


def done_shards(folder: Path, num_shards: int | None = None) -> set[int]:
    """Numbers of the shards whose parquet file exists (below ``num_shards`` when given).

    why: a part file of another job copied in (``part-00099``) or a second spelling of a number
    (``part-000003``) is not one of this job's shards, so it must never count as done.
    """
    if not folder.is_dir():
        return set()
    done = set()
    for entry in os.scandir(folder):
        match = _SHARD.fullmatch(entry.name)
        if match and entry.name == shard_name(int(match.group(1))):
            number = int(match.group(1))
            if num_shards is None or number < num_shards:
                done.add(number)
    return done


def finished_shards(
    folder: Path, manifest: dict[str, Any], num_shards: int, numbers: set[int] | None = None
) -> set[int]:
    """The shards (of ``numbers``, default all) that a resumed job may skip: their parquet file exists
    and holds what this job wrote. A damaged one is logged and left to be embedded again.

    why: a shard is written atomically, so a damaged one was damaged afterwards (a truncated copy, a
    full disk while syncing a backup, a part file of another job copied in); counting it as done would
    report the job complete and leave ``index build`` to fail on it later.
    """
    done = done_shards(folder, num_shards)
    if numbers is not None:
        done &= numbers
    damaged = _damaged(folder, manifest, done)
    for number, why in damaged.items():
        logger.warning("shard %d is embedded again: %s", number, why)
    return done - set(damaged)


def _damaged(folder: Path, manifest: dict[str, Any], numbers: set[int]) -> dict[int, str]:
    """:func:`unusable_shards` of ``numbers`` for the job ``manifest`` describes."""
    shard_size, count = manifest["shard_size"], manifest["inputs"]["count"]
    return unusable_shards(folder, numbers, job_id=manifest.get("job_id"), dim=manifest["model"]["dim"],
                           inputs_of=lambda s: min(shard_size, count - s * shard_size))  # fmt: skip


def unusable_shards(
    folder: Path, numbers: set[int], *, job_id: str | None, inputs_of: Callable[[int], int], dim: int
) -> dict[int, str]:
    """Of the shards ``numbers`` whose parquet file exists, those that do not hold what this job wrote:
    shard number -> why. Reads each footer only (row count, width, job id), as ``index build`` does.

    Args:
        job_id: the manifest's (None for jobs that predate job ids).
        inputs_of: shard number -> its number of inputs; rows + recorded failures must add up to it.
        dim: the job's embedding width.
    """
    from visreg_hub.retrieval.sources import (
        EmbeddingSourceError,
        check_shard_job,
        parquet_shape,
        shard_failures,
    )

    problems = {}
    for number in sorted(numbers):
        part = folder / shard_name(number)
        try:
            rows, width, metadata = parquet_shape(part)
            check_shard_job(part, number, job_id, metadata)
        except EmbeddingSourceError as exc:
            problems[number] = str(exc).split("; ")[0]
            continue
        failed, inputs = shard_failures(folder, number), inputs_of(number)
        if width != dim or rows + failed != inputs:
            problems[number] = (
                f"{part} holds {rows} rows of width {width} and {failed} failure records, where shard "
                f"{number} has {inputs} inputs embedded at width {dim}"
            )
    return problems


def failures_dir(folder: Path) -> Path:
    """``folder/.failures``, refused when it is a link or not a folder.

    why: the job writes and deletes files in it; a ``.failures`` link planted in the output folder would
    make it write shard failure files, and remove temporaries, wherever the link points.
    """
    path = folder / FAILURES_DIR
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise OutputMismatchError(
            f"{path} is a link or a file, not the job's failures folder; remove it (the job writes its "
            "failure records there), or use a new output folder"
        )
    return path


def clean_temporaries(folder: Path) -> None:
    """Remove temporary files a killed run left (``.name.tmp-PID``)."""
    for sub in (folder, failures_dir(folder)):
        if sub.is_dir():
            for entry in os.scandir(sub):
                if entry.name.startswith(".") and ".tmp-" in entry.name:
                    Path(entry.path).unlink(missing_ok=True)


def write_shard(
    folder: Path,
    number: int,
    *,
    rows: list[dict[str, Any]],
    embeddings: np.ndarray,
    failures: list[dict[str, Any]],
    job_id: str | None = None,
) -> Path:
    """Write shard ``number``: its failures, then its parquet file (the commit point).

    Args:
        rows: one dict per embedded input with ``path``, ``key``, ``cls``, ``json`` (None where absent).
        embeddings: float32 (len(rows), E).
        failures: one ``{"path", "key", "reason"}`` per input that failed.
        job_id: the manifest's ``job_id``; stored with ``number`` in the parquet schema metadata so that
            ``index build`` refuses a part file of another job copied in under a valid name.
    """
    pa, _ = pyarrow()
    failures_path = failures_dir(folder) / f"part-{number:05d}.jsonl"
    if failures:  # no file for a shard without failures: two fsyncs fewer per shard
        failures_path.parent.mkdir(exist_ok=True)
        text = "".join(json.dumps(_failure_record(f), ensure_ascii=False) + "\n" for f in failures)
        write_atomic(failures_path, lambda p: p.write_text(text, "utf-8"))
    elif failures_path.exists():
        # an earlier attempt was killed between its failures file and its parquet file, and the inputs that
        # failed then (a file still being copied, one the user has since fixed) now embed: the old record
        # must not outlive them, before the parquet commit makes the shard count as done
        failures_path.unlink()
        fsync_dir(failures_path.parent)
    dim = embeddings.shape[1]
    flat = pa.array(np.ascontiguousarray(embeddings, dtype=np.float32).reshape(-1), pa.float32())
    paths = [split_name(r["path"]) for r in rows]
    keys = [split_name(r["key"]) for r in rows]
    table = pa.table(
        {
            "path": pa.array([text for text, _ in paths], pa.string()),
            "key": pa.array([text for text, _ in keys], pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
            "cls": pa.array([r["cls"] for r in rows], pa.string()),
            "json": pa.array([r["json"] for r in rows], pa.string()),
            "path_bytes": pa.array([raw for _, raw in paths], pa.binary()),
            "key_bytes": pa.array([raw for _, raw in keys], pa.binary()),
        }
    )
    if job_id is not None:  # None: a job started before job ids existed resumes without them
        table = table.replace_schema_metadata({SHARD_JOB_KEY: job_id.encode(), SHARD_NUMBER_KEY: str(number)})
    path = folder / shard_name(number)
    write_atomic(path, lambda p: write_parquet(table, p))
    return path


def _failure_record(failure: dict[str, Any]) -> dict[str, Any]:
    """A failure as UTF-8-safe JSON: names split as in :func:`split_name` (exact bytes as hex)."""
    record: dict[str, Any] = {}
    for field in ("path", "key"):
        text, raw = split_name(failure.get(field))
        record[field] = text
        if raw is not None:
            record[f"{field}_bytes_hex"] = raw.hex()
    record["reason"] = split_name(failure.get("reason"))[0]
    return record


def read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST_NAME
    check_embed_file(folder, path)
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:
        raise OutputMismatchError(f"{path} is not valid JSON; use a new output folder") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise OutputMismatchError(f"{path} is not a visreg-hub embed manifest; use a new output folder")
    return manifest


def check_or_start(folder: Path, job: dict[str, Any]) -> dict[str, Any]:
    """Create ``folder`` and its manifest for ``job``, or check that an existing one is the same job.

    Args:
        job: the identity of the job: ``model`` (name, weights digest, pooling, dim, normalize, dtype),
            ``inputs`` (listing digest, count, the input arguments) and ``shard_size``.

    Raises:
        OutputMismatchError: the folder holds a different job's output, or unrelated files.
    """
    folder.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(folder)
    if manifest is None:
        stray = [e.name for e in os.scandir(folder) if not e.name.startswith(".")]
        if stray:
            raise OutputMismatchError(
                f"output folder {folder} is not empty and has no {MANIFEST_NAME} (found {stray[:3]}); "
                f"pass a new or empty folder"
            )
        manifest = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **job, "job_id": job_id(job),
                    "shards_done": [], "complete": False}  # fmt: skip
        write_manifest(folder, manifest)
        return manifest
    for field in ("model", "inputs", "shard_size"):
        if manifest.get(field) != job[field]:
            raise OutputMismatchError(_mismatch(folder, field, manifest.get(field), job[field]))
    return manifest


def job_id(job: dict[str, Any]) -> str:
    """SHA-256 of the job's identity (model setup, input listing, shard size) as canonical JSON.

    why: recorded in the manifest and in every shard's parquet metadata, it tells this job's part files
    from another job's with the same file name (the name alone says nothing about where a file came from).
    """
    identity = {field: job[field] for field in ("model", "inputs", "shard_size")}
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _mismatch(folder: Path, field: str, old: Any, new: Any) -> str:
    if field == "model" and isinstance(old, dict) and isinstance(new, dict):
        diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        unset = {"draft_decode": False}  # recorded only when on (older folders lack the key)
        changes = ", ".join(
            f"{k}: {old.get(k, unset.get(k))!r} -> {new.get(k, unset.get(k))!r}" for k in diff
        )
        what = f"a different model setup ({changes})"
    elif field == "inputs":
        what = f"a different input set ({(old or {}).get('count')} -> {new.get('count')} items, other names)"
    else:
        what = f"a different {field} ({old!r} -> {new!r})"
    return (
        f"{folder} holds embeddings of another job: this run has {what}; re-run with the original "
        f"settings to resume, or pass a new output folder"
    )


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    text = json.dumps(manifest, indent=2) + "\n"
    write_atomic(folder / MANIFEST_NAME, lambda p: p.write_text(text, encoding="utf-8"))


def listed_failures(folder: Path) -> int | None:
    """How many failures ``failures.jsonl`` lists (the whole job's, once complete); None before."""
    check_embed_file(folder, folder / FAILURES_NAME)
    try:
        with (folder / FAILURES_NAME).open("rb") as handle:
            return sum(1 for line in handle if line.strip())
    except FileNotFoundError:
        return None


FINALIZE_LOCK = ".finalize.lock"  # hidden: listings of the folder skip it
RUN_LOCK = ".embed.lock"  # held by every run for its whole length: exclusive for one rank, shared for ranks


class FolderBusyError(VisregHubError, RuntimeError):
    """Another process embeds into the same output folder (as the same rank, or as a whole job)."""


@contextmanager
def run_lock(folder: Path, rank: int, world_size: int) -> Iterator[None]:
    """Hold the folder against a second run for the block (non-blocking ``flock``; they die with their
    process, so a killed run never blocks the next).

    A one-rank run takes ``.embed.lock`` exclusively; each rank of a multi-rank job takes it shared plus its
    own ``.embed-rank-R.lock``, so the ranks of one job run together but not beside a second copy of a rank
    or a one-rank run. why: two runs would each embed every unfinished shard (twice the work), and a
    one-rank run removes the temporary files of killed runs, which would be the other run's files in the
    middle of being written. Where ``fcntl`` does not exist (Windows) the block runs unlocked.

    Raises:
        FolderBusyError: another run holds the folder.
    """
    # (lock file, shared, who holds it when it is refused)
    wanted = [(folder / RUN_LOCK, world_size > 1, "another run of this job" if world_size == 1 else
               "a one-rank run of this job")]  # fmt: skip
    if world_size > 1:
        wanted.append((folder / f".embed-rank-{rank}.lock", False, f"another run of rank {rank}"))
    held: list[int] = []
    try:
        for path, shared, who in wanted:
            try:
                descriptor = try_lock(path, shared=shared)
            except ImportError:  # no fcntl (Windows): unlocked
                break
            if descriptor is None:
                raise FolderBusyError(
                    f"{who} is embedding into {folder} now; two would embed the same shards twice and remove "
                    "each other's half-written files: wait for it to end (a re-run then resumes where it "
                    "stopped), or write to another folder"
                )
            held.append(descriptor)
        yield
    finally:
        for descriptor in held:
            os.close(descriptor)  # closing releases the lock


def finalize(folder: Path, manifest: dict[str, Any], num_shards: int) -> bool:
    """When every shard is done: failures.jsonl (all shards, in order) and ``complete: true``.

    Ranks finalize one at a time (a lock in the folder), each reading the shards done under the lock:
    otherwise a rank that listed the shards before another rank's last one landed could write its stale
    ``complete: false`` over the other's ``complete: true``.

    Returns:
        True if the job is complete.
    """
    with exclusive_lock(folder / FINALIZE_LOCK):
        return _finalize_locked(folder, manifest, num_shards)


def _finalize_locked(folder: Path, manifest: dict[str, Any], num_shards: int) -> bool:
    done = done_shards(folder, num_shards)
    if done >= set(range(num_shards)):
        # why only now: every shard is on disk, so this is the one moment a damaged one (another rank's,
        # or one still waiting to be redone) would wrongly make the job complete; its footer is cheap
        done -= set(_damaged(folder, manifest, done))
    complete = done >= set(range(num_shards))
    # "complete" is rewritten either way: a manifest read as complete may now hold a damaged shard
    manifest = {**manifest, "shards_done": sorted(done), "num_shards": num_shards, "complete": complete}
    if complete:

        def write_failures(path: Path) -> None:
            with path.open("w", encoding="utf-8") as out:
                for number in range(num_shards):
                    part = failures_dir(folder) / f"part-{number:05d}.jsonl"
                    check_embed_file(folder, part)
                    if part.is_file():
                        with part.open(encoding="utf-8") as records:
                            shutil.copyfileobj(records, out)

        write_atomic(folder / FAILURES_NAME, write_failures)
    write_manifest(folder, manifest)
    return complete
