"""Pure loss terms on embeddings of shape ``(..., N, D)``: N samples (the batch axis), D projector dims.

Every function reduces to a 0-d tensor: the mean over the leading axes (views) of a per-view statistic
taken over the batch axis. Statistics are computed in float32 (float64 for float64 inputs) whatever the
input dtype and autocast state; only the slice projections of the sliced terms run in the autocast dtype
(see :mod:`visreg_hub.losses.sort_shape`: exact up to the projection's rounding, which moves values by
about 2 % and shape gradients by 8-28 % in bf16).

Terms (VISReg paper, Wu, Balestriero & Levine 2026; LeJEPA, Balestriero & LeCun 2025; VICReg, Bardes et
al. 2022; Barlow Twins, Zbontar et al. 2021):

* :func:`center_loss`: mean over (v, d) of ``(mean_n z)^2``.
* :func:`scale_loss`: mean over (v, d) of ``(sigma - 1)^2``, sigma the biased std over n, with gradient
  (its gradient tends to a constant as sigma -> 0: the paper's argument against collapse).
* :func:`shape_loss`: ``z_hat = (z - mu) / stopgrad(sigma)``; mean over (v, i, k) of
  ``(sort_n(z_hat @ W)_i - t_i)^2`` with ``t_i = Phi^-1(i / (N + 1))``: sliced 2-Wasserstein distance of
  the standardised embeddings to N(0, 1).
* :func:`visreg_regularizer`: ``scale_weight * scale + shape_weight * shape + center_weight * center``.
* :func:`invariance_loss`: mean over every view v (global and local), sample and dim of
  ``(z_v - mean over global views)^2`` (LeJEPA-style prediction loss).
* :func:`sliced_wasserstein_loss`: the shape term without centring or scaling (plain SWD).
* :func:`sigreg_loss`: LeJEPA's SIGReg, the Epps-Pulley statistic of every slice of the raw embeddings.
* :func:`vicreg_variance_loss`, :func:`vicreg_covariance_loss`, :func:`vicreg_invariance_loss`.
* :func:`barlow_twins_terms`: on- and off-diagonal parts of the cross-correlation-to-identity loss
  (:func:`barlow_route`: which of its two exact routes is cheaper at a shape).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from visreg_hub.errors import UserInputError

from . import _numerics as num
from ._numerics import gaussian_quantiles
from .distributed import all_reduce_sum, world_info
from .redundancy import (
    barlow_route,
    barlow_twins_terms,
    vicreg_covariance_loss,
    vicreg_invariance_loss,
    vicreg_variance_covariance,
    vicreg_variance_loss,
    view_pairs,
)
from .sigreg import epps_pulley_grid, sigreg_loss
from .sort_shape import sliced_quantile_distance

__all__ = [
    "RegularizerOutput",
    "barlow_route",
    "barlow_twins_terms",
    "batch_moments",
    "center_loss",
    "center_term",
    "combine_regularizer",
    "epps_pulley_grid",
    "gaussian_quantiles",
    "invariance_loss",
    "scale_loss",
    "scale_term",
    "shape_loss",
    "sigreg_loss",
    "sliced_wasserstein_loss",
    "vicreg_covariance_loss",
    "vicreg_invariance_loss",
    "vicreg_variance_covariance",
    "vicreg_variance_loss",
    "view_pairs",
    "visreg_regularizer",
]


class RegularizerOutput(NamedTuple):
    """VISReg regulariser: weighted ``total`` and its unweighted terms (0-d tensors)."""

    total: torch.Tensor
    center: torch.Tensor
    scale: torch.Tensor
    shape: torch.Tensor


# --------------------------------------------------------------------------------------------- moments
def _leading_blocks(z: torch.Tensor) -> list[torch.Tensor]:
    """``z`` ``(..., N, D)`` as ``(b, N, D)`` blocks of leading rows with at most ``num.TEMPORARY_ELEMENTS``
    elements each (one row when a row alone is more), so float32 temporaries of a bf16 input, or of a
    difference, never hold the whole batch (see :mod:`.sort_shape` on why small temporaries are cheaper)."""
    flat = z.reshape(-1, *z.shape[-2:])
    step = max(1, num.TEMPORARY_ELEMENTS // max(1, flat[0].numel()))
    return [flat[start : start + step] for start in range(0, flat.shape[0], step)]


class _BatchMoments(torch.autograd.Function):
    """Mean and biased std over the batch axis in float32, saving only the input for the backward."""

    @staticmethod
    def forward(ctx, z):
        accumulate = num.accumulation_dtype(z.dtype)
        if z.dtype == accumulate:
            var, mean = torch.var_mean(z, dim=-2, correction=0)
        else:  # upcast a block of views at a time: the same float32 statistics per view
            parts = [
                torch.var_mean(block.to(accumulate), dim=-2, correction=0) for block in _leading_blocks(z)
            ]
            shape = z.shape[:-2] + z.shape[-1:]
            var = torch.cat([part[0] for part in parts]).view(shape)
            mean = torch.cat([part[1] for part in parts]).view(shape)
        std = var.clamp_min(torch.finfo(accumulate).tiny).sqrt()
        ctx.save_for_backward(z, mean, std)
        return mean, std

    @staticmethod
    @num.first_order_only
    def backward(ctx, grad_mean, grad_std):
        z, mean, std = ctx.saved_tensors
        n = z.shape[-2]
        # d mean / dz = 1 / N ;  d std / dz = (z - mean) / (N std):  grad = z * a + b, one fused kernel
        a = grad_std / (n * std)
        b = grad_mean / n - mean * a
        out = torch.empty_like(z)
        return torch.addcmul(b.unsqueeze(-2), z, a.unsqueeze(-2), out=out)


def batch_moments(z: torch.Tensor, *, sync: bool = False, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-view mean mu and biased std sigma over the batch axis, both differentiable.

    Args:
        z: embeddings; with ``sync`` this rank's shard of the batch.
        sync: when a process group is initialised, the moments of the batch concatenated over ranks,
            from this shard's sums all-reduced (two small all-reduces, no gather); gradients follow the
            convention of :mod:`visreg_hub.losses.distributed`.
        group: process group for ``sync``.

    Shape:
        ``z``: ``(..., N, D)``. Returns ``(mean, std)``, each ``(..., D)`` in float32 (float64 for float64
        ``z``). The variance is floored at the dtype's smallest normal number (so ``std`` at its square
        root, about 1e-19 in float32) so that an exactly collapsed batch gives finite values; terms that
        divide by ``std`` (the shape term) then have gradients of order ``1 / std``: clip gradients.
    """
    num.check_samples(z)
    if not sync or world_info(group)[0] == 1:
        return _BatchMoments.apply(z)
    upcast = num.to_accumulation(z)
    sums = torch.cat([upcast.sum(dim=-2).flatten(), upcast.new_full((1,), float(z.shape[-2]))])
    sums = all_reduce_sum(sums, group)
    count = sums[-1].detach()
    mean = sums[:-1].view(z.shape[:-2] + z.shape[-1:]) / count
    squares = (upcast - mean.unsqueeze(-2)).square().sum(dim=-2)
    std = (all_reduce_sum(squares, group) / count).clamp_min(torch.finfo(upcast.dtype).tiny).sqrt()
    return mean, std


def center_term(mean: torch.Tensor) -> torch.Tensor:
    """VISReg center term from the batch means: mean over (views, dims) of ``mu^2``.

    Shape:
        ``mean``: ``(..., D)`` (from :func:`batch_moments`). Returns a 0-d tensor.
    """
    return mean.square().mean()


def scale_term(std: torch.Tensor) -> torch.Tensor:
    """VISReg scale term from the batch stds: mean over (views, dims) of ``(sigma - 1)^2``.

    Shape:
        ``std``: ``(..., D)`` (from :func:`batch_moments`). Returns a 0-d tensor.
    """
    return (std - 1.0).square().mean()


def center_loss(z: torch.Tensor) -> torch.Tensor:
    """VISReg center term L_center: mean over (views, dims) of the squared batch mean.

    Shape:
        ``z``: ``(..., N, D)``. Returns a 0-d float32 tensor (float64 for float64 ``z``).
    """
    return center_term(batch_moments(z)[0])


def scale_loss(z: torch.Tensor) -> torch.Tensor:
    """VISReg scale term L_scale: mean over (views, dims) of ``(sigma - 1)^2``, sigma the biased std over
    N, with its gradient (which tends to a constant as sigma -> 0).

    Shape:
        ``z``: ``(..., N, D)``. Returns a 0-d float32 tensor (float64 for float64 ``z``).
    """
    return scale_term(batch_moments(z)[1])


def shape_loss(
    z: torch.Tensor,
    directions: torch.Tensor,
    *,
    moments: tuple[torch.Tensor, torch.Tensor] | None = None,
    projection_dtype: torch.dtype | None = None,
    sort_backend: str = "auto",
) -> torch.Tensor:
    """VISReg shape term L_shape: sliced W2 of ``z_hat = (z - mu) / stopgrad(sigma)`` to the N(0, 1)
    quantiles, ``mean over (v, i, k) of (sort_n(z_hat @ W)_i - Phi^-1(i / (N + 1)))^2``.

    Args:
        z: embeddings.
        directions: unit directions (e.g. from :class:`~visreg_hub.losses.SliceSampler`).
        moments: ``(mean, std)`` from :func:`batch_moments`, when already computed (the gradient still
            flows through ``mean``; ``std`` is detached, as the paper prescribes). Each is ``(..., D)``
            as ``z``'s leading dimensions, or broadcastable to it (``(1, D)``: moments pooled over views).
        projection_dtype: dtype of the projection matmul (default: autocast dtype, else ``z.dtype``).
        sort_backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see :mod:`visreg_hub.losses.sort_shape`).

    Shape:
        ``z``: ``(..., N, D)``; ``directions``: ``(D, K)``. Returns a 0-d float32 tensor (float64 for
        float64 ``z``).
    """
    num.check_samples(z)
    num.check_directions(z, directions)
    if moments is not None and not (isinstance(moments, tuple | list) and len(moments) == 2):
        raise UserInputError("moments must be the (mean, std) pair batch_moments(z) returns")
    mean, std = batch_moments(z) if moments is None else moments
    return sliced_quantile_distance(
        z,
        directions,
        mean=mean,
        inv_std=std.detach().reciprocal(),
        projection_dtype=projection_dtype,
        sort_backend=sort_backend,
    )


def sliced_wasserstein_loss(
    x: torch.Tensor,
    directions: torch.Tensor,
    *,
    projection_dtype: torch.dtype | None = None,
    sort_backend: str = "auto",
) -> torch.Tensor:
    """Plain SWD to N(0, 1): mean over (v, i, k) of ``(sort_n(x @ W)_i - t_i)^2``, no standardisation.

    Shape:
        ``x``: ``(..., N, D)``; ``directions``: ``(D, K)``. Returns a 0-d float32 tensor (float64 for
        float64 ``x``).
    """
    num.check_samples(x)
    return sliced_quantile_distance(
        x, directions, projection_dtype=projection_dtype, sort_backend=sort_backend
    )


def visreg_regularizer(
    z: torch.Tensor,
    directions: torch.Tensor,
    *,
    scale_weight: float = 1.0,
    shape_weight: float = 1.0,
    center_weight: float = 1.0,
    projection_dtype: torch.dtype | None = None,
    sort_backend: str = "auto",
) -> RegularizerOutput:
    """VISReg regulariser R = ``scale_weight * L_scale + shape_weight * L_shape + center_weight * L_center``.

    Args:
        z: embeddings of all views.
        directions: slice directions for the shape term.

    Shape:
        ``z``: ``(..., N, D)``; ``directions``: ``(D, K)``. Every field of the result is 0-d.
    """
    num.check_samples(z)
    num.check_directions(z, directions)
    mean, std = batch_moments(z)
    center, scale = center_term(mean), scale_term(std)
    shape = shape_loss(
        z, directions, moments=(mean, std), projection_dtype=projection_dtype, sort_backend=sort_backend
    )
    total = combine_regularizer(center, scale, shape, scale_weight, shape_weight, center_weight)
    return RegularizerOutput(total, center, scale, shape)


def combine_regularizer(center, scale, shape, scale_weight=1.0, shape_weight=1.0, center_weight=1.0):
    """``scale_weight * scale + shape_weight * shape + center_weight * center`` (0-d tensors)."""
    return scale_weight * scale + shape_weight * shape + center_weight * center


# ---------------------------------------------------------------------------------------- invariance
class _SquaredDeviation(torch.autograd.Function):
    """``sum (views - target)^2`` for views ``(V, N, D)`` and a float32 target ``(N, D)``.

    Saves only its inputs (the views are alive anyway), not a float32 copy of the deviations.
    """

    @staticmethod
    def forward(ctx, views, target):
        ctx.save_for_backward(views, target)
        total = None
        for block in _leading_blocks(views):  # a block of views at a time: small float32 temporaries
            part = torch.sub(block, target).square_().sum()  # promoted to float32 without a copy of the views
            total = part if total is None else total + part
        return total

    @staticmethod
    @num.first_order_only
    def backward(ctx, grad):
        views, target = ctx.saved_tensors
        factor = 2.0 * grad
        grad_views = grad_target = None
        if ctx.needs_input_grad[0]:
            grad_views = torch.empty_like(views)
            torch.sub(views, target, out=grad_views).mul_(factor.to(views.dtype))
        if ctx.needs_input_grad[1]:
            grad_target = (views.sum(dim=0, dtype=target.dtype) - views.shape[0] * target) * -factor
        return grad_views, grad_target


def invariance_loss(
    global_proj: torch.Tensor, local_proj: torch.Tensor | None = None, *, detach_target: bool = False
) -> torch.Tensor:
    """Invariance (LeJEPA's prediction loss, the VISReg paper's L_inv): mean over every view (global and
    local), sample and dim of ``(z_v - mean_global z)^2``.

    Args:
        global_proj: projections of the global views; their mean is the target.
        local_proj: optional projections of the local views.
        detach_target: stop the gradient through the target. Off by default, as in the official code.

    Shape:
        ``global_proj``: ``(Vg, N, D)``; ``local_proj``: ``(Vl, N, D)``. Returns a 0-d float32 tensor
        (float64 for float64 inputs).
    """
    local_proj = num.check_views(global_proj, local_proj)  # a local N or D that differs, named
    target = global_proj.mean(dim=0, dtype=num.accumulation_dtype(global_proj.dtype))
    if detach_target:
        target = target.detach()
    squared = _SquaredDeviation.apply(global_proj, target)
    count = global_proj.numel()
    if local_proj is not None:
        squared = squared + _SquaredDeviation.apply(local_proj, target)
        count += local_proj.numel()
    return squared / count
