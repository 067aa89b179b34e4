"""Worker run by ``torch.multiprocessing.spawn`` in test_distributed.py: every check of one world size.

Each rank holds its own block of a batch that every rank can also rebuild in full (same seed), so it can
compare what the distributed loss gives on its block with a single-process computation on the
concatenated batch. Ranks hold unequal batch sizes (3 + rank) on purpose. Results (max abs errors and
flags) are saved per rank and asserted by the parent test. Everything runs in float64.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.distributed as dist

from visreg_hub.losses import (
    BarlowTwinsLoss,
    SIGRegLoss,
    SWDLoss,
    VICRegLoss,
    VISRegLoss,
    VISRegOutput,
    gather_batch,
    invariance_loss,
    shape_loss,
    sigreg_loss,
)
from visreg_hub.losses import functional as F

VIEWS_GLOBAL, VIEWS_LOCAL, DIM = 2, 2, 5
SEED, STEP = 11, 5
NUM_SLICES = 7  # divisible by neither 2 nor 4: blocks of 4+3 and 2+2+2+1


def batch_sizes(world_size: int) -> list[int]:
    return [3 + rank for rank in range(world_size)]


def full_batch(world_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The concatenated global and local projections every rank can rebuild."""
    generator = torch.Generator().manual_seed(seed)
    total = sum(batch_sizes(world_size))
    global_proj = 1.5 * torch.randn(VIEWS_GLOBAL, total, DIM, generator=generator, dtype=torch.float64) + 0.2
    local_proj = global_proj[:1] + 0.3 * torch.randn(
        VIEWS_LOCAL, total, DIM, generator=generator, dtype=torch.float64
    )
    return global_proj, local_proj


def block(tensor: torch.Tensor, world_size: int, rank: int) -> torch.Tensor:
    sizes = batch_sizes(world_size)
    start = sum(sizes[:rank])
    return tensor[:, start : start + sizes[rank]]


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).abs().max())


def leaf(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().clone().requires_grad_(True)


def distributed_run(module, world_size, rank, *, directions=None, use_local=True):
    """This rank's output and the gradients on its own blocks."""
    global_full, local_full = full_batch(world_size)
    global_mine = leaf(block(global_full, world_size, rank))
    local_mine = leaf(block(local_full, world_size, rank)) if use_local else None
    kwargs = {} if directions is None else {"directions": directions}
    output = module(global_mine, local_mine, **kwargs)
    output.total.backward()
    return output, global_mine.grad, None if local_mine is None else local_mine.grad


def single_run(loss_of, world_size, rank, *, use_local=True):
    """A single-process output on the concatenated batch and the gradient blocks of this rank."""
    global_full, local_full = full_batch(world_size)
    global_all = leaf(global_full)
    local_all = leaf(local_full) if use_local else None
    output = loss_of(global_all, local_all)
    output.total.backward()
    local_grad = None if local_all is None else block(local_all.grad, world_size, rank)
    return output, block(global_all.grad, world_size, rank), local_grad


def compare(prefix, results, distributed, single, world_size):
    """Values equal; each rank's input gradient is world_size x the single-process gradient block."""
    output, global_grad, local_grad = distributed
    reference, global_ref, local_ref = single
    for name in output._fields:
        results[f"{prefix}/value/{name}"] = max_error(getattr(output, name), getattr(reference, name))
    results[f"{prefix}/grad/global"] = max_error(global_grad, world_size * global_ref)
    if local_grad is not None:
        results[f"{prefix}/grad/local"] = max_error(local_grad, world_size * local_ref)


def check_gather(results, world_size, rank):
    sizes = batch_sizes(world_size)
    x = leaf(
        torch.randn(3, sizes[rank], 4, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    )
    gathered = gather_batch(x, dim=-2)
    weights = [
        torch.randn(3, sum(sizes), 4, dtype=torch.float64, generator=torch.Generator().manual_seed(100 + s))
        for s in range(world_size)
    ]
    # the upstream gradient reaches the gather through transposes: not contiguous (the gloo pitfall)
    (gathered.transpose(0, 1) * weights[rank].transpose(0, 1)).sum().backward()
    start = sum(sizes[:rank])
    expected = sum(w[:, start : start + sizes[rank]] for w in weights)
    results["gather/grad"] = max_error(x.grad, expected)
    everyone = [
        torch.randn(3, sizes[s], 4, dtype=torch.float64, generator=torch.Generator().manual_seed(s))
        for s in range(world_size)
    ]
    results["gather/value"] = max_error(gathered, torch.cat(everyone, dim=1))


def visreg(mode, num_slices=NUM_SLICES):
    loss = VISRegLoss(num_slices, reg_weight=0.7, shape_weight=2.0, slice_mode=mode, seed=SEED)
    loss.set_step(STEP)
    return loss


def check_visreg(results, world_size, rank):
    reference = visreg("local")  # one process: local mode communicates nothing
    single = single_run(reference, world_size, rank)
    compare("partition", results, distributed_run(visreg("partition"), world_size, rank), single, world_size)

    generator = torch.Generator().manual_seed(7)  # the same explicit directions on every rank
    directions = torch.nn.functional.normalize(
        torch.randn(DIM, 9, dtype=torch.float64, generator=generator), dim=0
    )
    single_explicit = single_run(lambda g, v: visreg("local")(g, v, directions=directions), world_size, rank)
    explicit = distributed_run(visreg("partition"), world_size, rank, directions=directions)
    compare("partition_explicit", results, explicit, single_explicit, world_size)

    few = distributed_run(visreg("partition", num_slices=3), world_size, rank)  # K < M at 4 ranks
    compare(
        "partition_few_slices", results, few, single_run(visreg("local", 3), world_size, rank), world_size
    )

    # regularizer() on all views, no invariance
    global_full, local_full = full_batch(world_size)
    views_all = leaf(torch.cat([global_full, local_full]))
    ref_reg = visreg("local").regularizer(views_all)
    ref_reg.total.backward()
    views_mine = leaf(block(views_all.detach(), world_size, rank))
    reg = visreg("partition").regularizer(views_mine)
    reg.total.backward()
    for name in reg._fields:
        results[f"regularizer/value/{name}"] = max_error(getattr(reg, name), getattr(ref_reg, name))
    results["regularizer/grad"] = max_error(
        views_mine.grad, world_size * block(views_all.grad, world_size, rank)
    )

    # replicate: the mean over ranks of K-slice losses, rank s with its own directions (stream s)
    sampler = visreg("replicate").sampler

    def replicate_reference(global_all, local_all):
        views = torch.cat([global_all, local_all])
        shapes = [shape_loss(views, sampler.directions(DIM, STEP, stream=s)) for s in range(world_size)]
        terms = F.visreg_regularizer(views, sampler.directions(DIM, STEP))
        shape = torch.stack(shapes).mean()
        regularizer = terms.scale + 2.0 * shape + terms.center
        invariance = invariance_loss(global_all, local_all)
        total = 0.3 * invariance + 0.7 * regularizer
        return VISRegOutput(total, invariance, regularizer, terms.center, terms.scale, shape)

    compare(
        "replicate",
        results,
        distributed_run(visreg("replicate"), world_size, rank),
        single_run(replicate_reference, world_size, rank),
        world_size,
    )
    # replicate differs between ranks before the reduction: every rank's own directions
    own = sampler.directions(DIM, STEP, stream=rank)
    results["replicate/own_directions_differ_from_rank0"] = float(
        rank == 0 or not torch.equal(own, sampler.directions(DIM, STEP, stream=0))
    )


def check_swd_sigreg_pairwise(results, world_size, rank):
    def swd(mode):
        loss = SWDLoss(NUM_SLICES, reg_weight=0.6, slice_mode=mode, seed=SEED)
        loss.set_step(STEP)
        return loss

    swd_single = single_run(swd("local"), world_size, rank)
    compare("swd", results, distributed_run(swd("partition"), world_size, rank), swd_single, world_size)

    def sigreg(sync):
        loss = SIGRegLoss(NUM_SLICES, reg_weight=0.4, sync=sync, seed=SEED)
        loss.set_step(STEP)
        return loss

    compare(
        "sigreg",
        results,
        distributed_run(sigreg(True), world_size, rank),
        single_run(sigreg(False), world_size, rank),  # one process: nothing to synchronise
        world_size,
    )
    # the functional form with sync equals the statistic of the concatenated batch
    global_full, _ = full_batch(world_size)
    directions = sigreg(True).sampler.directions(DIM, STEP)
    mine = sigreg_loss(block(global_full, world_size, rank), directions, sync=True)
    results["sigreg_functional/value"] = max_error(mine, sigreg_loss(global_full, directions))

    for name, loss_class in (("vicreg", VICRegLoss), ("barlow", BarlowTwinsLoss)):
        gathered = distributed_run(loss_class(), world_size, rank)
        compare(name, results, gathered, single_run(loss_class(gather=False), world_size, rank), world_size)


@contextmanager
def collectives_forbidden():
    names = [
        "all_gather",
        "all_gather_into_tensor",
        "all_reduce",
        "broadcast",
        "reduce_scatter",
        "all_to_all",
    ]
    saved = {name: getattr(dist, name) for name in names}

    def forbidden(*args, **kwargs):
        raise RuntimeError("a collective was called in local mode")

    try:
        for name in names:
            setattr(dist, name, forbidden)
        yield
    finally:
        for name, function in saved.items():
            setattr(dist, name, function)


def check_local(results, world_size, rank):
    global_full, local_full = full_batch(world_size)
    global_mine, local_mine = block(global_full, world_size, rank), block(local_full, world_size, rank)
    with collectives_forbidden():
        out = visreg("local")(global_mine, local_mine)
        swd_loss = SWDLoss(NUM_SLICES, slice_mode="local", seed=SEED)
        swd_loss.set_step(STEP)
        swd_out = swd_loss(global_mine, local_mine)
        sig = SIGRegLoss(NUM_SLICES, sync=False, seed=SEED)
        sig.set_step(STEP)
        sig_out = sig(global_mine, local_mine)
    # equal to one process on this rank's own batch with the shared directions
    # (world_info() reports the group, so build the reference from the functional terms)
    directions = visreg("local").sampler.directions(DIM, STEP)
    views = torch.cat([global_mine, local_mine])
    terms = F.visreg_regularizer(views, directions, shape_weight=2.0)
    expected = 0.3 * invariance_loss(global_mine, local_mine) + 0.7 * terms.total
    results["local/visreg"] = max_error(out.total, expected)
    results["local/swd"] = max_error(swd_out.swd, F.sliced_wasserstein_loss(views, directions))
    results["local/sigreg"] = max_error(sig_out.sigreg, sigreg_loss(views, directions))


def run(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(1234)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    results: dict[str, float] = {}
    try:
        check_gather(results, world_size, rank)
        check_visreg(results, world_size, rank)
        check_swd_sigreg_pairwise(results, world_size, rank)
        check_local(results, world_size, rank)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
