"""VISReg as a module: invariance plus centre, scale and sliced shape terms on all views.

Defaults, steps, slice modes and distributed semantics: :mod:`visreg_hub.losses.modules`; the terms
themselves: :mod:`visreg_hub.losses.functional`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import functional as F
from ._numerics import all_views, check_flag, check_views, check_weight, report
from ._sliced import SlicedLoss
from .distributed import gather_batch, reduce_values, world_info
from .partition import partitioned_quantile_distance
from .sort_shape import check_sort_backend

__all__ = ["VISRegLoss", "VISRegOutput"]


class VISRegOutput(NamedTuple):
    """``total = (1 - reg_weight) * invariance + reg_weight * regularizer``; the rest unweighted."""

    total: torch.Tensor
    invariance: torch.Tensor
    regularizer: torch.Tensor
    center: torch.Tensor
    scale: torch.Tensor
    shape: torch.Tensor


class VISRegLoss(SlicedLoss):
    """VISReg: ``(1 - reg_weight) * invariance + reg_weight * (scale_w * scale + shape_w * shape +
    center_w * center)`` (Wu, Balestriero & Levine 2026), regulariser on all views.

    An exactly collapsed batch (every sample equal along a dimension) stays finite: the variance is floored
    at float32's smallest normal number, so the shape term's ``1 / std`` is about 1e19 and its gradient
    can reach 1e17 (the official code returns NaN there). Near collapse, not at it, the scale term's push
    stays constant as the paper argues (docs/results.md); clip gradients if a run can start collapsed.

    Args:
        num_slices: K, slice directions per step (split over ranks in ``partition`` mode).
        reg_weight: lambda in [0, 1].
        scale_weight, shape_weight, center_weight: term weights (>= 0); the paper raises
            ``shape_weight`` for long-tailed or low-rank data.
        slice_mode: ``"partition"`` (default), ``"replicate"`` or ``"local"``.
        seed: base seed of the slice generator.
        detach_target: stop the gradient through the global-view mean in the invariance term
            (default False, as the official code).
        projection_dtype: dtype of the slice projections (default: autocast dtype, else input dtype).
        sort_backend: ``"auto"`` (currently ``torch.sort``), ``"torch"``, or ``"triton"`` (opt-in CUDA
            kernel, verified only in Triton's CPU interpreter so far).
        auto_step: advance the step after each training-mode call.
        group: process group (default: the world).

    Example::

        loss_fn = VISRegLoss(num_slices=4096)
        out = loss_fn(global_proj, local_proj)   # (4, N, D), (6, N, D)
        out.total.backward(); log(out._asdict())
    """

    def __init__(
        self,
        num_slices: int = 4096,
        reg_weight: float = 0.9,
        scale_weight: float = 1.0,
        shape_weight: float = 1.0,
        center_weight: float = 1.0,
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
        self.scale_weight = check_weight("scale_weight", scale_weight)
        self.shape_weight = check_weight("shape_weight", shape_weight)
        self.center_weight = check_weight("center_weight", center_weight)
        self.detach_target = check_flag("detach_target", detach_target)

    def _repr_settings(self):
        return [
            ("scale_weight", self.scale_weight), ("shape_weight", self.shape_weight),
            ("center_weight", self.center_weight), ("detach_target", self.detach_target),
            ("projection_dtype", self.projection_dtype), ("sort_backend", self.sort_backend),
        ]  # fmt: skip

    def _regularizer(self, z, directions, step):
        """(center, scale, shape, communicates) of this rank, composed from the functional terms."""
        plan = self._plan(z, directions, step)
        if plan.mode == "partition":
            mean, std = F.batch_moments(z, sync=True, group=self.group)
            shape = partitioned_quantile_distance(
                z,
                plan.directions,
                mean=mean,
                inv_std=std.detach().reciprocal(),
                projection_dtype=self.projection_dtype,
                group=self.group,
            )
        else:
            samples = gather_batch(z, dim=-2, group=self.group) if plan.mode == "replicate" else z
            mean, std = F.batch_moments(samples)
            shape = F.shape_loss(
                samples,
                plan.directions,
                moments=(mean, std),
                projection_dtype=self.projection_dtype,
                sort_backend=self.sort_backend,
            )
        return F.center_term(mean), F.scale_term(std), shape, plan.communicates

    def _combine(self, center, scale, shape) -> torch.Tensor:
        return F.combine_regularizer(
            center, scale, shape, self.scale_weight, self.shape_weight, self.center_weight
        )

    def regularizer(self, z: torch.Tensor, directions: torch.Tensor | None = None) -> F.RegularizerOutput:
        """The regulariser alone on ``z`` ``(V, N, D)`` (all views), honouring the slice mode.

        Args:
            z: projections of every view.
            directions: optional explicit ``(D, K)`` directions (reproducible results).
        """
        check_views(z, None)
        center, scale, shape, communicates = self._regularizer(z, directions, self._take_step())
        if communicates:
            world_size, _ = world_info(self.group)
            shape = report(shape, reduce_values(shape.detach().double(), self.group) / world_size)
        return F.RegularizerOutput(self._combine(center, scale, shape), center, scale, shape)

    def forward(
        self,
        global_proj: torch.Tensor,
        local_proj: torch.Tensor | None = None,
        *,
        directions: torch.Tensor | None = None,
    ) -> VISRegOutput:
        """The VISReg loss of a batch of projections: the invariance term and the regulariser's center,
        scale and sliced shape terms (the paper's objective).

        Args:
            global_proj: projections of the global views.
            local_proj: projections of the local views (smaller crops), or None.
            directions: slicing directions to use instead of this step's own (seeded) ones.

        Shape:
            global_proj ``(Vg, N, D)``; local_proj ``(Vl, N, D)`` with the same N and D; directions
            ``(D, K)`` with unit columns. Every field of the output is 0-d (total, invariance,
            regularizer, center, scale, shape).
        """
        local_proj = check_views(global_proj, local_proj)
        step = self._take_step()
        center, scale, shape, communicates = self._regularizer(
            all_views(global_proj, local_proj), directions, step
        )
        invariance = F.invariance_loss(global_proj, local_proj, detach_target=self.detach_target)
        if communicates:
            invariance, (shape,) = self._reduce(invariance, global_proj.shape[1], [shape])
        regularizer = self._combine(center, scale, shape)
        total = (1.0 - self.reg_weight) * invariance + self.reg_weight * regularizer
        return VISRegOutput(total, invariance, regularizer, center, scale, shape)
