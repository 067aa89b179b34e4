"""Fast sliced 2-Wasserstein distance to the N(0, 1) quantiles: the sort-bound core of VISReg and SWD.

The quantity, for samples ``x`` of shape ``(..., N, D)`` and unit directions ``W`` of shape ``(D, K)``::

    p = x @ W                                  # (..., N, K) projections
    loss = mean over (..., i, k) of (sort_n(p)[i, k] - t_i)^2,   t_i = Phi^-1(i / (N + 1)), i = 1..N

Why a custom autograd function. Sorting is the cost (docs/reference.md: the projection matmul is a fraction of
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

Work is done in chunks of leading rows (and of slices, when one row's ``K x N`` projections are more than
a chunk), so the int64 sort indices and float32 temporaries exist for one chunk at a time; optional
standardisation ``(x - mean) * inv_std`` is applied per chunk, so the standardised embeddings are never
materialised in full either. Chunks are small on purpose (16 MiB of float32, sorts of 16 MiB of int64
indices): glibc's malloc serves blocks up to 32 MiB from its heap and reuses them, while every larger one
is a fresh ``mmap`` whose pages fault on first touch; measured on the CPU, a fresh 64 MiB tensor cost 10x
the time of filling a reused one, and at V8 N2048 D2048 K2048 (fp32, one thread) the step took 5.65 s
of CPU time with 64 MiB chunks and 5.23 s with these (docs/benchmarks.md).

Mixed precision. Under autocast (or with bf16/fp16 inputs) the projection matmul runs in that low
precision dtype, as every other matmul of the step does. Its output is therefore rounded to bf16; sorting
those values is exactly sorting their float32 upcast (rounding is monotone), and the comparison with the
quantiles and the loss accumulation are done in float32 against float32 quantiles, so no precision is lost
beyond the projection's own rounding. That rounding is small for the value (within about 2 % of float64)
but not for the gradient: a projection's residual ``sorted - quantile`` is a difference of two numbers of
similar size, and bf16's 8-bit mantissa leaves the shape gradient 8-28 % (relative norm) from float64,
against 0.2 % in float32 (measured at V 4, N 64-257, D 64). Like any bf16 step it is a noisier gradient,
not a biased one; pass ``projection_dtype=torch.float32`` to project in float32 (TF32 on Ampere+ if
enabled) when the slices themselves must be float32-accurate.
"""

from __future__ import annotations

import torch

from visreg_hub.errors import UserInputError

from . import _numerics as num
from . import _triton_sort
from ._numerics import cached_quantiles, resolve_projection_dtype

__all__ = ["resolve_projection_dtype", "sliced_quantile_distance"]

SORT_BACKENDS: tuple[str, ...] = ("auto", "torch", "triton")

# Elements of one (rows, K, N) projection chunk (read at call time, so tests can shrink it): 16 MiB of
# float32, reused from malloc's heap (see the module docstring).
_CHUNK_ELEMENTS = num.TEMPORARY_ELEMENTS
# Elements of one torch.sort call: its int64 indices stay at 16 MiB, under glibc's 32 MiB mmap threshold.
_SORT_BLOCK_ELEMENTS = num.TEMPORARY_ELEMENTS // 2


def _standardised(x, mean, inv_std, start, stop, compute):
    """Rows ``start:stop`` of ``(x - mean) * inv_std`` in the projection dtype, in one fused kernel."""
    rows = x[start:stop]
    if mean is None:
        return rows.to(compute)
    scale = inv_std[start:stop].unsqueeze(-2)
    shift = -(mean[start:stop].unsqueeze(-2) * scale)
    out = torch.empty(rows.shape, dtype=compute, device=rows.device)
    return torch.addcmul(shift, rows, scale, out=out)  # computed in float32, stored in `compute`


def check_sort_backend(sort_backend: str) -> str:
    """``sort_backend`` if it is one of :data:`SORT_BACKENDS`, else a ValueError naming them."""
    if sort_backend not in SORT_BACKENDS:
        raise UserInputError(f"sort_backend must be one of {SORT_BACKENDS}, got {sort_backend!r}")
    return sort_backend


def _resolve_backend(sort_backend: str, device: torch.device) -> bool:
    check_sort_backend(sort_backend)
    if sort_backend == "triton" and (_triton_sort.triton is None or device.type != "cuda"):
        raise UserInputError("sort_backend='triton' needs the triton package and CUDA tensors; use 'auto'")
    # "auto" means torch.sort until the Triton kernel has been verified and timed on a real GPU.
    return sort_backend == "triton"


def _residual_into(projections: torch.Tensor, quantiles: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Sort ``projections`` ``(..., N)`` along N, write ``sort(p) - t`` back in unsorted order into ``out``
    (same shape, contiguous, projection dtype) and return the sum of squared residuals in the quantiles'
    dtype. Sorts ``_SORT_BLOCK_ELEMENTS`` at a time, so the int64 indices stay small (module docstring)."""
    n = projections.shape[-1]
    rows, targets = projections.reshape(-1, n), out.view(-1, n)
    step = max(1, _SORT_BLOCK_ELEMENTS // max(1, n))
    total = None
    for start in range(0, rows.shape[0], step):
        values, order = torch.sort(
            rows[start : start + step], dim=-1, stable=True
        )  # ties by index, as Triton
        # in place when the values already have the quantiles' dtype; else promoted to it in the same pass
        residual = values.sub_(quantiles) if values.dtype == quantiles.dtype else torch.sub(values, quantiles)
        del values
        targets[start : start + step].scatter_(-1, order, residual.to(out.dtype))
        del order
        # torch.sum reduces pairwise (relative error ~1e-8 in float32 over 16M terms); a float32 torch.dot
        # over the same chunk drifted by ~2e-4 on the CPU (benchmarks/losses.py agreement).
        part = residual.square_().sum()
        total = part if total is None else total + part
    return total


class _ProjectedQuantileDistance(torch.autograd.Function):
    """``sum over rows, i of (sort_n(p)_i - t_i)^2`` for given projections ``p`` ``(rows, N)``.

    The partitioned path (:mod:`.partition`) projects before it exchanges slices, so the sort stage gets
    projections rather than samples; the backward is the residual, ``2 (p - t_rank(p))``, times the
    upstream gradient.
    """

    @staticmethod
    def forward(ctx, projections, accumulate):
        rows, n = projections.shape
        quantiles = cached_quantiles(n, projections.device, accumulate)
        residual = torch.empty_like(projections)
        squared = projections.new_zeros((), dtype=accumulate)
        step = max(1, _CHUNK_ELEMENTS // max(1, n))
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            squared = squared + _residual_into(projections[start:stop], quantiles, residual[start:stop])
        ctx.save_for_backward(residual)
        return squared

    @staticmethod
    @num.first_order_only
    def backward(ctx, grad):
        (residual,) = ctx.saved_tensors
        return residual * (2.0 * grad).to(residual.dtype), None


def projected_quantile_sum(projections: torch.Tensor, accumulate: torch.dtype) -> torch.Tensor:
    """Sum over rows of the squared distance of each sorted row to the N(0, 1) quantiles.

    Shape:
        ``projections``: ``(rows, N)``, any float dtype. Returns a 0-d tensor in ``accumulate``.
    """
    return _ProjectedQuantileDistance.apply(projections, accumulate)


class _SlicedQuantileDistance(torch.autograd.Function):
    """Forward: mean squared distance of sorted projections to the Gaussian quantiles. See module doc."""

    @staticmethod
    def forward(ctx, x, mean, inv_std, directions, compute_dtype, use_triton):
        rows, n, _ = x.shape
        num_slices = directions.shape[1]
        accumulate = num.accumulation_dtype(x.dtype)
        with num.autocast_off(x.device.type):
            quantiles = cached_quantiles(n, x.device, accumulate)
            w_t = directions.t().to(compute_dtype)  # (K, D)
            residual = torch.empty((rows, num_slices, n), dtype=compute_dtype, device=x.device)
            squared = torch.zeros((), dtype=accumulate, device=x.device)
            step = max(1, _CHUNK_ELEMENTS // max(1, n * max(num_slices, x.shape[-1])))
            # one row's K x N projections in blocks of slices when they alone exceed a chunk (step is then 1)
            slices = num_slices if step > 1 else max(1, min(num_slices, _CHUNK_ELEMENTS // max(1, n)))
            for start in range(0, rows, step):
                stop = min(rows, start + step)
                hat = _standardised(x, mean, inv_std, start, stop, compute_dtype).transpose(-1, -2)
                for first in range(0, num_slices, slices):
                    last = min(num_slices, first + slices)
                    # (b, k, N): sort on the last axis. One row as a 2-D mm: bf16 matmul of a 2-D by a
                    # transposed 3-D operand took 72 ms where mm took 38 (one thread, 2048^3; same in fp32)
                    if stop - start == 1:
                        projections = torch.mm(w_t[first:last], hat[0]).unsqueeze(0)
                    else:
                        projections = torch.matmul(w_t[first:last], hat)
                    block = residual[start:stop, first:last]  # contiguous: whole rows, or one row's slices
                    row_squares = None
                    if use_triton and _triton_sort.usable(projections):
                        row_squares = _triton_sort.try_launch(
                            projections.view(-1, n), quantiles, block.view(-1, n)
                        )
                    if row_squares is not None:
                        squared = squared + row_squares.sum(dtype=accumulate)
                    else:
                        squared = squared + _residual_into(projections, quantiles, block)
                    del projections
                del hat
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
    @num.first_order_only
    def backward(ctx, grad_output):
        residual, directions, inv_std, x_saved, mean_saved = ctx.saved_tensors
        rows, _, n = residual.shape
        accumulate = num.accumulation_dtype(grad_output.dtype)
        scale = grad_output.to(accumulate) * (2.0 / ctx.numel)
        need_x, need_mean, _, need_directions, _, _ = ctx.needs_input_grad
        grad_x = grad_mean = grad_directions = None
        with num.autocast_off(residual.device.type):
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

    Shape:
        ``x``: ``(..., N, D)``; ``directions``: ``(D, K)``; ``mean``, ``inv_std``: ``(..., D)``. Returns a
        0-d tensor in float32 (float64 for float64 ``x``).
    """
    if x.dim() < 2:
        raise UserInputError(f"x must have shape (..., N, D), got {tuple(x.shape)}")
    num.check_directions(x, directions)
    if (mean is None) != (inv_std is None):
        raise UserInputError("mean and inv_std must be given together")
    compute = resolve_projection_dtype(x, projection_dtype)
    n, dim = x.shape[-2:]
    flat = x.reshape(-1, n, dim)
    if mean is not None:
        rows = x.shape[:-2] + x.shape[-1:]  # one (D,) row per stack of N samples
        mean = num.moments_like(mean, rows, "mean").reshape(-1, dim)
        inv_std = num.moments_like(inv_std.detach(), rows, "inv_std").reshape(-1, dim)
    use_triton = _resolve_backend(sort_backend, x.device)
    return _SlicedQuantileDistance.apply(flat, mean, inv_std, directions, compute, use_triton)
