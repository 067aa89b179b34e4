"""Autograd-correct collectives for the losses (gloo and NCCL).

Gradient convention. Under data parallelism (DDP, accelerate) every rank back-propagates its own loss
and the parameter gradients are then *averaged* over the M ranks. For a loss that mixes samples of
several ranks to train exactly like one process on the concatenated batch, the gradient that lands on
rank r's inputs must be ``M`` times the single-process gradient of those inputs, i.e. the sum over ranks
of what every rank's loss sends back to them. Both collectives here implement that sum:

* :func:`gather_batch`: forward concatenates every rank's block along the batch axis; backward
  all-reduces (sums) the *full* gradient of the gathered tensor and returns this rank's block.
* :func:`all_reduce_sum`: forward sums a tensor over ranks; backward sums the gradients over ranks.

Pitfall avoided: ``torch.distributed.nn.functional.all_gather`` on gloo returns wrong gradients when the
upstream gradient is not contiguous (e.g. after gathering a transposed ``(N, V, D)`` view). Here every
collective runs on a contiguous tensor whose leading axis is the batch axis, in forward and backward.

Without an initialised process group (or with one rank) both functions return their input unchanged and
communicate nothing. Collectives are looked up on ``torch.distributed`` at call time (never bound at
import), so tests can patch them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_reduce_sum", "gather_batch", "world_info"]


def world_info(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """``(world_size, rank)`` of ``group``, or ``(1, 0)`` when no process group is initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _batch_sizes(local_size: int, device: torch.device, world_size: int, group) -> list[int]:
    size = torch.tensor([local_size], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(size) for _ in range(world_size)]
    dist.all_gather(sizes, size, group=group)
    return [int(s.item()) for s in sizes]


class _GatherBatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group, world_size: int, rank: int) -> torch.Tensor:
        leading = x.movedim(dim, 0).contiguous()  # batch axis first: every collective sees contiguous rows
        sizes = _batch_sizes(leading.shape[0], leading.device, world_size, group)
        largest = max(sizes)
        if leading.shape[0] < largest:  # gloo's all_gather needs equal shapes: pad, then trim
            padding = leading.new_zeros((largest - leading.shape[0], *leading.shape[1:]))
            padded = torch.cat([leading, padding])
        else:
            padded = leading
        blocks = [torch.empty_like(padded) for _ in range(world_size)]
        dist.all_gather(blocks, padded, group=group)
        gathered = torch.cat([block[:size] for block, size in zip(blocks, sizes)])
        ctx.dim, ctx.group, ctx.rank, ctx.sizes = dim, group, rank, sizes
        return gathered.movedim(0, dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        full = grad.movedim(ctx.dim, 0).contiguous()
        dist.all_reduce(full, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        mine = full[start : start + ctx.sizes[ctx.rank]]
        return mine.movedim(0, ctx.dim), None, None, None, None


def gather_batch(x: torch.Tensor, dim: int = -2, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Concatenate every rank's ``x`` along the batch axis ``dim``, with correct gradients.

    Args:
        x: this rank's tensor, e.g. projections ``(V, N_r, D)`` with the batch axis ``dim=-2``. Ranks may
            hold different batch sizes ``N_r``; all other axes must agree.
        dim: the batch axis.
        group: process group (default: the world).

    Returns:
        ``(V, sum_r N_r, D)`` on every rank, blocks in rank order. Backward sums the gradient over ranks
        and returns this rank's block (see the module docstring for why the sum is right).
    """
    world_size, rank = world_info(group)
    if world_size == 1:
        return x
    dim = dim % x.dim()
    return _GatherBatch.apply(x, dim, group, world_size, rank)


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        total = x.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        total = grad.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ctx.group)
        return total, None


def all_reduce_sum(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Differentiable sum of ``x`` over ranks (identity without a process group)."""
    if world_info(group)[0] == 1:
        return x
    return _AllReduceSum.apply(x, group)


def reduce_values(values: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Non-differentiable sum over ranks of a small tensor of loss values (a detached copy is reduced)."""
    total = values.detach().clone()
    if world_info(group)[0] > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total
