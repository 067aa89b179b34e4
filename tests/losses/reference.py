"""Plain-autograd transcriptions of the sliced terms (sort along N, differentiate through the sort).

Slow and memory hungry; they are executable definitions the fast kernels are tested against, so they live
with the tests, not in the public ``visreg_hub.losses`` namespace.
"""

from __future__ import annotations

from visreg_hub.losses import gaussian_quantiles


def sliced_quantile_distance_reference(x, directions, *, mean=None, std=None):
    """``mean over (..., i, k) of (sort_n(((x - mean) / stopgrad(std)) @ W)_i - t_i)^2``.

    Shape: ``x`` ``(..., N, D)``, ``directions`` ``(D, K)``, ``mean`` and ``std`` ``(..., D)``.
    """
    if mean is not None:
        x = (x - mean.unsqueeze(-2)) / std.detach().unsqueeze(-2)
    projections = x @ directions.to(x.dtype)
    sorted_projections = projections.sort(dim=-2).values
    quantiles = gaussian_quantiles(x.shape[-2], x.device, x.dtype).unsqueeze(-1)
    return (sorted_projections - quantiles).square().mean()


def shape_loss_reference(z, directions):
    """VISReg shape term with plain autograd: standardise by the biased std, then the sliced distance."""
    return sliced_quantile_distance_reference(
        z, directions, mean=z.mean(dim=-2), std=z.std(dim=-2, correction=0)
    )


def sliced_wasserstein_loss_reference(x, directions):
    """Plain SWD to N(0, 1) with plain autograd."""
    return sliced_quantile_distance_reference(x, directions)
