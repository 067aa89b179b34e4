"""``embed_dataset``: embed a listing of images into resumable parquet shards.

The listing (see :mod:`visreg_hub.bulk.listing`) is cut into shards of ``shard_size`` consecutive
items; shard s covers items ``s * shard_size .. (s + 1) * shard_size - 1``. Under ``accelerate
launch``/``torchrun`` (``WORLD_SIZE`` > 1) rank r embeds the shards with ``s % world_size == r``: a
deterministic, disjoint split that needs no communication and survives a change of world size on
resume. Every shard is embedded through :class:`~visreg_hub.inference.pipeline.EmbeddingPipeline` in
fixed chunks, so a resumed or re-split job computes every embedding from the same batches as an
uninterrupted one.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from visreg_hub.bulk import output
from visreg_hub.bulk.listing import Item, check_inputs, iter_items, summarize
from visreg_hub.errors import ConfigError, VisregHubError, require_extra
from visreg_hub.hub.format import weights_digest
from visreg_hub.inference.backends import backend_for, resolve_dtype
from visreg_hub.inference.images import DEFAULT_MAX_PIXELS

logger = logging.getLogger(__name__)
# progress lines of a job whose stderr is no terminal; the CLI shows this logger at its default verbosity
progress_logger = logging.getLogger("visreg_hub.bulk.progress")
PROGRESS_EVERY_S = 30.0

ENGINES = ("local", "ray")
_CHUNK_BYTES = 256 * 2**20  # encoded tar bytes held per pipeline call
_MANIFEST_EVERY = 16  # shards between manifest updates while a job runs


@dataclass
class EmbedSummary:
    """What one call (one rank) did. ``complete``: every shard of the job is now on disk;
    ``job_failed``: then, the failures of the whole job (every run and rank), as ``failures.jsonl`` lists.
    """

    output_dir: Path
    embedded: int
    failed: int
    seconds: float
    shards_written: int
    shards_skipped: int
    complete: bool
    job_failed: int | None = None
    backend: str | None = None  # what embedded, e.g. "onnx on cpu" (None: not known to this process)

    @property
    def images_per_second(self) -> float:
        return (self.embedded + self.failed) / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        state = "complete" if self.complete else "incomplete (other ranks or a re-run will finish it)"
        if self.complete and self.job_failed is not None:  # a resumed run did only part of the job
            state += f"; {self.job_failed} image(s) of the job failed, listed in {output.FAILURES_NAME}"
        on = f" ({self.backend})" if self.backend and self.shards_written else ""
        return (
            f"this run{on}: embedded {self.embedded}, failed {self.failed}, {self.seconds:.1f} s, "
            f"{self.images_per_second:.1f} images/s; {self.shards_written} shard(s) written, "
            f"{self.shards_skipped} already done; {self.output_dir} {state}"
        )


class ProgressLines:
    """Progress as a log line at most every ``PROGRESS_EVERY_S`` seconds: done / total, rate, time left.

    why: tqdm's bar is off when stderr is no terminal, and that is where long jobs run (nohup, Slurm, CI,
    ``2> log``): without these lines their log is silent until the job ends.
    """

    def __init__(self, total: int, done: int, desc: str) -> None:
        self.total, self.done, self.desc, self.first = total, done, desc, done
        self.start = self.last = time.monotonic()

    def update(self, count: int) -> None:
        self.done += count
        now = time.monotonic()
        if now - self.last < PROGRESS_EVERY_S:
            return
        self.last = now
        rate = (self.done - self.first) / max(now - self.start, 1e-9)
        left = f"about {(self.total - self.done) / rate:.0f} s left" if rate > 0 else "time left unknown"
        share = 100.0 * self.done / max(self.total, 1)
        progress_logger.info(
            "%s: %d / %d images (%.0f %%), %.1f images/s, %s",
            self.desc,
            self.done,
            self.total,
            share,
            rate,
            left,
        )


def distributed_rank() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the torchrun/accelerate environment, (0, 1, 0) without."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as exc:
        raise ConfigError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers: {exc}") from exc
    for name, value, low in (("WORLD_SIZE", world, 1), ("RANK", rank, 0), ("LOCAL_RANK", local, 0)):
        if value < low:  # a negative RANK would own no shard and exit 0 having done nothing
            raise ConfigError(f"environment variable {name} must be >= {low}, got {value}")
    return rank, world, local


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def prepare_model(model: Any, device: str | None) -> tuple[torch.nn.Module, str | None]:
    """A loaded model and the reference recorded in the manifest (absolute for local folders)."""
    if isinstance(model, str | os.PathLike):
        from visreg_hub.hub import from_pretrained
        from visreg_hub.hub.registry import model_reference

        return from_pretrained(os.fspath(model), device=device), model_reference(model)
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"model must be a name, a folder or a VISRegEncoder, got {type(model).__name__}")
    return model, getattr(getattr(model, "config", None), "name", None)


def embed_dataset(
    inputs: str | os.PathLike | list[str | os.PathLike],
    output_dir: str | os.PathLike,
    *,
    model: Any,
    **options: Any,
) -> Path:
    """Embed folders, ``.txt`` file lists and webdataset ``.tar`` shards into parquet shards.

    Re-running the same call after a crash or ``kill -9`` continues from the last completed shard;
    the finished folder holds every readable input exactly once, with the embeddings an
    uninterrupted run gives. See :func:`run_embedding` for the options and
    :mod:`visreg_hub.bulk.output` for the folder layout.

    Args:
        inputs: one input or a list (folders, ``.txt`` lists, ``.tar`` shards, image files).
        output_dir: the output folder (created; must be empty or hold this same job).
        model: registry name, Hub repo or folder, or a loaded :class:`~visreg_hub.models.VISRegEncoder`.

    Returns:
        the output folder.
    """
    return run_embedding(inputs, output_dir, model=model, **options).output_dir


def run_embedding(
    inputs: str | os.PathLike | list[str | os.PathLike],
    output_dir: str | os.PathLike,
    *,
    model: Any,
    shard_size: int = 5000,
    batch_size: int = 64,
    num_workers: int = 0,
    pooling: str | None = None,
    normalize: bool = True,
    device: str | None = None,
    dtype: str | None = None,
    engine: str = "local",
    rank: int | None = None,
    world_size: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    show_progress_bar: bool | None = None,
    draft_decode: bool = False,
) -> EmbedSummary:
    """:func:`embed_dataset` with every option, returning an :class:`EmbedSummary`.

    Args:
        shard_size: inputs per parquet shard (the unit of resume: a kill loses at most one shard).
        batch_size: images per forward pass.
        num_workers: DataLoader decoding processes per rank.
        pooling, normalize, dtype: as in ``encode()``; recorded in the manifest.
        device: where to run; None: the model's device, or ``cuda:LOCAL_RANK`` under a multi-GPU launch.
        engine: ``"local"`` (this process; one rank of an accelerate/torchrun launch) or ``"ray"``
            (a Ray Data job on the current Ray cluster; ``pip install 'visreg_hub[ray]'``).
        rank, world_size: override the launcher's ``RANK``/``WORLD_SIZE``.
        max_pixels: decompression-bomb cap per image.
        show_progress_bar: None shows a bar when stderr is a terminal, and otherwise logs a progress line
            every ``PROGRESS_EVERY_S`` seconds (logger ``visreg_hub.bulk.progress``, INFO); False: neither.
        draft_decode: decode large JPEGs at a reduced scale, as in ``encode()`` (faster on camera
            photos, close to but not equal to a full decode); recorded in the manifest.
    """
    start = time.perf_counter()
    # every argument is checked before the output folder and its manifest are created
    if Path(output_dir).suffix.lower() in (".npy", ".parquet") and not Path(output_dir).is_dir():
        raise ConfigError(
            f"output_dir {str(output_dir)!r} names a file, but this job writes a shard folder (parquet "
            "shards and a manifest); pass a folder name, or for one file use "
            "`visreg-hub embed ... -o x.npy` (or encode() and visreg_hub.retrieval.write_embeddings)"
        )
    _check_int("shard_size", shard_size, 1)
    if not isinstance(normalize, bool):
        raise ConfigError(f"normalize must be True or False, got {normalize!r}")
    if max_pixels is not None:
        _check_int("max_pixels", max_pixels, 1)
    _check_int("batch_size", batch_size, 1)
    _check_int("num_workers", num_workers, 0)
    if engine not in ENGINES:
        raise ConfigError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "ray":  # a missing extra is said before a model is loaded or a folder written
        require_extra("ray", "ray")
    env_rank, env_world, local_rank = distributed_rank()
    rank = env_rank if rank is None else _check_int("rank", rank, 0)
    world_size = env_world if world_size is None else _check_int("world_size", world_size, 1)
    if rank >= world_size:
        raise ConfigError(f"rank {rank} must be below world_size {world_size}")
    if device is None and world_size > 1 and torch.cuda.is_available():
        device = f"cuda:{local_rank % torch.cuda.device_count()}"
    listed = [inputs] if isinstance(inputs, str | os.PathLike) else list(inputs)
    for given in listed:
        if not isinstance(given, str | os.PathLike):
            raise ConfigError(
                f"inputs must be paths (folders, .txt lists, .tar shards, image files), got a "
                f"{type(given).__name__}; embed in-memory images with encode()"
            )
    sources = check_inputs(listed)
    folder = Path(output_dir).expanduser().absolute()
    output.pyarrow()  # fail before the slow part when pyarrow is missing
    net, reference = prepare_model(model, device)
    runner = backend_for(net, pooling=pooling, device=device, dtype=dtype)
    listing = summarize(sources, shard_size)
    if listing.count == 0:
        raise ConfigError(f"the inputs {sources} list no images; check the paths and extensions")
    job = {
        "model": {"name": reference, "weights_sha256": weights_digest(net),
                  "pooling": pooling or net.config.pooling, "dim": int(runner.output_shape[0]),
                  "normalize": bool(normalize), "dtype": None if dtype is None else str(dtype)},
        "inputs": {"args": sources, "digest": listing.digest, "count": listing.count},
        "shard_size": shard_size,
    }  # fmt: skip
    if draft_decode:  # only when on: folders written before the option existed still resume
        job["model"]["draft_decode"] = True
    _keep_recorded_dtype(folder, job, net)
    manifest = output.check_or_start(folder, job)
    with output.run_lock(folder, rank, world_size):
        if world_size == 1:
            output.clean_temporaries(folder)
        num_shards = math.ceil(listing.count / shard_size)
        if engine == "ray":
            from visreg_hub.bulk.ray_engine import run_ray

            return run_ray(sources, folder, manifest, net, runner, listing, num_shards, start=start,
                           batch_size=batch_size, normalize=normalize, max_pixels=max_pixels, device=device,
                           dtype=dtype, pooling=pooling, draft_decode=draft_decode)  # fmt: skip
        return _embed_my_shards(
            sources, folder, manifest, runner, listing, num_shards, shard_size=shard_size, rank=rank,
            world_size=world_size, start=start, batch_size=batch_size, num_workers=num_workers,
            normalize=normalize, max_pixels=max_pixels, draft_decode=draft_decode,
            show_progress_bar=show_progress_bar,
        )  # fmt: skip


def _embed_my_shards(sources, folder: Path, manifest: dict[str, Any], runner, listing, num_shards: int, *,
                     shard_size: int, rank: int, world_size: int, start: float, batch_size: int,
                     num_workers: int, normalize: bool, max_pixels: int | None, draft_decode: bool,
                     show_progress_bar: bool | None) -> EmbedSummary:  # fmt: skip
    """Embed and write this rank's unfinished shards (``run_embedding``'s local engine, under its lock)."""
    from visreg_hub.inference.pipeline import EmbeddingPipeline

    embedder = ShardEmbedder(
        EmbeddingPipeline(runner, normalize=normalize, max_pixels=max_pixels, draft_decode=draft_decode),
        batch_size=batch_size,
        num_workers=num_workers,
    )
    mine = [s for s in range(num_shards) if s % world_size == rank]

    def shard_len(s: int) -> int:
        return min(shard_size, listing.count - s * shard_size)

    done = output.finished_shards(folder, manifest, num_shards, set(mine))
    todo = {s for s in mine if s not in done}

    log_lines = show_progress_bar is None and not sys.stderr.isatty()  # not when turned off by name
    if show_progress_bar is None:
        show_progress_bar = sys.stderr.isatty()
    total, initial = sum(shard_len(s) for s in mine), sum(shard_len(s) for s in mine if s in done)
    desc = "embed" if world_size == 1 else f"embed rank {rank}/{world_size}"
    bar = tqdm(
        total=total, initial=initial, desc=desc, unit="img", disable=not show_progress_bar or not todo,
        smoothing=0.05,
    )  # fmt: skip
    lines = ProgressLines(total, initial, desc) if log_lines else None

    def advance(count: int) -> None:
        bar.update(count)
        if lines is not None:
            lines.update(count)

    embedded = failed = written = 0
    with bar:
        for number, items in _shards(sources, listing, shard_size, todo):
            rows, vectors, failures = embedder.embed(items, progress=advance)
            output.write_shard(folder, number, rows=rows, embeddings=vectors, failures=failures,
                               job_id=manifest.get("job_id"))  # fmt: skip
            embedded, failed, written = embedded + len(rows), failed + len(failures), written + 1
            if written % _MANIFEST_EVERY == 0:  # the shard files are the truth; the manifest summarises
                output.finalize(folder, manifest, num_shards)
    complete = output.finalize(folder, manifest, num_shards)
    summary = EmbedSummary(folder, embedded, failed, time.perf_counter() - start, written,
                           len(mine) - len(todo), complete, output.listed_failures(folder),
                           backend=f"{runner.name} on {runner.device.type}")  # fmt: skip
    logger.info("%s", summary.line())
    return summary


def _keep_recorded_dtype(folder: Path, job: dict[str, Any], net: torch.nn.Module) -> None:
    """Use the folder's spelling of ``dtype`` when it means the same as this run's, so that ``fp16`` after
    ``float16``, or ``fp32`` after the default on a float32 model, resumes instead of being refused."""
    recorded = output.read_manifest(folder) if folder.is_dir() else None
    if recorded is None or not isinstance(recorded.get("model"), dict):
        return
    before, now = recorded["model"].get("dtype"), job["model"]["dtype"]
    default = next(net.parameters()).dtype
    try:
        same = (resolve_dtype(before) or default) == (resolve_dtype(now) or default)
    except VisregHubError:  # a hand-edited manifest: the identity check reports the difference
        return
    if same:
        job["model"]["dtype"] = before


def _shards(sources: list[str], listing, shard_size: int, todo: set[int]):
    """Yield (shard number, its items) for the shards in ``todo``, streaming the listing once.

    Each shard's items are checked against the first pass's digest of that shard before it is yielded
    (written): a file that vanished or appeared since would shift every later shard's items by one.

    Raises:
        OutputMismatchError: the listing changed since its digest was taken.
    """
    digest, shard_digest = hashlib.sha256(), hashlib.sha256()
    count, changed = 0, None
    current: list[Item] = []
    for count, item in enumerate(iter_items(sources, read=lambda i: i // shard_size in todo), 1):
        identity = item.identity()
        digest.update(identity)
        shard_digest.update(identity)
        shard = (count - 1) // shard_size
        if shard in todo:
            current.append(item)
        if count % shard_size == 0 or count == listing.count:
            listed = listing.shard_digests[shard] if shard < len(listing.shard_digests) else None
            if shard_digest.hexdigest() != listed:
                changed = shard
                break  # this shard no longer holds what was listed: write nothing more
            if current:
                yield shard, current
            current, shard_digest = [], hashlib.sha256()
    if changed is None and count != listing.count:
        changed = min(count, listing.count) // shard_size  # the listing ended early or ran on
    if changed is not None or digest.hexdigest() != listing.digest or current:
        where = f"from shard {changed} on" if changed is not None else "at the end"
        raise output.OutputMismatchError(
            f"the inputs changed while they were being embedded: the listing differs {where} from the "
            f"{listing.count} items listed at the start (files added, removed or renamed); the shards "
            "written before the change are kept and none after it. This folder belongs to the inputs as "
            "they were: restore them and re-run, or embed the settled inputs into a new -o folder"
        )


class ShardMismatchError(VisregHubError, RuntimeError):
    """The pipeline returned another number of results than the shard has inputs (a bug, or an input
    that turned into a folder while the job ran); nothing of the shard is written."""


class ShardEmbedder:
    """Embeds the items of one shard through the pipeline in fixed chunks.

    Args:
        pipeline: the :class:`~visreg_hub.inference.pipeline.EmbeddingPipeline`.
        batch_size, num_workers: passed to ``pipeline.run``.
    """

    def __init__(self, pipeline, *, batch_size: int, num_workers: int) -> None:
        self.pipeline = pipeline
        self.batch_size = batch_size
        self.num_workers = num_workers
        # why: with worker processes each pipeline call pays their start-up, so a whole shard goes in
        # one call; in-process decoding has no such cost and smaller calls update the progress bar
        self.chunk_items = None if num_workers > 0 else max(16 * batch_size, 1024)

    def _chunks(self, items: list[Item]):
        chunk: list[Item] = []
        size = 0
        for item in items:
            chunk.append(item)
            size += len(item.payload or b"")
            if size >= _CHUNK_BYTES or (self.chunk_items and len(chunk) >= self.chunk_items):
                yield chunk
                chunk, size = [], 0
        if chunk:
            yield chunk

    def embed(
        self, items: list[Item], progress=lambda n: None
    ) -> tuple[list[dict[str, Any]], np.ndarray, list[dict[str, Any]]]:
        """(rows, float32 (len(rows), E) embeddings, failures) of one shard, in listing order."""
        rows: list[dict[str, Any]] = []
        vectors: list[np.ndarray] = []
        failures: list[dict[str, Any]] = []
        for chunk in self._chunks(items):
            slot, payloads = _payloads(chunk)
            result, failed = self.pipeline.run(
                payloads, batch_size=self.batch_size, num_workers=self.num_workers, on_error="skip",
                show_progress_bar=False,
            )  # fmt: skip
            bad = dict(failed)
            _check_counts(chunk, payloads, len(result), bad)
            for position, item in enumerate(chunk):
                reason = item.error if position not in slot else bad.get(slot[position])
                if reason is None:
                    rows.append({"path": item.path, "key": item.key, "cls": item.cls, "json": item.json})
                    continue
                if item.key is not None and position in slot:  # the pipeline names bytes "item K (bytes)"
                    reason = reason.replace(f"item {slot[position]} (bytes)", f"{item.path}#{item.key}", 1)
                failures.append({"path": item.path, "key": item.key, "reason": reason})
            vectors.append(result.numpy())
            progress(len(chunk))
        dim = self.pipeline.output_shape[0]
        matrix = np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32)
        return rows, matrix.astype(np.float32, copy=False), failures


def _payloads(chunk: list[Item]) -> tuple[dict[int, int], list[Any]]:
    """(chunk position -> payload position, payloads) of the items the listing did not already fail.

    A file that became a folder since it was listed fails here: the pipeline would expand it into
    several images and every later row of the chunk would get another input's vector.
    """
    slot: dict[int, int] = {}
    payloads: list[Any] = []
    for position, item in enumerate(chunk):
        if item.error is None and item.key is None and os.path.isdir(item.path):
            item.error = f"{item.path} is a directory, not an image file; list its files, or pass the folder"
        if item.error is None:
            slot[position] = len(payloads)
            payloads.append(Path(item.path) if item.key is None else item.payload)
    return slot, payloads


def _check_counts(chunk: list[Item], payloads: list[Any], vectors: int, failed: dict[int, str]) -> None:
    """Every payload must give exactly one vector or one failure, or rows would shift onto the wrong
    vectors; raise rather than write such a shard."""
    if vectors + len(failed) != len(payloads) or any(not 0 <= i < len(payloads) for i in failed):
        first = chunk[0].path if chunk else "?"
        raise ShardMismatchError(
            f"{len(payloads)} inputs (from {first!r} on) gave {vectors} embeddings and {len(failed)} "
            f"failures; an input changed (a file replaced by a folder?) while the job ran: re-run the same "
            f"command (the finished shards are kept)"
        )
