"""Per-rank cost of ``slice_mode="partition"`` measured with real gloo process groups.

For M in (1, 2, 4, 8), M processes (one torch thread each) hold contiguous blocks of the same batch and
run ``VISRegLoss(slice_mode="partition")`` forward + backward together. A rank's time is its *CPU* time
for the step (``time.thread_time`` of the one thread that computes; gloo's own threads and the waiting in
collectives are excluded), so that eight processes on a two-core machine still report what each rank
costs, not how long it queued for a core. The table reports the largest rank's median and its ratio to
M = 1; the loss values of every M are compared with M = 1 as a check that the split computes the same
thing.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

RANKS = (1, 2, 4, 8)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank, world_size, port, spec, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        from visreg_hub.losses import VISRegLoss

        dtype = getattr(torch, spec["dtype"])
        gen = torch.Generator().manual_seed(spec["seed"])
        views, batch, dim = spec["views"], spec["batch"], spec["dim"]
        content = torch.randn(1, batch, dim, generator=gen)
        master = 0.8 * content + 0.4 * torch.randn(views, batch, dim, generator=gen) + 0.1
        bounds = [batch * r // world_size for r in range(world_size + 1)]
        mine = master[:, bounds[rank] : bounds[rank + 1]].to(dtype)
        global_proj = mine[: spec["num_global"]].clone().requires_grad_()
        local_proj = mine[spec["num_global"] :].clone().requires_grad_()
        loss_fn = VISRegLoss(num_slices=spec["num_slices"], reg_weight=0.9, slice_mode="partition")
        cpu, wall, values = [], [], []
        for step in range(spec["warmup"] + spec["repeats"]):
            loss_fn.set_step(0)  # the same directions every step, so values are comparable across M
            global_proj.grad = local_proj.grad = None
            dist.barrier()
            started_cpu, started_wall = time.thread_time(), time.perf_counter()
            out = loss_fn(global_proj, local_proj)
            out.total.backward()
            if step >= spec["warmup"]:
                cpu.append(time.thread_time() - started_cpu)
                wall.append(time.perf_counter() - started_wall)
                values.append(out.total.item())
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"cpu": cpu, "wall": wall, "values": values}))
    finally:
        dist.destroy_process_group()


def partition_scaling_gloo(setting, dtypes: list[str], warmup: int, repeats: int, seed: int = 1234) -> list:
    """Rows ``(setting, dtype, M, slices per rank, cpu ms median of the slowest rank, ratio to M=1,
    wall ms median, max relative value difference to M=1)``."""
    rows = []
    for dtype in dtypes:
        base = base_value = None
        for world_size in RANKS:
            spec = {
                "dtype": {"fp32": "float32", "bf16": "bfloat16"}[dtype],
                "seed": seed,
                "views": setting.num_global + setting.num_local,
                "num_global": setting.num_global,
                "batch": setting.batch,
                "dim": setting.dim,
                "num_slices": setting.num_slices,
                "warmup": warmup,
                "repeats": repeats,
            }
            with tempfile.TemporaryDirectory() as out_dir:
                mp.start_processes(
                    _worker,
                    args=(world_size, _free_port(), spec, out_dir),
                    nprocs=world_size,
                    join=True,
                    start_method="spawn",
                )
                results = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world_size)]
            cpu = max(statistics.median(r["cpu"]) for r in results) * 1000
            wall = max(statistics.median(r["wall"]) for r in results) * 1000
            value = results[0]["values"][0]
            base = base or cpu
            base_value = base_value if base_value is not None else value
            spread = abs(value - base_value) / abs(base_value)
            slices = -(-setting.num_slices // world_size)
            rows.append((setting.name, dtype, world_size, slices, cpu, cpu / base, wall, spread))
            print(
                f"  partition {setting.name} {dtype} M={world_size}: slowest rank {cpu:.1f} ms CPU "
                f"({cpu / base:.2f} of M=1, goal <= {1.3 / world_size:.3f}), wall {wall:.1f} ms, "
                f"value vs M=1 {spread:.1e}",
                flush=True,
            )
    return rows
