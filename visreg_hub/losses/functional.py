"""Pure loss terms on embeddings of shape ``(..., N, D)``: N samples (the batch axis), D projector dims.

Every function reduces to a 0-d tensor: the mean over the leading axes (views) of a per-view statistic
taken over the batch axis. Statistics are computed in float32 (float64 for float64 inputs) whatever the
input dtype and autocast state; only the slice projections of the sliced terms run in the autocast dtype
(see :mod:`visreg_hub.losses.sort_shape` for why that is exact up to the projection's rounding).

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
* :func:`barlow_twins_terms`: on- and off-diagonal parts of the cross-correlation-to-identity loss.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .sigreg import epps_pulley_grid, sigreg_loss
from .sort_shape import (
    _accumulation_dtype,
    _autocast_off,
    _check_directions,
    gaussian_quantiles,
    sliced_quantile_distance,
    sliced_quantile_distance_reference,
)

__all__ = [
    "RegularizerOutput",
    "barlow_twins_terms",
    "batch_moments",
    "center_loss",
    "epps_pulley_grid",
    "gaussian_quantiles",
    "invariance_loss",
    "scale_loss",
    "shape_loss",
    "shape_loss_reference",
    "sigreg_loss",
    "sliced_wasserstein_loss",
    "sliced_wasserstein_loss_reference",
    "vicreg_covariance_loss",
    "vicreg_invariance_loss",
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


def _check_samples(z: torch.Tensor, minimum: int = 1) -> None:
    if z.dim() < 2 or z.shape[-2] < minimum:
        raise ValueError(f"embeddings must have shape (..., N, D) with N >= {minimum}, got {tuple(z.shape)}")
    if not z.is_floating_point():
        raise ValueError(f"embeddings must be a floating-point tensor, got dtype {z.dtype}")


def _float(z: torch.Tensor) -> torch.Tensor:
    return z.to(_accumulation_dtype(z.dtype))


# --------------------------------------------------------------------------------------------- moments
class _BatchMoments(torch.autograd.Function):
    """Mean and biased std over the batch axis in float32, saving only the input for the backward."""

    @staticmethod
    def forward(ctx, z):
        accumulate = _accumulation_dtype(z.dtype)
        var, mean = torch.var_mean(z.to(accumulate), dim=-2, correction=0)
        std = var.clamp_min(torch.finfo(accumulate).tiny).sqrt()
        ctx.save_for_backward(z, mean, std)
        return mean, std

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_mean, grad_std):
        z, mean, std = ctx.saved_tensors
        n = z.shape[-2]
        # d mean / dz = 1 / N ;  d std / dz = (z - mean) / (N std):  grad = z * a + b, one fused kernel
        a = grad_std / (n * std)
        b = grad_mean / n - mean * a
        out = torch.empty_like(z)
        return torch.addcmul(b.unsqueeze(-2), z, a.unsqueeze(-2), out=out)


def batch_moments(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-view mean and biased std over the batch axis, both differentiable.

    Args:
        z: ``(..., N, D)``.

    Returns:
        ``(mean, std)``, each ``(..., D)`` in float32 (float64 for float64 ``z``). ``std`` is floored at
        the dtype's smallest normal number so that an exactly collapsed batch gives finite values.
    """
    _check_samples(z)
    return _BatchMoments.apply(z)


def center_loss(z: torch.Tensor) -> torch.Tensor:
    """VISReg center term: mean over (views, dims) of the squared batch mean. ``z``: ``(..., N, D)``."""
    mean, _ = batch_moments(z)
    return mean.square().mean()


def scale_loss(z: torch.Tensor) -> torch.Tensor:
    """VISReg scale term: mean over (views, dims) of ``(sigma - 1)^2``, sigma = biased std over N."""
    _, std = batch_moments(z)
    return (std - 1.0).square().mean()


def _shape_from_moments(z, mean, std, directions, projection_dtype, sort_backend="auto"):
    return sliced_quantile_distance(
        z,
        directions,
        mean=mean,
        inv_std=std.detach().reciprocal(),
        projection_dtype=projection_dtype,
        sort_backend=sort_backend,
    )


def shape_loss(
    z: torch.Tensor,
    directions: torch.Tensor,
    *,
    projection_dtype: torch.dtype | None = None,
    sort_backend: str = "auto",
) -> torch.Tensor:
    """VISReg shape term: sliced W2 of ``(z - mu) / stopgrad(sigma)`` to the N(0, 1) quantiles.

    Args:
        z: ``(..., N, D)`` embeddings.
        directions: ``(D, K)`` unit directions (e.g. from :class:`~visreg_hub.losses.SliceSampler`).
        projection_dtype: dtype of the projection matmul (default: autocast dtype, else ``z.dtype``).
        sort_backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see :mod:`visreg_hub.losses.sort_shape`).
    """
    _check_samples(z)
    _check_directions(z, directions)
    mean, std = batch_moments(z)
    return _shape_from_moments(z, mean, std, directions, projection_dtype, sort_backend)


def shape_loss_reference(z: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Plain-autograd shape term (differentiates through ``torch.sort``); for tests and as a definition."""
    mean = z.mean(dim=-2)
    std = z.std(dim=-2, correction=0)
    return sliced_quantile_distance_reference(z, directions, mean=mean, std=std)


def sliced_wasserstein_loss(
    x: torch.Tensor,
    directions: torch.Tensor,
    *,
    projection_dtype: torch.dtype | None = None,
    sort_backend: str = "auto",
) -> torch.Tensor:
    """Plain SWD to N(0, 1): mean over (v, i, k) of ``(sort_n(x @ W)_i - t_i)^2``, no standardisation."""
    _check_samples(x)
    return sliced_quantile_distance(
        x, directions, projection_dtype=projection_dtype, sort_backend=sort_backend
    )


def sliced_wasserstein_loss_reference(x: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Plain-autograd SWD; for tests."""
    return sliced_quantile_distance_reference(x, directions)


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
    """VISReg regulariser ``scale_weight * scale + shape_weight * shape + center_weight * center``.

    Args:
        z: ``(..., N, D)`` embeddings (all views).
        directions: ``(D, K)`` slice directions for the shape term.
    """
    _check_samples(z)
    _check_directions(z, directions)
    mean, std = batch_moments(z)
    center = mean.square().mean()
    scale = (std - 1.0).square().mean()
    shape = _shape_from_moments(z, mean, std, directions, projection_dtype, sort_backend)
    total = scale_weight * scale + shape_weight * shape + center_weight * center
    return RegularizerOutput(total, center, scale, shape)


# ---------------------------------------------------------------------------------------- invariance
class _SquaredDeviation(torch.autograd.Function):
    """``sum (views - target)^2`` for views ``(V, N, D)`` and a float32 target ``(N, D)``.

    Saves only its inputs (the views are alive anyway), not a float32 copy of the deviations.
    """

    @staticmethod
    def forward(ctx, views, target):
        deviation = torch.sub(views, target)  # promoted to float32 without a copy of the views
        ctx.save_for_backward(views, target)
        return deviation.square_().sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
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
    """Mean over every view (global and local), sample and dim of ``(z_v - mean_global z)^2``.

    Args:
        global_proj: ``(Vg, N, D)`` projections of the global views; their mean is the target.
        local_proj: optional ``(Vl, N, D)`` projections of the local views.
        detach_target: stop the gradient through the target. Off by default, as in the official code.
    """
    _check_samples(global_proj)
    target = global_proj.mean(dim=0, dtype=_accumulation_dtype(global_proj.dtype))
    if detach_target:
        target = target.detach()
    squared = _SquaredDeviation.apply(global_proj, target)
    count = global_proj.numel()
    if local_proj is not None:
        squared = squared + _SquaredDeviation.apply(local_proj, target)
        count += local_proj.numel()
    return squared / count


# ------------------------------------------------------------------------------------ VICReg, Barlow
def view_pairs(num_global: int, num_views: int) -> list[tuple[int, int]]:
    """Unordered view pairs ``(a, b)``, ``a < b``, with ``a`` a global view: global-global and
    global-local pairs, no local-local pairs (the multi-crop convention)."""
    return [(a, b) for a in range(num_global) for b in range(a + 1, num_views)]


def vicreg_variance_loss(z: torch.Tensor, *, gamma: float = 1.0, eps: float = 1e-4) -> torch.Tensor:
    """VICReg variance hinge: mean over (views, dims) of ``relu(gamma - sqrt(var_n + eps))``.

    ``var`` is the unbiased variance over the batch axis, as in the VICReg paper. ``z``: ``(..., N, D)``.
    """
    _check_samples(z, minimum=2)
    std = torch.sqrt(_float(z).var(dim=-2, correction=1) + eps)
    return torch.relu(gamma - std).mean()


def vicreg_covariance_loss(z: torch.Tensor) -> torch.Tensor:
    """VICReg covariance term: mean over views of ``sum_{i != j} C_ij^2 / D``, C the unbiased covariance.

    (The VICReg code sums this term over its two branches; the mean here is half that at V = 2.)
    """
    _check_samples(z, minimum=2)
    n, dim = z.shape[-2:]
    centred = _float(z) - _float(z).mean(dim=-2, keepdim=True)
    with _autocast_off(z.device.type):
        cov = centred.transpose(-1, -2) @ centred / (n - 1)
    off_diagonal = cov.square().sum(dim=(-2, -1)) - cov.diagonal(dim1=-2, dim2=-1).square().sum(-1)
    return (off_diagonal / dim).mean()


def _all_views(global_proj: torch.Tensor, local_proj: torch.Tensor | None) -> torch.Tensor:
    return global_proj if local_proj is None else torch.cat([global_proj, local_proj.to(global_proj.dtype)])


def vicreg_invariance_loss(global_proj: torch.Tensor, local_proj: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over :func:`view_pairs` of the mean squared difference between the two views' projections.

    At two views this is VICReg's ``F.mse_loss(z_a, z_b)``. Inputs ``(Vg, N, D)`` and ``(Vl, N, D)``.
    """
    views = _float(_all_views(global_proj, local_proj))
    pairs = view_pairs(global_proj.shape[0], views.shape[0])
    if not pairs:
        raise ValueError(f"VICReg needs at least two views, got global {tuple(global_proj.shape)}")
    # unbind once: indexing views[a] per pair makes autograd zero-fill a (V, N, D) gradient per pair.
    per_view = views.unbind(0)
    return torch.stack([(per_view[a] - per_view[b]).square().mean() for a, b in pairs]).mean()


def barlow_twins_terms(
    global_proj: torch.Tensor, local_proj: torch.Tensor | None = None, *, eps: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Barlow Twins: ``(sum_i (1 - C_ii)^2, sum_{i != j} C_ij^2)`` averaged over :func:`view_pairs`.

    ``C = zn_a^T zn_b / N`` with ``zn = (z - mean_n) / sqrt(var_n + eps)`` (biased variance, the
    affine-free batch norm of the original). The loss is ``on_diagonal + off_diagonal_weight * off``.
    """
    views = _float(_all_views(global_proj, local_proj))
    _check_samples(views, minimum=2)
    pairs = view_pairs(global_proj.shape[0], views.shape[0])
    if not pairs:
        raise ValueError(f"Barlow Twins needs at least two views, got global {tuple(global_proj.shape)}")
    n = views.shape[-2]
    var, mean = torch.var_mean(views, dim=-2, correction=0, keepdim=True)
    normalised = (views - mean) / torch.sqrt(var + eps)
    on_terms, off_terms = [], []
    with _autocast_off(views.device.type):
        per_view = normalised.unbind(0)  # see vicreg_invariance_loss: no per-pair zero-filled gradients
        for a, b in pairs:
            corr = per_view[a].t() @ per_view[b] / n
            diagonal = corr.diagonal()
            on_terms.append((1.0 - diagonal).square().sum())
            off_terms.append(corr.square().sum() - diagonal.square().sum())
    return torch.stack(on_terms).mean(), torch.stack(off_terms).mean()
