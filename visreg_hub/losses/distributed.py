"""Autograd-correct collectives for the losses (gloo and NCCL).

Gradient convention. Under data parallelism (DDP, accelerate) every rank back-propagates its own loss
and the parameter gradients are then *averaged* over the M ranks. For a loss that mixes samples of
several ranks to train exactly like one process on the concatenated batch, the gradient that lands on
rank r's inputs must be ``M`` times the single-process gradient of those inputs, i.e. the sum over ranks
of what every rank's loss sends back to them. Both collectives here implement that sum:

* :func:`gather_batch`: forward concatenates every rank's block along the batch axis; backward
  all-reduces (sums) the *full* gradient of the gathered tensor and returns this rank's block.
* :func:`all_reduce_sum`: forward sums a tensor over ranks; backward sums the gradients over ranks.
* :func:`exchange_slices`: forward turns "my samples on every slice" into "every sample on my slices"
  (one all-to-all); backward sends each rank the gradient of its samples from every rank's slices, so
  the sum over ranks of the gradients again lands on the rank that owns the samples.

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

from visreg_hub.errors import UserInputError

__all__ = ["all_reduce_sum", "batch_sizes", "exchange_slices", "gather_batch", "world_info"]


def world_info(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """``(world_size, rank)`` of ``group``, or ``(1, 0)`` when no process group is initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def batch_sizes(local_size: int, device: torch.device, world_size: int, group) -> list[int]:
    """Every rank's batch size, in rank order (one small all-gather)."""
    size = torch.tensor([local_size], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(size) for _ in range(world_size)]
    dist.all_gather(sizes, size, group=group)
    return [int(s.item()) for s in sizes]


class _GatherBatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group, world_size: int, rank: int) -> torch.Tensor:
        leading = x.movedim(dim, 0).contiguous()  # batch axis first: every collective sees contiguous rows
        sizes = batch_sizes(leading.shape[0], leading.device, world_size, group)
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


class _ExchangeSlices(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local, slice_counts, sample_counts, rank, group):
        _, views, mine = local.shape
        my_slices = slice_counts[rank]
        send = [count * views * mine for count in slice_counts]
        receive = [my_slices * views * count for count in sample_counts]
        out = local.new_empty(sum(receive))
        dist.all_to_all_single(out, local.contiguous().view(-1), receive, send, group=group)
        blocks = [
            block.view(my_slices, views, count) for block, count in zip(out.split(receive), sample_counts)
        ]
        ctx.meta = (slice_counts, sample_counts, rank, group)
        return torch.cat(blocks, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        slice_counts, sample_counts, rank, group = ctx.meta
        my_slices, views, _ = grad.shape
        mine = sample_counts[rank]
        send = torch.cat([block.contiguous().view(-1) for block in grad.split(sample_counts, dim=-1)])
        send_sizes = [my_slices * views * count for count in sample_counts]
        receive_sizes = [count * views * mine for count in slice_counts]
        out = grad.new_empty(sum(receive_sizes))
        dist.all_to_all_single(out, send, receive_sizes, send_sizes, group=group)
        # blocks arrive in rank order, i.e. in slice order: together they are (K, V, n_mine)
        return out.view(sum(slice_counts), views, mine), None, None, None, None


def exchange_slices(
    local: torch.Tensor, slice_counts: list[int], group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Redistribute projections from "this rank's samples on all K slices" to "all samples on this rank's
    slices", with correct gradients (one all-to-all each way, no gather of the embeddings).

    Args:
        local: this rank's projections, slices first.
        slice_counts: how many of the K slices each rank owns, in rank order (contiguous blocks, e.g. from
            :func:`~visreg_hub.losses.slices.partition_slices`); they sum to K.
        group: process group (default: the world).

    Shape:
        ``local``: ``(K, V, n_r)`` with this rank's ``n_r`` samples. Returns ``(K_r, V, N)``: this rank's
        ``K_r`` slices of all ``N = sum_r n_r`` samples, sample blocks in rank order.
    """
    world_size, rank = world_info(group)
    if world_size == 1:
        return local
    if len(slice_counts) != world_size or sum(slice_counts) != local.shape[0]:
        raise UserInputError(
            f"slice_counts {slice_counts} must give one count per rank summing to {local.shape[0]}"
        )
    sizes = batch_sizes(local.shape[-1], local.device, world_size, group)
    return _ExchangeSlices.apply(local, list(slice_counts), sizes, rank, group)
