"""SIGReg (LeJEPA, Balestriero & LeCun 2025): Epps-Pulley normality statistic of random slices.

Per slice ``p = x @ w`` of the raw (un-standardised) embeddings ``x`` ``(..., N, D)``::

    T = N * sum_j weight_j * |ECF(t_j) - exp(-t_j^2 / 2)|^2,   ECF(t) = mean_n exp(i t p_n)

with knots ``t_j`` evenly spaced on ``[0, t_max]`` (17 on ``[0, 3]`` by default) and trapezoid weights
doubled for the mirror half ``t < 0``, times the ``exp(-t^2 / 2)`` window. The loss is the mean of T over
views and slices. Distributed: the sums of ``cos`` and ``sin`` (and N) are all-reduced, so every rank
evaluates the statistic of the global batch without gathering it.

Precision: the slice projections run in the autocast dtype (as LeJEPA's own bf16 training does; pass
``projection_dtype=torch.float32`` for float32 slices); the trigonometric terms, sums and statistic are
computed in float32. The backward recomputes ``cos`` and ``sin`` knot by knot instead of storing an
``(..., N, K, knots)`` tensor.
"""

from __future__ import annotations

import math

import torch

from visreg_hub.errors import UserInputError

from . import _numerics as num
from .distributed import all_reduce_sum

__all__ = ["epps_pulley_grid", "sigreg_loss"]


_GRID_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _cached_grid(t_max: float, num_knots: int, device: str, dtype: torch.dtype):
    key = (t_max, num_knots, device, dtype)
    cached = _GRID_CACHE.get(key)
    if cached is None:
        if len(_GRID_CACHE) >= 32:
            _GRID_CACHE.clear()
        t = torch.linspace(0.0, t_max, num_knots, dtype=torch.float64)
        dt = t_max / (num_knots - 1)
        weights = torch.full((num_knots,), 2.0 * dt, dtype=torch.float64)
        weights[0] = weights[-1] = dt
        phi = torch.exp(-0.5 * t.square())
        cached = _GRID_CACHE[key] = tuple(v.to(device=device, dtype=dtype) for v in (t, phi, weights * phi))
    return cached


def epps_pulley_grid(
    t_max: float = 3.0,
    num_knots: int = 17,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Knots, N(0, 1) characteristic function and quadrature weights of the Epps-Pulley statistic.

    Trapezoid rule on ``[0, t_max]`` doubled for the symmetric half ``[-t_max, 0]`` (interior weights
    ``2 dt``, end weights ``dt``), times the ``exp(-t^2 / 2)`` window. Returns ``(t, phi, weights)``
    (copies of cached values: editing them changes nothing else).
    """
    check_grid(t_max, num_knots)
    device = torch.device("cpu") if device is None else torch.device(device)
    return tuple(v.clone() for v in _cached_grid(float(t_max), int(num_knots), str(device), dtype))


MAX_KNOTS = 4096  # LeJEPA uses 17; the bound keeps a typo from allocating (knots x samples) per slice


def check_grid(t_max: float, num_knots: int) -> None:
    """Refuse an Epps-Pulley grid that is not ``2 <= num_knots <= MAX_KNOTS`` knots on ``(0, t_max]``."""
    if isinstance(num_knots, bool) or not isinstance(num_knots, int) or not 2 <= num_knots <= MAX_KNOTS:
        raise UserInputError(f"num_knots must be an integer in [2, {MAX_KNOTS}], got {num_knots!r}")
    if isinstance(t_max, bool) or not isinstance(t_max, (int, float)) or not 0 < t_max < math.inf:
        raise UserInputError(f"t_max must be a finite positive number, got {t_max!r}")


class _CharacteristicSums(torch.autograd.Function):
    """Sums over N of ``cos(t_j p)`` and ``sin(t_j p)`` for ``p`` of shape ``(R, N)``, knot by knot.

    Saves only ``p``; the backward recomputes the trigonometric terms instead of keeping an
    ``(R, N, J)`` tensor alive, which is what makes the textbook implementation memory hungry. The knots
    are Python floats, so no device-to-host copy is needed to loop over them.
    """

    @staticmethod
    def forward(ctx, projections, knots, accumulate):
        rows, n = projections.shape
        sums = torch.empty((rows, 2, len(knots)), dtype=accumulate, device=projections.device)
        step = max(1, num.TEMPORARY_ELEMENTS // max(1, n))
        for start in range(0, rows, step):
            chunk = projections[start : start + step].to(accumulate)
            for j, t in enumerate(knots):
                angle = chunk * t
                sums[start : start + step, 0, j] = angle.cos().sum(-1)
                sums[start : start + step, 1, j] = angle.sin_().sum(-1)
        ctx.knots, ctx.accumulate = knots, accumulate
        ctx.save_for_backward(projections)
        return sums

    @staticmethod
    @num.first_order_only
    def backward(ctx, grad_sums):
        (projections,) = ctx.saved_tensors
        rows, n = projections.shape
        grad = torch.empty((rows, n), dtype=projections.dtype, device=projections.device)
        step = max(1, num.TEMPORARY_ELEMENTS // max(1, n))
        for start in range(0, rows, step):
            chunk = projections[start : start + step].to(ctx.accumulate)
            acc = torch.zeros_like(chunk)
            for j, t in enumerate(ctx.knots):
                angle = chunk * t
                g_cos = grad_sums[start : start + step, 0, j].unsqueeze(-1) * t
                g_sin = grad_sums[start : start + step, 1, j].unsqueeze(-1) * t
                # d/dp [g_c cos(t p) + g_s sin(t p)] = t (g_s cos(t p) - g_c sin(t p))
                acc.addcmul_(angle.cos(), g_sin).addcmul_(angle.sin_(), g_cos, value=-1.0)
            grad[start : start + step] = acc
        return grad, None, None


def sigreg_loss(
    x: torch.Tensor,
    directions: torch.Tensor,
    *,
    t_max: float = 3.0,
    num_knots: int = 17,
    sync: bool = False,
    group=None,
    projection_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """LeJEPA SIGReg (Sketched Isotropic Gaussian Regularisation): mean over views and slices of the
    Epps-Pulley statistic of ``x @ W``.

    ``T = N * sum_j w_j |ECF(t_j) - exp(-t_j^2 / 2)|^2`` per slice (see :func:`epps_pulley_grid`), on the
    raw (un-standardised) embeddings.

    Args:
        x: ``(..., N, D)`` embeddings.
        directions: ``(D, K)`` unit directions, identical on every rank when ``sync``.
        sync: when a process group is initialised, all-reduce the characteristic-function sums (and N)
            so every rank evaluates the statistic of the global batch; no gather is needed. Gradients
            follow the convention of :mod:`visreg_hub.losses.distributed`.
        group: process group for ``sync``.
        projection_dtype: dtype of the projection matmul (default: autocast dtype, else ``x.dtype``).

    Shape:
        ``x``: ``(..., N, D)``; ``directions``: ``(D, K)``. Returns a 0-d float32 tensor (float64 for
        float64 ``x``).
    """
    if x.dim() < 2 or x.shape[-2] < 1 or not x.is_floating_point():
        raise UserInputError(
            f"x must be a floating (..., N, D) tensor with N >= 1, got {tuple(x.shape)} {x.dtype}"
        )
    num.check_directions(x, directions)
    check_grid(t_max, num_knots)
    accumulate = num.accumulation_dtype(x.dtype)
    compute = num.resolve_projection_dtype(x, projection_dtype)
    n = x.shape[-2]
    with num.autocast_off(x.device.type):
        projections = torch.matmul(directions.t().to(compute), x.to(compute).transpose(-1, -2))
    leading = projections.shape[:-1]  # (..., K)
    _, phi, weights = _cached_grid(float(t_max), num_knots, str(x.device), accumulate)  # read-only here
    knot_values = tuple(torch.linspace(0.0, t_max, num_knots, dtype=torch.float64).tolist())
    sums = _CharacteristicSums.apply(projections.reshape(-1, n), knot_values, accumulate)
    sums = sums.reshape(*leading, 2, num_knots)
    if sync:
        # one differentiable all-reduce carries the sums and the sample count (batches may differ in size)
        count = sums.new_full((1,), float(n))
        reduced = all_reduce_sum(torch.cat([sums.reshape(-1), count]), group)
        sums, count = reduced[:-1].reshape(sums.shape), reduced[-1].detach()
    else:
        count = float(n)
    ecf = sums / count
    error = (ecf[..., 0, :] - phi).square() + ecf[..., 1, :].square()
    return (count * (error @ weights)).mean()
