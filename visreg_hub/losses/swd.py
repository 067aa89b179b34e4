"""Plain sliced Wasserstein distance to N(0, 1) as a module (VISReg's shape term without centring or scaling).

Defaults, steps, slice modes and distributed semantics: :mod:`visreg_hub.losses.modules`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import functional as F
from ._numerics import all_views, check_flag, check_views
from ._sliced import SlicedLoss
from .distributed import gather_batch
from .partition import partitioned_quantile_distance
from .sort_shape import check_sort_backend

__all__ = ["SWDLoss", "SWDOutput"]


class SWDOutput(NamedTuple):
    """``total = (1 - reg_weight) * invariance + reg_weight * swd``."""

    total: torch.Tensor
    invariance: torch.Tensor
    swd: torch.Tensor


class SWDLoss(SlicedLoss):
    """Plain sliced Wasserstein to N(0, 1) on the raw projections (VISReg's shape term without centring
    or scaling): ``(1 - reg_weight) * invariance + reg_weight * swd``. Arguments as :class:`VISRegLoss`.
    """

    def __init__(
        self,
        num_slices: int = 4096,
        reg_weight: float = 0.9,
        *,
        slice_mode: str = "partition",
        seed: int = 0,
        detach_target: bool = False,
        projection_dtype: torch.dtype | None = None,
        sort_backend: str = "auto",
        auto_step: bool = True,
        group=None,
    ) -> None:
        super().__init__(num_slices, seed, slice_mode, reg_weight, projection_dtype, auto_step, group)
        self.sort_backend = check_sort_backend(sort_backend)
        self.detach_target = check_flag("detach_target", detach_target)

    def _repr_settings(self):
        return [("detach_target", self.detach_target), ("projection_dtype", self.projection_dtype),
                ("sort_backend", self.sort_backend)]  # fmt: skip

    def forward(self, global_proj, local_proj=None, *, directions=None) -> SWDOutput:
        """Invariance plus the sliced Wasserstein distance to N(0, I) of a batch of projections.

        Args:
            global_proj: projections of the global views.
            local_proj: projections of the local views (smaller crops), or None.
            directions: slicing directions to use instead of this step's own (seeded) ones.

        Shape:
            global_proj ``(Vg, N, D)``; local_proj ``(Vl, N, D)`` with the same N and D; directions
            ``(D, K)`` with unit columns. Every field of the output is 0-d (total, invariance, swd).
        """
        local_proj = check_views(global_proj, local_proj)
        step = self._take_step()
        views = all_views(global_proj, local_proj)
        plan = self._plan(views, directions, step)
        communicates = plan.communicates
        if plan.mode == "partition":
            swd = partitioned_quantile_distance(
                views, plan.directions, projection_dtype=self.projection_dtype, group=self.group
            )
        else:
            samples = gather_batch(views, dim=-2, group=self.group) if plan.mode == "replicate" else views
            swd = F.sliced_wasserstein_loss(
                samples,
                plan.directions,
                projection_dtype=self.projection_dtype,
                sort_backend=self.sort_backend,
            )
        invariance = F.invariance_loss(global_proj, local_proj, detach_target=self.detach_target)
        if communicates:
            invariance, (swd,) = self._reduce(invariance, global_proj.shape[1], [swd])
        total = (1.0 - self.reg_weight) * invariance + self.reg_weight * swd
        return SWDOutput(total, invariance, swd)
