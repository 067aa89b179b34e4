"""Training data plan: long-tailed subsampling, the global-batch sampler, multi-crop collate, loaders.

Images are decoded and resized to ``data.base_size`` squares in DataLoader workers
(:mod:`training.datasets`, :mod:`training.shards`) and travel as uint8 (C, base, base). Views are then cut
by :func:`training.augment.multi_crop`, either in the workers' collate (``augment_on: workers``) or on the
accelerator after the transfer (``augment_on: device``). Every micro-batch carries a seed derived from
(seed, epoch, step, micro-step, rank), so its crops are the same whichever path cuts them, however many
workers there are, and after a resume.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import signal
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from training.augment import ColorSpec, ViewSpec, multi_crop
from training.config import AugmentSection, ConfigError, LongTailSection, TrainingConfig
from training.datasets import ImageSet, open_image_set
from training.shards import InPositionOrder, PositionedCollate, ShardSet, ShardStream

logger = logging.getLogger(__name__)

NO_LABEL = -1


# ------------------------------------------------------------------------------------------ long tail
@dataclass(frozen=True)
class LongTailInfo:
    """Per-class counts of a long-tailed subset and their ImageNet-LT style groups.

    Attributes:
        counts: images kept per class id.
        groups: ``"many"`` (> many_threshold), ``"medium"`` or ``"few"`` (< few_threshold) per class id.
        many_threshold, few_threshold: the thresholds used (see :func:`class_groups`).
    """

    counts: dict[int, int]
    groups: dict[int, str]
    many_threshold: int
    few_threshold: int

    def to_dict(self) -> dict:
        return {
            "counts": {str(k): v for k, v in self.counts.items()},
            "groups": {str(k): v for k, v in self.groups.items()},
            "many_threshold": self.many_threshold,
            "few_threshold": self.few_threshold,
        }


def class_groups(counts: dict[int, int], many: int | None = None, few: int | None = None) -> LongTailInfo:
    """Group classes by training count: many (> many), medium, few (< few).

    Default thresholds: ImageNet-LT's 100 and 20 when the largest class has >= 1280 images (as in
    ImageNet-LT). Smaller sets put them at the same relative places on the log scale between the smallest
    and largest counts as ImageNet-LT's do between 5 and 1280: many = n_min (n_max / n_min)^0.540,
    few = n_min (n_max / n_min)^0.25 (ln 20 / ln 256 and ln 4 / ln 256), so that all three groups exist.
    """
    n_max, n_min = max(counts.values(), default=1), max(1, min(counts.values(), default=1))
    if n_max >= 1280:
        default_many, default_few = 100, 20
    else:
        ratio = n_max / n_min
        default_many = round(n_min * ratio ** (math.log(20) / math.log(256)))
        default_few = round(n_min * ratio**0.25)
    many = many if many is not None else default_many
    few = few if few is not None else default_few
    if few > many:
        raise ConfigError(f"few_threshold={few} must not exceed many_threshold={many}")
    groups = {c: "many" if n > many else "few" if n < few else "medium" for c, n in counts.items()}
    return LongTailInfo(dict(counts), groups, many, few)


def long_tail_indices(labels: np.ndarray, spec: LongTailSection) -> tuple[np.ndarray, LongTailInfo]:
    """Subsample a labelled set to a long-tailed class profile.

    Classes are ranked by a seeded permutation (which class is the head is random, not the lowest id).
    With rank r = 0..C-1 and n_max = ``spec.max_per_class`` (default: the smallest available class count,
    so every class can supply its quota):

    * ``pareto``: n_r = n_max * (r + 1)^(-alpha), alpha = ``spec.alpha`` or ln(imbalance_ratio) / ln(C)
      (so the tail class has n_max / imbalance_ratio; ImageNet-LT: 1280 -> 5 over 1000 classes, ratio 256);
    * ``exponential``: n_r = n_max * imbalance_ratio^(-r / (C - 1)) (Cui et al. 2019, CIFAR-LT).

    Counts are floored, clipped to [min_per_class, available]; which images are kept is seeded too.

    Returns:
        (sorted kept indices into ``labels``, :class:`LongTailInfo`).
    """
    if labels is None:
        raise ConfigError("data.long_tail needs labels; this data source has none")
    rng = np.random.default_rng(spec.seed)
    classes = np.unique(labels)
    available = {int(c): int((labels == c).sum()) for c in classes}
    n_max = spec.max_per_class or min(available.values())
    num_classes = len(classes)
    order = rng.permutation(classes)
    kept, counts, clipped = [], {}, []
    alpha = spec.alpha
    if alpha is None:
        alpha = float(np.log(spec.imbalance_ratio) / np.log(max(num_classes, 2)))
    for rank, cls in enumerate(order):
        if spec.profile == "pareto":
            quota = n_max * (rank + 1) ** (-alpha)
        else:
            quota = n_max * spec.imbalance_ratio ** (-rank / max(num_classes - 1, 1))
        wanted = max(spec.min_per_class, int(quota))
        count = int(min(available[int(cls)], wanted))
        if count < wanted:
            clipped.append(f"class {int(cls)}: {count} of {wanted}")
        members = np.flatnonzero(labels == cls)
        kept.append(rng.choice(members, size=count, replace=False))
        counts[int(cls)] = count
    if clipped:  # the profile is not the one asked for: results labelled with it would mislead
        logger.warning(
            "long-tail profile clipped to the images available (%s); the kept counts, head first, are %s, "
            "not the %s profile's: lower data.long_tail.max_per_class (compare.py: --lt-max) to keep it",
            ", ".join(clipped), [counts[int(c)] for c in order], spec.profile,
        )  # fmt: skip
    info = class_groups(dict(sorted(counts.items())), spec.many_threshold, spec.few_threshold)
    return np.sort(np.concatenate(kept)), info


# ------------------------------------------------------------------------------------------ sampling
def batch_seed(seed: int, epoch: int, step: int, micro: int, rank: int) -> int:
    """A 63-bit seed for one micro-batch's crops, stable across processes and Python versions."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{step}/{micro}/{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class GlobalBatchSampler(torch.utils.data.Sampler):
    """This rank's micro-batches of an epoch, for a fixed global batch on any number of processes.

    The epoch's order is a permutation seeded by (seed, epoch). Optimiser step s consumes positions
    [s*G, (s+1)*G) of it (G = global batch); micro-step a of rank r takes the block
    ``s*G + (a*M + r)*B`` of B = per-device batch (M processes), so a step sees the same images
    whatever M and the accumulation are. The last partial global batch is dropped.

    Yields lists of ``(index, batch_seed)`` keys for :meth:`ImageSet.__getitem__`.
    """

    def __init__(
        self,
        num_samples: int,
        per_device: int,
        num_processes: int,
        rank: int,
        accumulation: int,
        seed: int,
        epoch: int = 0,
        start_step: int = 0,
    ) -> None:
        self.num_samples, self.per_device, self.num_processes = num_samples, per_device, num_processes
        self.rank, self.accumulation, self.seed = rank, accumulation, seed
        self.epoch, self.start_step = epoch, start_step
        self.global_batch = per_device * num_processes * accumulation
        if num_samples < self.global_batch:
            raise ConfigError(
                f"the training set has {num_samples} images, fewer than one global batch "
                f"({self.global_batch}); lower train.global_batch_size"
            )

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.accumulation

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        for step in range(self.start_step, self.steps_per_epoch):
            for micro in range(self.accumulation):
                start = step * self.global_batch + (micro * self.num_processes + self.rank) * self.per_device
                seed = batch_seed(self.seed, self.epoch, step, micro, self.rank)
                yield [(index, seed) for index in order[start : start + self.per_device]]


# ------------------------------------------------------------------------------------------ views
def view_specs(aug: AugmentSection) -> tuple[ViewSpec, ViewSpec | None, ColorSpec]:
    """The augment section as :mod:`training.augment` specs."""
    global_spec = ViewSpec(aug.global_count, aug.global_size, tuple(aug.global_scale))
    local_spec = None
    if aug.local_count:
        local_spec = ViewSpec(aug.local_count, aug.local_size, tuple(aug.local_scale))
    # every ColorSpec field has a same-named AugmentSection field (tests/training/test_config.py checks it)
    color = ColorSpec(**{spec.name: getattr(aug, spec.name) for spec in dataclasses.fields(ColorSpec)})
    return global_spec, local_spec, color


def cut_views(
    images: torch.Tensor, seed: int, aug: AugmentSection
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, C, H, W) uint8 images -> (Vg, B, C, Sg, Sg), (Vl, B, C, Sl, Sl) | None float views in [0, 1].

    Random draws come from a CPU generator seeded by ``seed``, so the device and worker paths agree.
    """
    generator = torch.Generator().manual_seed(seed)
    global_spec, local_spec, color = view_specs(aug)
    return multi_crop(images.float().div_(255), global_spec, local_spec, color, generator)


class MultiCropCollate:
    """Collate ``(image uint8, label, batch_seed)`` samples into a training batch.

    With ``cut=True`` (``augment_on: workers``) the views are cut here; otherwise the uint8 images are
    returned for :func:`cut_views` on the device.

    Returns:
        dict with ``labels`` (B,) int64, ``seed`` int, and either ``global_views`` / ``local_views`` or
        ``images`` (B, C, H, W) uint8.
    """

    def __init__(self, aug: AugmentSection, cut: bool) -> None:
        self.aug, self.cut = aug, cut

    def __call__(self, samples: list[tuple[torch.Tensor, int, int]]) -> dict:
        images = torch.stack([sample[0] for sample in samples])
        labels = torch.tensor([sample[1] for sample in samples], dtype=torch.long)
        seed = int(samples[0][2])
        if not self.cut:
            return {"images": images, "labels": labels, "seed": seed}
        global_views, local_views = cut_views(images, seed, self.aug)
        return {"global_views": global_views, "local_views": local_views, "labels": labels, "seed": seed}


# ------------------------------------------------------------------------------------------ assembly
@dataclass
class TrainData:
    """What a run trains and evaluates on.

    Attributes:
        train: the (possibly long-tailed) training images.
        bank: labelled images whose features form the kNN memory bank, or None.
        val: labelled validation images (kNN queries), or None.
        long_tail: class counts and groups when ``data.long_tail.enabled``.
    """

    train: ImageSet | ShardSet
    bank: ImageSet | None
    val: ImageSet | None
    long_tail: LongTailInfo | None = None

    @property
    def has_labels(self) -> bool:
        if isinstance(self.train, ShardSet):
            return self.train.has_labels
        return self.train.labels is not None

    @property
    def num_classes(self) -> int:
        return max(self.train.num_classes, self.val.num_classes if self.val is not None else 0)

    def describe(self) -> dict:
        """JSON-able summary for logs and the exported model's metadata."""
        out = {"train_images": len(self.train), "num_classes": self.num_classes}
        out["val_images"] = len(self.val) if self.val is not None else 0
        out["knn_bank_images"] = len(self.bank) if self.bank is not None else 0
        if self.long_tail is not None:
            out["long_tail"] = self.long_tail.to_dict()
        return out


def build_data(config: TrainingConfig) -> TrainData:
    """Open the training set, carve or open the validation split, apply long-tailed subsampling.

    The validation split is carved (``data.val_size`` images, seeded by ``train.seed``) before the
    long-tailed subsampling, so it stays class-balanced as ImageNet-LT's is.
    """
    data, seed = config.data, config.train.seed
    rng = np.random.default_rng([seed, 17])
    val = None
    if data.source == "webdataset":
        train = ShardSet.scan(data.path, data.channels, data.base_size, data.shuffle_buffer)
        if data.long_tail.enabled:
            raise ConfigError("data.long_tail needs random access; it is not available for webdataset shards")
        if data.val_size:
            raise ConfigError("data.val_size cannot carve from shards; set data.val_source and data.val_path")
    else:
        train = open_image_set(data.source, data.path, data.split, data)
        if data.val_size and data.val_source is None:
            if data.val_size >= len(train):
                raise ConfigError(f"data.val_size={data.val_size} leaves none of {len(train)} to train on")
            order = rng.permutation(len(train))
            val = train.subset(np.sort(order[: data.val_size]))
            train = train.subset(np.sort(order[data.val_size :]))
    if data.val_source is not None:
        val = open_image_set(data.val_source, data.val_path, data.val_split, data)
    long_tail = None
    if data.long_tail.enabled:
        kept, long_tail = long_tail_indices(train.labels, data.long_tail)
        train = train.subset(kept)
    if val is not None and val.labels is None:
        logger.warning("the validation images have no labels; kNN evaluation is off")
        val = None
    bank = None
    if val is not None:
        if isinstance(train, ImageSet) and train.labels is not None:
            size = config.eval.knn_bank_size or len(train)
            bank = train.subset(np.sort(rng.permutation(len(train))[:size])) if size < len(train) else train
        else:
            # No labelled random-access training images: split the validation set into bank and queries.
            order = rng.permutation(len(val))
            half = len(val) // 2
            bank, val = val.subset(np.sort(order[:half])), val.subset(np.sort(order[half:]))
    return TrainData(train, bank, val, long_tail)


def epoch_steps(data: TrainData, config: TrainingConfig, world: int, accumulation: int, epoch: int) -> int:
    """Optimiser steps in ``epoch`` (the same for every rank)."""
    global_batch = config.train.global_batch_size
    if isinstance(data.train, ImageSet):
        if len(data.train) < global_batch:
            raise ConfigError(
                f"the training set has {len(data.train)} images, fewer than one global batch "
                f"({global_batch}); lower train.global_batch_size"
            )
        return len(data.train) // global_batch
    per_device, workers = config.train.per_device_batch_size, config.data.num_workers
    assignments = [data.train.assignment(epoch, config.train.seed, r, world, workers) for r in range(world)]
    per_rank = [sum(data.train.batches_per_worker(assigned, per_device)) for assigned in assignments]
    steps = min(per_rank) // accumulation
    if steps == 0:
        raise ConfigError(
            f"epoch {epoch}: some rank gets fewer than one step of samples from the shards ({per_rank} "
            f"micro-batches per rank); use more or smaller shards, or a smaller batch"
        )
    return steps


def leave_stop_signals_to_the_main_process(_worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a worker ignores SIGTERM.

    why: a scheduler's preemption (SLURM, ``kill -- -PGID``) sends SIGTERM to every process of the job;
    a worker it killed made the main process fail with "DataLoader worker ... killed by signal" instead
    of stopping with its "continue with --resume auto" line. The main process stops the workers itself,
    and a worker whose main process died exits on its own (PyTorch's parent watchdog). SIGINT (Ctrl-C)
    already leaves workers running: PyTorch's worker loop ignores it.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def train_loader(
    data: TrainData,
    config: TrainingConfig,
    rank: int,
    world: int,
    accumulation: int,
    epoch: int,
    start_step: int = 0,
) -> torch.utils.data.DataLoader:
    """This rank's micro-batches of ``epoch`` from optimiser step ``start_step`` on (see module docstring)."""
    train_cfg, workers = config.train, config.data.num_workers
    common = dict(
        num_workers=workers,
        collate_fn=MultiCropCollate(config.augment, cut=config.augment.augment_on == "workers"),
        pin_memory=torch.cuda.is_available(),
        # Its own generator: creating the iterator must not consume the global RNG (exact resume).
        generator=torch.Generator().manual_seed(train_cfg.seed),
        prefetch_factor=4 if workers else None,
        worker_init_fn=leave_stop_signals_to_the_main_process if workers else None,
    )
    if isinstance(data.train, ImageSet):
        sampler = GlobalBatchSampler(
            len(data.train), train_cfg.per_device_batch_size, world, rank, accumulation,
            train_cfg.seed, epoch, start_step,
        )  # fmt: skip
        return torch.utils.data.DataLoader(data.train, batch_sampler=sampler, **common)
    total = epoch_steps(data, config, world, accumulation, epoch) * accumulation
    seeds = [
        batch_seed(train_cfg.seed, epoch, position // accumulation, position % accumulation, rank)
        for position in range(total)
    ]
    stream = ShardStream(
        data.train, seeds, epoch, train_cfg.seed, rank, world, workers,
        train_cfg.per_device_batch_size, start_step * accumulation, total,
    )  # fmt: skip
    common["collate_fn"] = PositionedCollate(common["collate_fn"])
    loader = torch.utils.data.DataLoader(stream, batch_size=None, **common)
    return InPositionOrder(loader, start_step * accumulation)
