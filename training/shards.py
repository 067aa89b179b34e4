"""WebDataset-style tar shards, read with :mod:`tarfile` (no webdataset dependency).

A shard is a tar file whose members are grouped by key: ``dir/xxx.jpg`` (or .jpeg/.png/.webp/...) and an
optional ``dir/xxx.cls`` holding the integer label as text belong to sample ``dir/xxx`` (the key is the
member name up to the first dot of its base name, as in WebDataset). Members of one sample are adjacent.

Splitting: each epoch the shard list is permuted with a seed of (seed, epoch); rank r of M takes shards
``r::M`` and DataLoader worker w of W takes ``w::W`` of those. Each worker streams its shards through a
seeded shuffle buffer and emits whole micro-batches, which the DataLoader returns round-robin over the
workers (exhausted workers drop out). That order is a pure function of the shard sample counts, so the
number of steps per epoch, each micro-batch's crop seed and the batches to skip on a mid-epoch resume
are all computed up front; skipped batches are read but not decoded.
"""

from __future__ import annotations

import logging
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from training.config import ConfigError
from training.datasets import NO_LABEL, to_base_tensor
from visreg_hub.bulk.listing import split_member
from visreg_hub.inference.images import IMAGE_EXTENSIONS

logger = logging.getLogger(__name__)

_IMAGE_SUFFIXES = {ext.lstrip(".") for ext in IMAGE_EXTENSIONS}


def iter_records(path: Path, decode_labels: bool = True) -> Iterator[tuple[str, bytes | None, int]]:
    """(key, image bytes, label) per sample of one shard; samples without an image are skipped.

    Args:
        path: the tar file.
        decode_labels: read the ``.cls`` members (False when only counting keys with images is needed
            and labels are not wanted).
    """
    current_key, image, label = None, None, NO_LABEL
    with tarfile.open(path, "r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, suffix = split_member(member.name)
            if key != current_key:
                if current_key is not None and image is not None:
                    yield current_key, image, label
                current_key, image, label = key, None, NO_LABEL
            last = suffix.rsplit(".", 1)[-1]
            if last in _IMAGE_SUFFIXES and image is None:
                image = tar.extractfile(member).read()
            elif last == "cls" and decode_labels:
                text = tar.extractfile(member).read().decode("utf-8").strip()
                try:
                    label = int(text)
                except ValueError:
                    message = f"{path}: {member.name} must hold an integer label, got {text!r}"
                    raise ConfigError(message) from None
    if current_key is not None and image is not None:
        yield current_key, image, label


@dataclass(frozen=True)
class ShardSet:
    """The shard files of a webdataset source and how many samples each holds.

    Attributes:
        shards: tar files, sorted.
        counts: samples (keys with an image) per shard.
        num_classes: 1 + the largest ``.cls`` label seen, 0 when the shards carry no labels.
    """

    shards: tuple[Path, ...]
    counts: tuple[int, ...]
    num_classes: int
    channels: int
    base_size: int
    shuffle_buffer: int

    @classmethod
    def scan(cls, path: str | Path, channels: int, base_size: int, shuffle_buffer: int) -> ShardSet:
        """List shards (a folder of .tar files, a glob pattern or one tar file) and count their samples."""
        path = Path(path).expanduser()
        if path.is_dir():
            shards = sorted(path.glob("*.tar"))
        elif any(ch in path.name for ch in "*?["):
            shards = sorted(path.parent.glob(path.name))
        else:
            shards = [path]
        if not shards:
            raise ConfigError(f"no .tar shards found at {path}")
        counts, max_label = [], NO_LABEL
        for shard in shards:
            labels = [label for _key, _image, label in iter_records(shard)]
            counts.append(len(labels))
            max_label = max([max_label, *labels])
        logger.info("webdataset: %d shards, %d samples", len(shards), sum(counts))
        return cls(tuple(shards), tuple(counts), max_label + 1, channels, base_size, shuffle_buffer)

    @property
    def has_labels(self) -> bool:
        return self.num_classes > 0

    def __len__(self) -> int:
        return sum(self.counts)

    def assignment(self, epoch: int, seed: int, rank: int, world: int, workers: int) -> list[list[int]]:
        """Shard indices per DataLoader worker of ``rank`` for ``epoch``."""
        order = np.random.default_rng([seed, epoch]).permutation(len(self.shards))
        mine = order[rank::world]
        return [mine[w :: max(workers, 1)].tolist() for w in range(max(workers, 1))]

    def batches_per_worker(self, assignment: list[list[int]], per_device: int) -> list[int]:
        return [sum(self.counts[i] for i in shards) // per_device for shards in assignment]


def round_robin_positions(counts: list[int]) -> list[list[int]]:
    """Position in the DataLoader output of each worker's j-th batch (round-robin, exhausted workers drop)."""
    positions = [[0] * count for count in counts]
    position = 0
    for j in range(max(counts, default=0)):
        for worker, count in enumerate(counts):
            if j < count:
                positions[worker][j] = position
                position += 1
    return positions


class ShardStream(torch.utils.data.IterableDataset):
    """This rank's micro-batches of one epoch: ``([(image (C, S, S) uint8, label, batch_seed)], position)``.

    On a resume the workers' first batches no longer alternate in position order, so the consumer puts
    them back in order with :func:`in_position_order`.

    Args:
        shard_set: the scanned shards.
        seeds: maps an output position (0, 1, ...) to that micro-batch's crop seed.
        epoch, seed, rank, world, workers: the split (``workers`` = DataLoader num_workers).
        per_device: images per micro-batch.
        skip: output positions below this are read but not decoded or returned (mid-epoch resume).
        total: output positions at or above this are not produced (the epoch's step budget).
    """

    def __init__(
        self,
        shard_set: ShardSet,
        seeds: list[int],
        epoch: int,
        seed: int,
        rank: int,
        world: int,
        workers: int,
        per_device: int,
        skip: int,
        total: int,
    ) -> None:
        super().__init__()
        self.shard_set, self.seeds, self.epoch, self.seed = shard_set, seeds, epoch, seed
        self.rank, self.world, self.workers, self.per_device = rank, world, workers, per_device
        self.skip, self.total = skip, total
        self.assignment = shard_set.assignment(epoch, seed, rank, world, workers)
        self.positions = round_robin_positions(shard_set.batches_per_worker(self.assignment, per_device))

    def _records(self, worker: int) -> Iterator[tuple[str, bytes, int]]:
        """The worker's records through a seeded shuffle buffer."""
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
        buffer: list = []
        for shard_index in self.assignment[worker]:
            for record in iter_records(self.shard_set.shards[shard_index]):
                if len(buffer) < self.shard_set.shuffle_buffer:
                    buffer.append(record)
                    continue
                slot = int(rng.integers(len(buffer)))
                yield buffer[slot]
                buffer[slot] = record
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self) -> Iterator[tuple[list[tuple[torch.Tensor, int, int]], int]]:
        info = torch.utils.data.get_worker_info()
        worker = 0 if info is None else info.id
        positions = self.positions[worker]
        batch: list = []
        produced = 0
        for key, image, label in self._records(worker):
            batch.append((key, image, label))
            if len(batch) < self.per_device:
                continue
            position = positions[produced]
            produced += 1
            records, batch = batch, []
            if position >= self.total:
                return
            if position < self.skip:
                continue
            seed = self.seeds[position]
            channels, base = self.shard_set.channels, self.shard_set.base_size
            yield [(to_base_tensor(img, channels, base), lab, seed) for _key, img, lab in records], position


class PositionedCollate:
    """Wraps a collate function for :class:`ShardStream` items, adding ``position`` to the batch dict."""

    def __init__(self, collate) -> None:
        self.collate = collate

    def __call__(self, item: tuple[list, int]) -> dict:
        samples, position = item
        return {**self.collate(samples), "position": position}


class InPositionOrder:
    """Iterate a DataLoader over a :class:`ShardStream`, yielding batches by increasing position.

    The DataLoader alternates between workers; after a mid-epoch skip the worker holding the next position
    may not be the one asked first, so at most ``num_workers`` batches wait in a small buffer.
    """

    def __init__(self, loader: torch.utils.data.DataLoader, first_position: int) -> None:
        self.loader, self.first_position = loader, first_position

    def __iter__(self) -> Iterator[dict]:
        pending, expected = {}, self.first_position
        for batch in self.loader:
            pending[batch["position"]] = batch
            while expected in pending:
                yield pending.pop(expected)
                expected += 1
        if pending:
            raise RuntimeError(f"shard stream lost positions before {sorted(pending)[0]}")
