"""Fast sliced 2-Wasserstein distance to the N(0, 1) quantiles: the sort-bound core of VISReg and SWD.

The quantity, for samples ``x`` of shape ``(..., N, D)`` and unit directions ``W`` of shape ``(D, K)``::

    p = x @ W                                  # (..., N, K) projections
    loss = mean over (..., i, k) of (sort_n(p)[i, k] - t_i)^2,   t_i = Phi^-1(i / (N + 1)), i = 1..N

Why a custom autograd function. Sorting is the cost (REFERENCE.md: the projection matmul is a fraction of
the sort). The gradient with respect to the *unsorted* projections is ``2 (p - t_rank(p)) / numel``, where
``rank(p)`` is p's position in its sorted slice, so the backward needs no differentiable sort, no gather
and no saved indices. The forward here:

1. computes projections in a ``(..., K, N)`` layout (``W^T x^T``), so the sort runs along a contiguous
   last axis, which is about twice as fast on a GPU as sorting along N in a ``(..., N, K)`` layout;
2. sorts once (values and indices), forms the residual ``sort(p) - t`` in float32 (float64 for float64
   inputs), accumulates its squared sum, and scatters the residual back to unsorted order;
3. keeps only that residual (in the projection dtype) for the backward, which is then one matmul:
   ``grad_x = residual^T W * 2 / numel``.

With ``sort_backend="triton"`` (opt-in, CUDA only) step 2 runs as one Triton kernel per chunk
(:mod:`._triton_sort`): rows are sorted as packed (value, index) keys, so no int64 index tensor is written
and read back, and residual, scatter and the sum of squares happen in the same pass. The kernel has so far
been checked only in Triton's CPU interpreter, never compiled or timed on a GPU, so ``"auto"`` (the default)
uses ``torch.sort`` everywhere until a GPU benchmark shows the kernel is correct and faster; both give the
same residuals.

Work is done in chunks of leading rows, so the int64 sort indices and float32 temporaries exist for one
chunk at a time; optional standardisation ``(x - mean) * inv_std`` is applied per chunk, so the
standardised embeddings are never materialised in full either.

Mixed precision. Under autocast (or with bf16/fp16 inputs) the projection matmul runs in that low
precision dtype, as every other matmul of the step does. Its output is therefore rounded to bf16; sorting
those values is exactly sorting their float32 upcast (rounding is monotone), and the comparison with the
quantiles and the loss accumulation are done in float32 against float32 quantiles, so no precision is lost
beyond the projection's own rounding. Pass ``projection_dtype=torch.float32`` to project in float32 (TF32 on
Ampere+ if enabled) when the slices themselves must be float32-accurate.
"""

from __future__ import annotations

import contextlib

import torch

from . import _triton_sort

__all__ = [
    "gaussian_quantiles",
    "resolve_projection_dtype",
    "sliced_quantile_distance",
    "sliced_quantile_distance_reference",
]

SORT_BACKENDS: tuple[str, ...] = ("auto", "torch", "triton")

# Elements of one (rows, K, N) projection chunk: bounds the int64 sort indices and float32 temporaries.
_CHUNK_ELEMENTS = 1 << 24


_QUANTILE_CACHE: dict[tuple[int, str, torch.dtype], torch.Tensor] = {}


def _cached_quantiles(n: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    # a plain dict rather than functools.lru_cache, which torch.compile warns about
    key = (n, device, dtype)
    cached = _QUANTILE_CACHE.get(key)
    if cached is None:
        if len(_QUANTILE_CACHE) >= 64:
            _QUANTILE_CACHE.clear()
        levels = torch.arange(1, n + 1, dtype=torch.float64) / (n + 1)
        cached = _QUANTILE_CACHE[key] = torch.special.ndtri(levels).to(device=device, dtype=dtype)
    return cached


def gaussian_quantiles(
    n: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``t_i = Phi^-1(i / (n + 1))`` for ``i = 1..n``: the N(0, 1) quantiles a sorted slice is matched to.

    Computed in float64 and cast to ``dtype``; cached per ``(n, device, dtype)``, so treat the result as
    read-only.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    device = torch.device("cpu") if device is None else torch.device(device)
    return _cached_quantiles(n, str(device), dtype)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def resolve_projection_dtype(x: torch.Tensor, projection_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype the projection matmul runs in: explicit, else the active autocast dtype, else x's."""
    if projection_dtype is not None:
        return projection_dtype
    device_type = x.device.type
    if x.dtype == torch.float32 and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _autocast_off(device_type: str):
    # Inside the function every dtype is chosen explicitly; autocast would silently re-cast the matmuls.
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _standardised(x, mean, inv_std, start, stop, compute):
    """Rows ``start:stop`` of ``(x - mean) * inv_std`` in the projection dtype, in one fused kernel."""
    rows = x[start:stop]
    if mean is None:
        return rows.to(compute)
    scale = inv_std[start:stop].unsqueeze(-2)
    shift = -(mean[start:stop].unsqueeze(-2) * scale)
    out = torch.empty(rows.shape, dtype=compute, device=rows.device)
    return torch.addcmul(shift, rows, scale, out=out)  # computed in float32, stored in `compute`


def _resolve_backend(sort_backend: str, device: torch.device) -> bool:
    if sort_backend not in SORT_BACKENDS:
        raise ValueError(f"sort_backend must be one of {SORT_BACKENDS}, got {sort_backend!r}")
    if sort_backend == "triton" and (_triton_sort.triton is None or device.type != "cuda"):
        raise ValueError("sort_backend='triton' needs the triton package and CUDA tensors; use 'auto'")
    # "auto" means torch.sort until the Triton kernel has been verified and timed on a real GPU.
    return sort_backend == "triton"


class _SlicedQuantileDistance(torch.autograd.Function):
    """Forward: mean squared distance of sorted projections to the Gaussian quantiles. See module doc."""

    @staticmethod
    def forward(ctx, x, mean, inv_std, directions, compute_dtype, use_triton):
        rows, n, _ = x.shape
        num_slices = directions.shape[1]
        accumulate = _accumulation_dtype(x.dtype)
        with _autocast_off(x.device.type):
            quantiles = gaussian_quantiles(n, x.device, accumulate)
            w_t = directions.t().to(compute_dtype)  # (K, D)
            residual = torch.empty((rows, num_slices, n), dtype=compute_dtype, device=x.device)
            squared = torch.zeros((), dtype=accumulate, device=x.device)
            step = max(1, _CHUNK_ELEMENTS // max(1, num_slices * n))
            for start in range(0, rows, step):
                stop = min(rows, start + step)
                hat = _standardised(x, mean, inv_std, start, stop, compute_dtype)
                projections = torch.matmul(w_t, hat.transpose(-1, -2))  # (b, K, N): sort on the last axis
                del hat
                block = residual[start:stop]
                row_squares = None
                if use_triton and _triton_sort.usable(projections):
                    row_squares = _triton_sort.try_launch(
                        projections.view(-1, n), quantiles, block.view(-1, n)
                    )
                if row_squares is not None:
                    squared = squared + row_squares.sum(dtype=accumulate)
                    continue
                values, order = torch.sort(projections, dim=-1, stable=True)  # ties by index, as Triton
                del projections
                sorted_residual = values.to(accumulate).sub_(quantiles)
                del values
                block.scatter_(-1, order, sorted_residual.to(compute_dtype))
                del order
                # torch.sum reduces pairwise (relative error ~1e-8 in float32 over 16M terms); a float32
                # torch.dot over the same chunk drifted by ~2e-4 on the CPU (benchmarks/losses.py agreement).
                squared = squared + sorted_residual.square().sum()
        ctx.compute_dtype = compute_dtype
        ctx.x_dtype = x.dtype
        ctx.numel = rows * num_slices * n
        ctx.chunk_rows = step
        keep_inputs = ctx.needs_input_grad[3]  # x is only needed again for the gradient of the directions
        ctx.save_for_backward(
            residual, directions, inv_std, x if keep_inputs else None, mean if keep_inputs else None
        )
        return squared / ctx.numel

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        residual, directions, inv_std, x_saved, mean_saved = ctx.saved_tensors
        rows, _, n = residual.shape
        accumulate = _accumulation_dtype(grad_output.dtype)
        scale = grad_output.to(accumulate) * (2.0 / ctx.numel)
        need_x, need_mean, _, need_directions, _, _ = ctx.needs_input_grad
        grad_x = grad_mean = grad_directions = None
        with _autocast_off(residual.device.type):
            w_t = directions.t().to(ctx.compute_dtype)
            if need_x or need_mean:
                dim = directions.shape[0]
                grad_x = torch.empty((rows, n, dim), dtype=ctx.x_dtype, device=residual.device)
                if need_mean:
                    grad_mean = torch.empty((rows, dim), dtype=accumulate, device=residual.device)
                for start in range(0, rows, ctx.chunk_rows):
                    stop = min(rows, start + ctx.chunk_rows)
                    chunk = torch.matmul(residual[start:stop].transpose(-1, -2), w_t)  # (b, N, D)
                    factor = scale if inv_std is None else scale * inv_std[start:stop].unsqueeze(-2)
                    torch.mul(chunk, factor, out=grad_x[start:stop])  # float32 product, stored in x's dtype
                    if need_mean:
                        # d/d mean of (x - mean) * inv_std is minus the summed gradient of x
                        summed = chunk.sum(dim=-2, dtype=accumulate).unsqueeze(-2) * factor
                        grad_mean[start:stop] = -summed.squeeze(-2)
            if need_directions:
                grad_directions = torch.zeros(directions.shape, dtype=accumulate, device=residual.device)
                for start in range(0, rows, ctx.chunk_rows):
                    stop = min(rows, start + ctx.chunk_rows)
                    hat = _standardised(x_saved, mean_saved, inv_std, start, stop, ctx.compute_dtype)
                    # (b, D, N) @ (b, N, K) summed over the chunk's rows
                    product = torch.matmul(hat.transpose(-1, -2), residual[start:stop].transpose(-1, -2))
                    grad_directions += product.to(accumulate).sum(0)
                grad_directions = (grad_directions * scale).to(directions.dtype)
        return grad_x, grad_mean, None, grad_directions, None, None


def _check_directions(x: torch.Tensor, directions: torch.Tensor) -> None:
    if directions.dim() != 2 or directions.shape[0] != x.shape[-1]:
        raise ValueError(
            f"directions must have shape (D, K) = ({x.shape[-1]}, K) for embeddings of shape "
            f"{tuple(x.shape)}, got {tuple(directions.shape)}"
        )


def sliced_quantile_distance(
    x: torch.Tensor,
    directions: torch.Tensor,
    *,
    mean: torch.Tensor | None = None,
    inv_std: torch.Tensor | None = None,
    projection_dtype: torch.dtype | None = None,
    sort_backend: str = "auto",
) -> torch.Tensor:
    """Mean over ``(..., i, k)`` of ``(sort_n((x - mean) * inv_std) @ W)[i, k] - t_i)^2`` (fast path).

    Args:
        x: samples ``(..., N, D)`` (N >= 1, any float dtype).
        directions: ``(D, K)`` slice directions, used as given (unit columns expected).
        mean: optional ``(..., D)`` subtracted per row before projecting; receives a gradient.
        inv_std: optional ``(..., D)`` multiplier applied after centring; treated as a constant
            (stop-gradient), which is what VISReg's shape term prescribes. Requires ``mean``.
        projection_dtype: dtype of the projection matmul; default :func:`resolve_projection_dtype`.
        sort_backend: ``"auto"`` (currently ``torch.sort``), ``"torch"``, or ``"triton"`` (opt-in CUDA
            kernel of :mod:`._triton_sort`, verified only in Triton's CPU interpreter so far).

    Returns:
        0-d tensor in float32 (float64 for float64 ``x``).
    """
    if x.dim() < 2:
        raise ValueError(f"x must have shape (..., N, D), got {tuple(x.shape)}")
    _check_directions(x, directions)
    if (mean is None) != (inv_std is None):
        raise ValueError("mean and inv_std must be given together")
    compute = resolve_projection_dtype(x, projection_dtype)
    n, dim = x.shape[-2:]
    flat = x.reshape(-1, n, dim)
    if mean is not None:
        mean = mean.reshape(-1, dim)
        inv_std = inv_std.detach().reshape(-1, dim)
    use_triton = _resolve_backend(sort_backend, x.device)
    return _SlicedQuantileDistance.apply(flat, mean, inv_std, directions, compute, use_triton)


def sliced_quantile_distance_reference(
    x: torch.Tensor,
    directions: torch.Tensor,
    *,
    mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-autograd transcription of the same quantity (sort along N, differentiate through sort).

    Slow and memory hungry; kept for tests and as an executable definition. ``std`` is detached.
    """
    _check_directions(x, directions)
    if mean is not None:
        x = (x - mean.unsqueeze(-2)) / std.detach().unsqueeze(-2)
    projections = x @ directions.to(x.dtype)
    sorted_projections = projections.sort(dim=-2).values
    quantiles = gaussian_quantiles(x.shape[-2], x.device, x.dtype).unsqueeze(-1)
    return (sorted_projections - quantiles).square().mean()
