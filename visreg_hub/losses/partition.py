"""``slice_mode="partition"`` across M ranks without gathering the embeddings.

The sliced distance of the whole batch (all ranks' samples) on K directions splits exactly into K/M-slice
blocks, one per rank (:func:`~visreg_hub.losses.slices.partition_slices`). Gathering the batch and letting
every rank standardise it, project it and send back a full-size gradient costs every rank O(V N D) work
and traffic that does not shrink with M. Here every step shrinks with M:

1. moments: each rank sums its own shard and the sums are all-reduced
   (:func:`~visreg_hub.losses.functional.batch_moments` with ``sync=True``);
2. each rank standardises its own ``n_r`` samples and projects them on all K directions,
   ``(K, V, n_r)``: ``V n_r D K`` multiply-adds, 1/M of the single-process projection;
3. one all-to-all (:func:`~visreg_hub.losses.distributed.exchange_slices`) hands rank r every sample on
   its own K_r slices, ``(K_r, V, N)``, which it sorts and compares with the quantiles;
4. backward: the residuals go back with the mirror all-to-all, and each rank multiplies only its own
   samples' residuals by ``W^T``.

Traffic per rank is ``V N K / M`` projection values each way instead of ``V N D`` embeddings plus a
``V N D`` gradient all-reduce. The value returned is this rank's share of the mean, times M (the gradient
convention of :mod:`visreg_hub.losses.distributed`: summed over ranks, the gradients on every rank's
samples are M times the single-process gradient, which DDP's averaging turns into the exact one).
"""

from __future__ import annotations

import torch

from visreg_hub.errors import UserInputError

from . import _numerics as num
from .distributed import exchange_slices, world_info
from .slices import partition_slices
from .sort_shape import projected_quantile_sum

__all__ = ["partitioned_quantile_distance"]


def partitioned_quantile_distance(
    z: torch.Tensor,
    directions: torch.Tensor,
    *,
    mean: torch.Tensor | None = None,
    inv_std: torch.Tensor | None = None,
    projection_dtype: torch.dtype | None = None,
    group=None,
) -> torch.Tensor:
    """M times this rank's share of ``mean over (v, i, k) of (sort_n(z_hat @ W)_i - t_i)^2`` over the batch
    concatenated from all ranks, ``z_hat = (z - mean) * inv_std`` (or ``z`` itself without moments).

    Summing the returned values over ranks and dividing by M gives the single-process value on the
    concatenated batch with all K directions.

    Args:
        z: this rank's embeddings.
        directions: all K directions, identical on every rank.
        mean: global batch means (differentiable), or None for plain SWD.
        inv_std: global inverse stds, treated as constants (stop-gradient); required with ``mean``.
        projection_dtype: dtype of the projection matmul and of the exchanged values (default: autocast
            dtype, else ``z.dtype``).
        group: process group (default: the world).

    Shape:
        ``z``: ``(V, n_r, D)``; ``directions``: ``(D, K)``; ``mean``, ``inv_std``: ``(V, D)``. Returns a
        0-d float32 tensor (float64 for float64 ``z``).
    """
    num.check_samples(z)
    num.check_directions(z, directions)
    if (mean is None) != (inv_std is None):
        raise UserInputError("mean and inv_std must be given together")
    world_size, _ = world_info(group)
    views, samples, dim = z.shape
    num_slices = directions.shape[1]
    compute = num.resolve_projection_dtype(z, projection_dtype)
    accumulate = num.accumulation_dtype(z.dtype)
    with num.autocast_off(z.device.type):
        if mean is None:
            standardised = z.to(compute)
        else:
            scale = inv_std.detach().unsqueeze(-2)
            # computed in float32 (the dtype of mean and scale), then rounded once to the projection dtype
            standardised = torch.addcmul(-(mean.unsqueeze(-2) * scale), z, scale).to(compute)
        flat = standardised.reshape(views * samples, dim)
        local = torch.matmul(directions.t().to(compute), flat.t()).view(num_slices, views, samples)
    counts = [
        stop - start
        for start, stop in (partition_slices(num_slices, world_size, r) for r in range(world_size))
    ]
    mine = exchange_slices(local, counts, group)  # (K_r, V, N)
    total_samples = mine.shape[-1]
    squared = projected_quantile_sum(mine.reshape(-1, total_samples), accumulate)
    return squared * (world_size / (views * total_samples * num_slices))
