"""LeJEPA's objective as a module: invariance plus SIGReg (the term itself is in :mod:`.sigreg`).

Defaults, steps and distributed semantics: :mod:`visreg_hub.losses.modules`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import functional as F
from ._numerics import all_views, check_flag, check_views
from ._sliced import SlicedLoss
from .distributed import world_info
from .sigreg import check_grid

__all__ = ["SIGRegLoss", "SIGRegOutput"]


class SIGRegOutput(NamedTuple):
    """``total = (1 - reg_weight) * invariance + reg_weight * sigreg``."""

    total: torch.Tensor
    invariance: torch.Tensor
    sigreg: torch.Tensor


class SIGRegLoss(SlicedLoss):
    """LeJEPA: ``(1 - reg_weight) * invariance + reg_weight * SIGReg`` (Balestriero & LeCun 2025).

    Every rank uses the same directions; with ``sync=True`` (default) and a process group, the empirical
    characteristic function is all-reduced, so the statistic is that of the global batch (no gather).

    Args:
        num_slices: K directions per step.
        reg_weight: lambda in [0, 1] (default 0.05, LeJEPA's recommendation).
        t_max, num_knots: Epps-Pulley quadrature on ``[0, t_max]``.
        sync: all-reduce the characteristic function across ranks.
        seed, detach_target, projection_dtype, auto_step, group: as :class:`VISRegLoss`.
    """

    def __init__(
        self,
        num_slices: int = 4096,
        reg_weight: float = 0.05,
        *,
        t_max: float = 3.0,
        num_knots: int = 17,
        sync: bool = True,
        seed: int = 0,
        detach_target: bool = False,
        projection_dtype: torch.dtype | None = None,
        auto_step: bool = True,
        group=None,
    ) -> None:
        super().__init__(num_slices, seed, "local", reg_weight, projection_dtype, auto_step, group)
        check_grid(t_max, num_knots)
        self.t_max, self.num_knots, self.sync = float(t_max), num_knots, check_flag("sync", sync)
        self.detach_target = check_flag("detach_target", detach_target)

    def extra_repr(self) -> str:
        return (
            f"num_slices={self.num_slices}, reg_weight={self.reg_weight}, t_max={self.t_max}, "
            f"num_knots={self.num_knots}, sync={self.sync}, seed={self.seed}, step={self.step}"
        )

    def forward(self, global_proj, local_proj=None, *, directions=None) -> SIGRegOutput:
        """LeJEPA's loss: invariance plus SIGReg (the sliced Epps-Pulley statistic) of a batch of projections.

        Args:
            global_proj: projections of the global views.
            local_proj: projections of the local views (smaller crops), or None.
            directions: slicing directions to use instead of this step's own (seeded) ones.

        Shape:
            global_proj ``(Vg, N, D)``; local_proj ``(Vl, N, D)`` with the same N and D; directions
            ``(D, K)`` with unit columns. Every field of the output is 0-d (total, invariance, sigreg).
        """
        local_proj = check_views(global_proj, local_proj)
        step = self._take_step()
        views = all_views(global_proj, local_proj)
        directions = self._plan(views, directions, step).directions  # "local": shared, no gather
        communicates = self.sync and world_info(self.group)[0] > 1
        sigreg = F.sigreg_loss(
            views,
            directions,
            t_max=self.t_max,
            num_knots=self.num_knots,
            sync=communicates,
            group=self.group,
            projection_dtype=self.projection_dtype,
        )
        invariance = F.invariance_loss(global_proj, local_proj, detach_target=self.detach_target)
        if communicates:
            invariance, _ = self._reduce(invariance, global_proj.shape[1], [])
        total = (1.0 - self.reg_weight) * invariance + self.reg_weight * sigreg
        return SIGRegOutput(total, invariance, sigreg)
