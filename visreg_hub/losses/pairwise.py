"""Pairwise peers of VISReg: VICReg and Barlow Twins, with the modules' calling convention.

``loss_fn(global_proj, local_proj=None)`` with ``(Vg, N, D)`` and ``(Vl, N, D)`` projections, Vg + Vl >= 2.
Pair-based parts average over :func:`~visreg_hub.losses.functional.view_pairs` (global-global and
global-local pairs); per-view parts average over all views. With ``gather=True`` (default) and an
initialised process group, every term is computed on the batch gathered from all ranks (as the original
implementations do), every rank reports the same values, and gradients follow the convention of
:mod:`visreg_hub.losses.distributed`. All statistics are computed in float32, also under autocast.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from . import functional as F
from ._numerics import all_views, check_eps, check_flag, check_views, check_weight
from .distributed import gather_batch
from .redundancy import check_barlow_route

__all__ = ["BarlowTwinsLoss", "BarlowTwinsOutput", "VICRegLoss", "VICRegOutput"]


class VICRegOutput(NamedTuple):
    """``total = invariance_weight * invariance + variance_weight * variance + covariance_weight * cov``."""

    total: torch.Tensor
    invariance: torch.Tensor
    variance: torch.Tensor
    covariance: torch.Tensor


class BarlowTwinsOutput(NamedTuple):
    """``total = on_diagonal + off_diagonal_weight * off_diagonal``."""

    total: torch.Tensor
    on_diagonal: torch.Tensor
    off_diagonal: torch.Tensor


class _GatheringLoss(nn.Module):
    def __init__(self, gather: bool, group) -> None:
        super().__init__()
        self.gather, self.group = check_flag("gather", gather), group

    def _views(self, global_proj, local_proj):
        local_proj = check_views(global_proj, local_proj)
        if not self.gather:
            return global_proj, local_proj
        gathered_local = None if local_proj is None else gather_batch(local_proj, -2, self.group)
        return gather_batch(global_proj, -2, self.group), gathered_local


class VICRegLoss(_GatheringLoss):
    """VICReg (Bardes, Ponce & LeCun 2022) for V >= 2 views.

    ``total = invariance_weight * invariance + variance_weight * variance + covariance_weight * covariance``,
    weighted as the official implementation (``facebookresearch/vicreg``) is at its two views: invariance
    is the MSE (averaged over global-global and global-local view pairs), variance the hinge averaged over
    views (the code's ``std_loss / 2 + ...``), covariance ``c(Z)`` *summed* over the two branches (the code's
    ``cov_loss``, the paper's eq. 6). With V views the covariance is ``(2 / V) * sum_v c(Z_v)``, so the
    weights keep their meaning whatever the number of crops. With ``gather=True`` (default) and a process
    group, every term is computed on the gathered global batch, as the original implementation.

    (The paper's eq. 6 writes the variance summed too, ``mu [v(Z) + v(Z')]``; its code and its reported
    weights average it, and this module follows the code.) Until 2026-12-01 the covariance was averaged
    over views, half of the above: this project's Fashion-MNIST method grid ran with that, which is
    ``covariance_weight=0.5`` here.
    """

    def __init__(
        self,
        invariance_weight: float = 25.0,
        variance_weight: float = 25.0,
        covariance_weight: float = 1.0,
        *,
        gamma: float = 1.0,
        eps: float = 1e-4,
        gather: bool = True,
        group=None,
    ) -> None:
        super().__init__(gather, group)
        self.invariance_weight = check_weight("invariance_weight", invariance_weight)
        self.variance_weight = check_weight("variance_weight", variance_weight)
        self.covariance_weight = check_weight("covariance_weight", covariance_weight)
        self.gamma = check_weight("gamma", gamma)
        check_eps(eps)  # a finite number > 0, refused here rather than at the first forward
        self.eps = float(eps)

    def extra_repr(self) -> str:
        return (
            f"invariance_weight={self.invariance_weight}, variance_weight={self.variance_weight}, "
            f"covariance_weight={self.covariance_weight}, gamma={self.gamma}, eps={self.eps}, "
            f"gather={self.gather}"
        )

    def forward(self, global_proj, local_proj=None) -> VICRegOutput:
        """VICReg (invariance, variance hinge, covariance) of a batch of projections; the invariance is
        averaged over the global-global and global-local view pairs.

        Args:
            global_proj: projections of the global views.
            local_proj: projections of the local views, or None.

        Shape:
            global_proj ``(Vg, N, D)``; local_proj ``(Vl, N, D)`` with the same N and D; Vg + Vl >= 2.
            Every field of the output is 0-d (total, invariance, variance, covariance).
        """
        global_proj, local_proj = self._views(global_proj, local_proj)
        views = all_views(global_proj, local_proj)
        invariance = F.vicreg_invariance_loss(global_proj, local_proj)
        variance, mean_covariance = F.vicreg_variance_covariance(views, gamma=self.gamma, eps=self.eps)
        covariance = 2.0 * mean_covariance  # c(Z) + c(Z') at two views, as the official code sums it
        total = (
            self.invariance_weight * invariance
            + self.variance_weight * variance
            + self.covariance_weight * covariance
        )
        return VICRegOutput(total, invariance, variance, covariance)


class BarlowTwinsLoss(_GatheringLoss):
    """Barlow Twins (Zbontar et al. 2021): ``sum (1 - C_ii)^2 + off_diagonal_weight * sum_{i!=j} C_ij^2``.

    For more than two views the two terms are averaged over global-global and global-local pairs. With
    ``gather=True`` (default) and a process group, C is computed on the gathered global batch.

    ``route`` picks how the cross-correlation sums are computed (same values, different cost and memory;
    see :func:`~visreg_hub.losses.functional.barlow_route`): ``"auto"`` (default, the cheaper route for
    the shape), ``"pairs"`` (``D x D`` per pair) or ``"gram"`` (``N x N`` per view, for wide heads and many
    pairs).
    """

    def __init__(
        self,
        off_diagonal_weight: float = 0.0051,
        *,
        eps: float = 1e-5,
        route: str = "auto",
        gather: bool = True,
        group=None,
    ) -> None:
        super().__init__(gather, group)
        self.off_diagonal_weight = check_weight("off_diagonal_weight", off_diagonal_weight)
        check_eps(eps)  # a finite number > 0, refused here rather than at the first forward
        self.eps = float(eps)
        self.route = check_barlow_route(route)

    def extra_repr(self) -> str:
        return (
            f"off_diagonal_weight={self.off_diagonal_weight}, eps={self.eps}, route={self.route!r}, "
            f"gather={self.gather}"
        )

    def forward(self, global_proj, local_proj=None) -> BarlowTwinsOutput:
        """Barlow Twins (cross-correlation on- and off-diagonal terms) of a batch of projections,
        averaged over the global-global and global-local view pairs.

        Args:
            global_proj: projections of the global views.
            local_proj: projections of the local views, or None.

        Shape:
            global_proj ``(Vg, N, D)``; local_proj ``(Vl, N, D)`` with the same N and D; Vg + Vl >= 2.
            Every field of the output is 0-d (total, on_diagonal, off_diagonal).
        """
        global_proj, local_proj = self._views(global_proj, local_proj)
        on_diagonal, off_diagonal = F.barlow_twins_terms(
            global_proj, local_proj, eps=self.eps, route=self.route
        )
        total = on_diagonal + self.off_diagonal_weight * off_diagonal
        return BarlowTwinsOutput(total, on_diagonal, off_diagonal)
