"""The step arithmetic of a run, computed once: a frozen :class:`RunPlan`.

Accumulation, steps per epoch, total steps and warm-up all follow from the config, the data size and the
number of processes; computing them in one place keeps the trainer, the learning-rate schedule, the
checkpoint records and the exported recipe in agreement.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from training.checks import batch_plan
from training.config import TrainingConfig
from training.data import TrainData, epoch_steps

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunPlan:
    """How many optimiser steps a run takes and how each is made.

    Attributes:
        world: number of processes.
        accumulation: micro-steps per optimiser step on every process.
        steps_by_epoch: optimiser steps of each configured epoch.
        total_steps: ``train.max_steps`` or the sum of ``steps_by_epoch``.
        warmup_steps: linear warm-up length (``optim.warmup_steps``, else ``optim.warmup_epochs`` of the
            first epoch), at most ``total_steps - 1``.
    """

    world: int
    accumulation: int
    steps_by_epoch: tuple[int, ...]
    total_steps: int
    warmup_steps: int

    @property
    def epochs(self) -> int:
        return len(self.steps_by_epoch)


def build_run_plan(config: TrainingConfig, data: TrainData, world: int) -> RunPlan:
    """The :class:`RunPlan` of ``config`` on ``data`` with ``world`` processes.

    Raises:
        ConfigError: the global batch is not divisible by per-device batch x number of processes.
    """
    accumulation = batch_plan(config, world)
    steps_by_epoch = tuple(
        epoch_steps(data, config, world, accumulation, epoch) for epoch in range(config.train.epochs)
    )
    total_steps = config.train.max_steps or sum(steps_by_epoch)
    warmup = config.optim.warmup_steps
    if warmup is None:
        warmup = round(config.optim.warmup_epochs * steps_by_epoch[0])
    warn_long_warmup(config, warmup, total_steps)
    return RunPlan(world, accumulation, steps_by_epoch, total_steps, min(warmup, max(total_steps - 1, 0)))


def warn_long_warmup(config: TrainingConfig, warmup: int, total_steps: int) -> None:
    """Warn when the warm-up is at least the whole run: the LR would never reach ``optim.lr`` in time
    (the plan cuts it to ``total_steps - 1``, so the peak comes only at the last step)."""
    if warmup < total_steps or total_steps <= 1:
        return
    key = "optim.warmup_steps" if config.optim.warmup_steps is not None else "optim.warmup_epochs"
    logger.warning(
        "the warm-up (%s: %d steps) is not shorter than the whole run (%d steps): the learning rate "
        "reaches optim.lr only at the last step; shorten %s or train longer",
        key, warmup, total_steps, key,
    )  # fmt: skip
