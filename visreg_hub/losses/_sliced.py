"""Base class of the sliced losses (VISReg, SWD, SIGReg): sampler, step counter, slice mode, process group.

It holds what the three share: the :class:`~visreg_hub.losses.SliceSampler` and its ``(seed, step)``
(saved as extra state), the step's :class:`~visreg_hub.losses.slices.SlicePlan`, and the one all-reduce
that turns per-rank reported values into global ones. The semantics (steps, slice modes, gradients under
DDP) are described once, in :mod:`visreg_hub.losses.modules`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from visreg_hub.errors import UserInputError

from ._numerics import check_flag, check_unit_columns, check_weight, report
from .distributed import reduce_values, world_info
from .slices import SLICE_MODES, SlicePlan, SliceSampler, plan_slices

__all__ = ["SlicedLoss"]


class SlicedLoss(nn.Module):
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
            raise UserInputError(f"slice_mode must be one of {SLICE_MODES}, got {slice_mode!r}")
        if projection_dtype is not None and not (
            isinstance(projection_dtype, torch.dtype) and projection_dtype.is_floating_point
        ):
            raise UserInputError(
                f"projection_dtype must be a floating torch.dtype or None, got {projection_dtype!r}"
            )
        self.sampler = SliceSampler(num_slices, seed)
        self.num_slices = num_slices
        self.slice_mode = slice_mode
        self.reg_weight = check_weight("reg_weight", reg_weight, upper=1.0)
        self.projection_dtype = projection_dtype
        self.auto_step = check_flag("auto_step", auto_step)
        self.group = group
        self.step = 0

    @property
    def seed(self) -> int:
        return self.sampler.seed

    def set_step(self, step: int) -> None:
        """Use directions of ``step`` on the next call (e.g. the optimiser's global step)."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise UserInputError(f"step must be a non-negative integer, got {step!r}")
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
            raise UserInputError(f"loss extra state must be a dict with 'seed' and 'step', got {state!r}")
        self.sampler = SliceSampler(self.num_slices, int(state["seed"]))
        self.set_step(int(state["step"]))

    def extra_repr(self) -> str:
        settings = ", ".join(f"{name}={value!r}" for name, value in self._repr_settings())
        return (
            f"num_slices={self.num_slices}, slice_mode={self.slice_mode!r}, reg_weight={self.reg_weight}, "
            f"{settings + ', ' if settings else ''}seed={self.seed}, step={self.step}"
        )

    def _repr_settings(self) -> list[tuple[str, Any]]:
        """The subclass's own settings for ``repr`` (term weights, ...), beyond the shared ones."""
        return []

    def _check_explicit(self, directions: torch.Tensor, dim: int) -> torch.Tensor:
        if not isinstance(directions, torch.Tensor) or directions.dim() != 2 or directions.shape[0] != dim:
            shape = tuple(directions.shape) if isinstance(directions, torch.Tensor) else type(directions)
            raise UserInputError(f"directions must be a (D, K) = ({dim}, K) tensor, got {shape}")
        check_unit_columns(directions)
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
        global ones; gradients stay those of this rank's share (see :mod:`visreg_hub.losses.modules`)."""
        world_size, _ = world_info(self.group)
        local = [invariance.new_full((), float(batch), dtype=torch.float64)]
        local.append(invariance.detach().double() * batch)
        local.extend(term.detach().double() / world_size for term in partial)
        reduced = reduce_values(torch.stack(local), self.group)
        total_batch = reduced[0]
        share = (world_size * batch / total_batch).to(invariance.dtype)
        invariance = report(invariance * share, reduced[1] / total_batch)
        return invariance, [report(term, value) for term, value in zip(partial, reduced[2:])]
