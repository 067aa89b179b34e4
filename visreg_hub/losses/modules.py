"""Loss modules with one calling convention: ``loss_fn(global_proj, local_proj=None) -> NamedTuple``.

``global_proj`` is ``(Vg, N, D)`` (Vg global views of the same N images, projector dim D) and
``local_proj`` an optional ``(Vl, N, D)`` for local crops. Every module returns a NamedTuple whose first
field ``total`` is the loss to back-propagate and whose other fields are the unweighted terms, for logging.

Defaults and their sources:

* :class:`VISRegLoss`: ``reg_weight=0.9`` (lambda of the official repository's ViT-B/16 ImageNet-1K
  config; it uses 0.8 for ViT-L/14 and 0.6 for small data), ``num_slices=4096``, term weights 1, 1, 1.
* :class:`SIGRegLoss`: ``reg_weight=0.05`` (LeJEPA's recommended lambda), ``num_slices=4096``
  (the VISReg repository's SIGReg config), 17 knots on ``[0, 3]``.
* :class:`SWDLoss`: ``reg_weight=0.9`` (the VISReg repository uses one lambda for all its regularisers).
* :class:`VICRegLoss`: invariance 25, variance 25, covariance 1, gamma 1 (VICReg paper).
* :class:`BarlowTwinsLoss`: off-diagonal weight 0.0051 (Barlow Twins paper).

Views. The regularisers of VISReg, SWD and SIGReg see *all* views (global and local stacked, as the
official code does): every view counts once in their means. VICReg's invariance and Barlow Twins'
cross-correlation average over :func:`~visreg_hub.losses.functional.view_pairs` (global-global and
global-local pairs).

Slices and steps. Directions come from a :class:`~visreg_hub.losses.SliceSampler` seeded by
``(seed, step)``. ``step`` is the step the next call uses; each call in training mode then advances it by
one (``auto_step=True``), and :meth:`set_step` overrides it, so calling ``loss_fn.set_step(global_step)``
before every call, or never, both work. ``(seed, step)`` is saved in ``state_dict()`` (extra state), so
resuming is exact. An explicit ``directions=`` ``(D, K)`` overrides the sampler (in ``partition`` mode the
ranks split its columns; in ``replicate`` and ``local`` modes every rank uses all of them).

Distributed (slice_mode, see :mod:`visreg_hub.losses.slices`). ``partition`` never gathers the
embeddings: the batch moments come from every rank's shard sums all-reduced, and one all-to-all hands each
rank all samples on its K/M slices (:mod:`visreg_hub.losses.partition`), so per-rank work and traffic
shrink with M. ``replicate`` gathers the batch (every rank needs all of it for its own K directions). In
``partition`` and ``replicate`` modes
every reported term equals the single-process value on the concatenated batch (the per-rank partial
values are summed with one small all-reduce; the invariance is averaged over ranks too), and the gradient
on each rank's inputs is ``world_size`` times the single-process gradient, which DDP's gradient averaging
turns into the single-process parameter gradient exactly. ``local`` mode communicates nothing.

Mixed precision. Batch statistics, residuals and every reduction run in float32; the slice projections run
in the autocast dtype (bf16) and are sorted as such, which equals sorting their float32 upcast; pass
``projection_dtype=torch.float32`` to project in float32 instead. See
:mod:`visreg_hub.losses.sort_shape`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import nn

from . import functional as F
from ._numerics import all_views, check_views, check_weight, report
from .distributed import gather_batch, reduce_values, world_info
from .pairwise import BarlowTwinsLoss, BarlowTwinsOutput, VICRegLoss, VICRegOutput
from .partition import partitioned_quantile_distance
from .slices import SLICE_MODES, SlicePlan, SliceSampler, plan_slices
from .sort_shape import SORT_BACKENDS

__all__ = [
    "BarlowTwinsLoss",
    "BarlowTwinsOutput",
    "SIGRegLoss",
    "SIGRegOutput",
    "SWDLoss",
    "SWDOutput",
    "VICRegLoss",
    "VICRegOutput",
    "VISRegLoss",
    "VISRegOutput",
]


class VISRegOutput(NamedTuple):
    """``total = (1 - reg_weight) * invariance + reg_weight * regularizer``; the rest unweighted."""

    total: torch.Tensor
    invariance: torch.Tensor
    regularizer: torch.Tensor
    center: torch.Tensor
    scale: torch.Tensor
    shape: torch.Tensor


class SIGRegOutput(NamedTuple):
    """``total = (1 - reg_weight) * invariance + reg_weight * sigreg``."""

    total: torch.Tensor
    invariance: torch.Tensor
    sigreg: torch.Tensor


class SWDOutput(NamedTuple):
    """``total = (1 - reg_weight) * invariance + reg_weight * swd``."""

    total: torch.Tensor
    invariance: torch.Tensor
    swd: torch.Tensor


# -------------------------------------------------------------------------------- sliced base class
class _SlicedLoss(nn.Module):
    """Shared state of the sliced losses: sampler, step counter, slice mode, process group."""

    def __init__(
        self,
        num_slices: int,
        seed: int,
        slice_mode: str,
        reg_weight: float,
        projection_dtype: torch.dtype | None,
        auto_step: bool,
        group,
    ) -> None:
        super().__init__()
        if slice_mode not in SLICE_MODES:
            raise ValueError(f"slice_mode must be one of {SLICE_MODES}, got {slice_mode!r}")
        if projection_dtype is not None and not (
            isinstance(projection_dtype, torch.dtype) and projection_dtype.is_floating_point
        ):
            raise ValueError(
                f"projection_dtype must be a floating torch.dtype or None, got {projection_dtype!r}"
            )
        self.sampler = SliceSampler(num_slices, seed)
        self.num_slices = num_slices
        self.slice_mode = slice_mode
        self.reg_weight = check_weight("reg_weight", reg_weight, upper=1.0)
        self.projection_dtype = projection_dtype
        self.auto_step = bool(auto_step)
        self.group = group
        self.step = 0

    @property
    def seed(self) -> int:
        return self.sampler.seed

    def set_step(self, step: int) -> None:
        """Use directions of ``step`` on the next call (e.g. the optimiser's global step)."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        self.step = step

    def _take_step(self) -> int:
        step = self.step
        if self.training and self.auto_step:
            self.step += 1
        return step

    def get_extra_state(self) -> dict[str, Any]:
        return {"seed": self.sampler.seed, "step": self.step}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or not {"seed", "step"} <= set(state):
            raise ValueError(f"loss extra state must be a dict with 'seed' and 'step', got {state!r}")
        self.sampler = SliceSampler(self.num_slices, int(state["seed"]))
        self.set_step(int(state["step"]))

    def extra_repr(self) -> str:
        return (
            f"num_slices={self.num_slices}, slice_mode={self.slice_mode!r}, reg_weight={self.reg_weight}, "
            f"seed={self.seed}, step={self.step}"
        )

    def _check_explicit(self, directions: torch.Tensor, dim: int) -> torch.Tensor:
        if not isinstance(directions, torch.Tensor) or directions.dim() != 2 or directions.shape[0] != dim:
            shape = tuple(directions.shape) if isinstance(directions, torch.Tensor) else type(directions)
            raise ValueError(f"directions must be a (D, K) = ({dim}, K) tensor, got {shape}")
        return directions

    def _plan(self, z: torch.Tensor, directions: torch.Tensor | None, step: int) -> SlicePlan:
        """This step's :class:`~visreg_hub.losses.slices.SlicePlan` for embeddings ``z`` ``(V, N, D)``."""
        dim = z.shape[-1]
        if directions is not None:
            directions = self._check_explicit(directions, dim)
        world = world_info(self.group)
        return plan_slices(self.sampler, self.slice_mode, dim, step, z.device, world, directions)

    def _reduce(self, invariance: torch.Tensor, batch: int, partial: list[torch.Tensor]):
        """One all-reduce for the reported values: the invariance averaged over every rank's samples (exact
        for unequal batches) and the per-rank ``partial`` terms averaged over ranks. Values become the
        global ones; gradients stay those of this rank's share (see the module docstring)."""
        world_size, _ = world_info(self.group)
        local = [invariance.new_full((), float(batch), dtype=torch.float64)]
        local.append(invariance.detach().double() * batch)
        local.extend(term.detach().double() / world_size for term in partial)
        reduced = reduce_values(torch.stack(local), self.group)
        total_batch = reduced[0]
        share = (world_size * batch / total_batch).to(invariance.dtype)
        invariance = report(invariance * share, reduced[1] / total_batch)
        return invariance, [report(term, value) for term, value in zip(partial, reduced[2:])]


# ------------------------------------------------------------------------------------------- VISReg
class VISRegLoss(_SlicedLoss):
    """VISReg: ``(1 - reg_weight) * invariance + reg_weight * (scale_w * scale + shape_w * shape +
    center_w * center)`` (Wu, Balestriero & Levine 2026), regulariser on all views.

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
        if sort_backend not in SORT_BACKENDS:
            raise ValueError(f"sort_backend must be one of {SORT_BACKENDS}, got {sort_backend!r}")
        self.sort_backend = sort_backend
        self.scale_weight = check_weight("scale_weight", scale_weight)
        self.shape_weight = check_weight("shape_weight", shape_weight)
        self.center_weight = check_weight("center_weight", center_weight)
        self.detach_target = bool(detach_target)

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
        """Args: ``global_proj`` ``(Vg, N, D)``, ``local_proj`` ``(Vl, N, D)`` or None, ``directions``."""
        check_views(global_proj, local_proj)
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


# ---------------------------------------------------------------------------------------------- SWD
class SWDLoss(_SlicedLoss):
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
        if sort_backend not in SORT_BACKENDS:
            raise ValueError(f"sort_backend must be one of {SORT_BACKENDS}, got {sort_backend!r}")
        self.sort_backend = sort_backend
        self.detach_target = bool(detach_target)

    def forward(self, global_proj, local_proj=None, *, directions=None) -> SWDOutput:
        """Args: ``global_proj`` ``(Vg, N, D)``, ``local_proj`` ``(Vl, N, D)`` or None, ``directions``."""
        check_views(global_proj, local_proj)
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


# ------------------------------------------------------------------------------------------- SIGReg
class SIGRegLoss(_SlicedLoss):
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
        if isinstance(num_knots, bool) or not isinstance(num_knots, int) or num_knots < 2:
            raise ValueError(f"num_knots must be an integer >= 2, got {num_knots!r}")
        if isinstance(t_max, bool) or not isinstance(t_max, int | float) or not 0 < t_max < math.inf:
            raise ValueError(f"t_max must be a positive finite number, got {t_max!r}")
        self.t_max, self.num_knots, self.sync = float(t_max), num_knots, bool(sync)
        self.detach_target = bool(detach_target)

    def extra_repr(self) -> str:
        return (
            f"num_slices={self.num_slices}, reg_weight={self.reg_weight}, t_max={self.t_max}, "
            f"num_knots={self.num_knots}, sync={self.sync}, seed={self.seed}, step={self.step}"
        )

    def forward(self, global_proj, local_proj=None, *, directions=None) -> SIGRegOutput:
        """Args: ``global_proj`` ``(Vg, N, D)``, ``local_proj`` ``(Vl, N, D)`` or None, ``directions``."""
        check_views(global_proj, local_proj)
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
