"""Forward+backward time and peak memory of our losses next to the official VISReg code and lightly.

Compares ``visreg_hub.losses`` (VISReg, SIGReg, SWD, VICReg) with the official repository's loss modules
(github.com/HaiyuWu/visreg, CC BY-NC 4.0, loaded at run time from ``--official-repo`` and never committed)
and lightly's ``VISRegLoss`` / LeJEPA ``SIGReg`` (PyPI), all in the same process on the same inputs.
The sliced losses compute the same total objective ``(1 - lambda) * invariance + lambda * regulariser``
over (V, N, D) projections in every implementation (VICReg differs by definition, see the doc note).
Besides the timing table it prints:

* agreement: each implementation's value and input gradient next to ours on the *same* inputs and the
  *same* random directions (the peers' own draws, reproduced by seeding; see ``_peers.peer_directions``);
* partition: the per-rank cost of ``slice_mode="partition"`` with M = 1, 2, 4, 8 real gloo processes
  (:mod:`_partition`: each rank's CPU time for the whole VISReg step, slowest rank reported);
* the top operators of our VISReg at the largest setting (what bounds it on this device).

Setup (once): ``git clone https://github.com/HaiyuWu/visreg third_party/visreg`` (git-ignored) and
``pip install lightly``.  Example::

    python benchmarks/losses.py --device cpu --settings light,heavy --dtypes fp32,bf16 \
        --append-doc docs/benchmarks.md
    python benchmarks/losses.py --settings tiny --repeats 1        # seconds; a smoke test
"""

from __future__ import annotations

import argparse
import datetime
import functools
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

import _doc  # noqa: E402
import _measure  # noqa: E402
import _partition  # noqa: E402
import _peers  # noqa: E402


@dataclass(frozen=True)
class Setting:
    """One problem size: V = num_global + num_local views of N samples in D dims, K slices."""

    name: str
    num_global: int
    num_local: int
    batch: int
    dim: int
    num_slices: int
    reg_weight: float = 0.9  # official ViT-B/16 ImageNet-1K default

    def describe(self) -> str:
        views = self.num_global + self.num_local
        return (
            f"V{views} ({self.num_global} global + {self.num_local} local) N{self.batch} D{self.dim} "
            f"K{self.num_slices}, lambda {self.reg_weight}"
        )


SETTINGS = {
    "tiny": Setting("tiny", 1, 1, 64, 32, 64),
    # official ViT-B/16 recipe: 4 + 6 views, D 256, K 4096; N 1024 = 16 images per GPU gathered over 64
    "light": Setting("light", 4, 6, 1024, 256, 4096),
    "heavy": Setting("heavy", 2, 6, 2048, 2048, 2048),  # the official scripts/bench_cost.py heavy setting
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
IMPLS = ("ours", "official", "lightly")
SIGREG_KNOTS = 17
SEED = 1234
#: float64 reference gradients only up to this V*N*D*K (the light setting; heavy would take minutes on CPU).
REFERENCE_GRAD_MAX_WORK = 2**34


@dataclass
class Cell:
    """One measured (loss, impl, setting, dtype) cell, or why it was not measured."""

    loss: str
    impl: str
    setting: str
    dtype: str
    timing: _measure.Timing | None = None
    peak_bytes: int | None = None
    skipped: str | None = None
    value: float | None = None  # total loss on the shared directions
    reference: float | None = None  # ours in float64 on the float32 master inputs
    ref_value_err: float | None = None  # |value - reference| / |reference|
    ref_grad_err: float | None = None  # ||grad - float64 grad|| / ||float64 grad||
    rel_value: float | None = None  # |value - ours| / |ours|, same dtype
    rel_grad: float | None = None  # ||grad - grad ours|| / ||grad ours|| w.r.t. the inputs
    grad: torch.Tensor | None = None  # ours only: the input gradient the peers are compared with


def make_master(setting: Setting) -> torch.Tensor:
    """(V, N, D) float32 projections: shared content + per-view noise, off-centre, non-unit scale."""
    gen = torch.Generator().manual_seed(SEED)
    views = setting.num_global + setting.num_local
    content = torch.randn(1, setting.batch, setting.dim, generator=gen)
    return 0.8 * content + 0.4 * torch.randn(views, setting.batch, setting.dim, generator=gen) + 0.1


def split_views(
    master: torch.Tensor, setting: Setting, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(global, local) leaf tensors requiring grad, cast to ``dtype`` on ``device``."""
    proj = master.to(device=device, dtype=dtype)
    global_proj = proj[: setting.num_global].clone().requires_grad_()
    local_proj = proj[setting.num_global :].clone().requires_grad_()
    return global_proj, local_proj


def skip_reason(loss: str, impl: str, setting: Setting, dtype: torch.dtype, max_mem_gib: float) -> str | None:
    """Cells not to run: the peers' SIGReg materialises (V, N, K, knots) cos/sin tensors several times."""
    if loss == "sigreg" and impl in ("official", "lightly"):
        views = setting.num_global + setting.num_local
        elems = views * setting.batch * setting.num_slices * SIGREG_KNOTS
        # about 6 live copies in fwd+bwd: the H100 anchor measured 16.4 GiB at light fp32 (5.75x elems*4 B)
        estimate = 6 * elems * torch.finfo(dtype).bits // 8
        if estimate > max_mem_gib * 2**30:
            return f"skipped: needs ~{estimate / 2**30:.0f} GiB (> --max-mem-gib {max_mem_gib:g})"
    return None


def load_peers(official_repo: Path) -> dict[str, _peers.Peer]:
    return {
        "ours": _peers.our_losses(),
        "official": _peers.official_losses(official_repo),
        "lightly": _peers.lightly_losses(),
    }


def measure_cells(args, peers, device) -> list[Cell]:
    """Every (setting, loss, dtype, impl) cell: agreement, peak memory and time.

    The first, untimed step of a cell is the agreement run: ours on explicit directions, a peer right after
    seeding the global generator, so that it draws exactly those directions (see ``_peers``). That step is
    also the memory-profiled step and the first warm-up. The timed steps then run every implementation as
    in training: ours with its own step-seeded directions, the peers with their own ``torch.randn`` draws.
    """
    cells = []
    for setting in args.settings:
        master = make_master(setting)
        for loss in args.losses:
            planned = plan_cells(args, peers, setting, loss)
            cells += planned
            if all(cell.skipped for cell in planned):
                continue
            reference, reference_grad = (
                (None, None)
                if "reference" in args.skip
                else float64_reference(peers, loss, setting, master, device)
            )
            for dtype_name in args.dtypes:
                group = [cell for cell in planned if cell.dtype == dtype_name and not cell.skipped]
                for cell in group:
                    cell.reference = reference
                measure_group(group, peers, setting, master, (reference, reference_grad), args, device)
    return cells


def plan_cells(args, peers, setting: Setting, loss: str) -> list[Cell]:
    """The (dtype, impl) cells of one loss and setting, with the reason for any cell not to run.

    When every peer that implements the loss is skipped for its size (e.g. the peers' SIGReg at the
    light and heavy settings on CPU), ours is skipped too: a number without its peer is not a comparison.
    """
    cells = []
    for dtype_name in args.dtypes:
        row = []
        for impl in IMPLS:
            peer = peers[impl]
            if peer.missing_reason is None and loss not in peer.factories:
                continue  # e.g. lightly has no SWD: no row
            cell = Cell(loss, impl, setting.name, dtype_name)
            cell.skipped = peer.missing_reason or skip_reason(
                loss, impl, setting, DTYPES[dtype_name], args.max_mem_gib
            )
            row.append(cell)
        too_big = [c for c in row if c.impl != "ours" and c.skipped and c.skipped.startswith("skipped")]
        runnable = [c for c in row if c.impl != "ours" and not c.skipped]
        if too_big and not runnable:
            for cell in row:
                if cell.impl == "ours" and not cell.skipped:
                    cell.skipped = "skipped: no peer fits at this size, so no comparison"
        cells += row
    return cells


def float64_reference(
    peers, loss: str, setting: Setting, master: torch.Tensor, device
) -> tuple[float | None, torch.Tensor | None]:
    """Our total loss in float64 on the float32 master inputs and the shared directions, and its input
    gradient when the setting is small enough (at most ``REFERENCE_GRAD_MAX_WORK`` multiply-adds)."""
    if peers["ours"].missing_reason is not None or loss not in peers["ours"].factories:
        return None, None
    module = _peers.our_module(loss, setting.num_slices, setting.reg_weight).to(device)
    directions = None
    if loss in _peers.SLICED_LOSSES:
        directions = _peers.peer_directions(SEED, setting.dim, setting.num_slices, torch.float32, device)
    leaves = split_views(master, setting, torch.float64, device)
    views = setting.num_global + setting.num_local
    if views * setting.batch * setting.dim * setting.num_slices > REFERENCE_GRAD_MAX_WORK:
        with torch.no_grad():
            return _ours_at(module, *leaves, directions).item(), None
    value = _ours_at(module, *leaves, directions)
    value.backward()
    return value.item(), torch.cat([leaf.grad.flatten() for leaf in leaves])


def _rel_norm(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value - reference).norm() / reference.norm().clamp_min(1e-30)).item()


def measure_group(group: list[Cell], peers, setting: Setting, master, reference, args, device) -> None:
    """Fill the cells of one (setting, loss, dtype): agreement and peak memory from each one's first step,
    then the timed steps of all implementations in interleaved rounds."""
    if not group:
        return
    leaves = split_views(master, setting, DTYPES[group[0].dtype], device)
    reference_value, reference_grad = reference
    steps, first_seconds, ours = [], [], None
    for cell in group:
        fn = peers[cell.impl].factories[cell.loss](setting.num_slices, setting.reg_weight)
        started = time.perf_counter()
        grad = first_step(cell, fn, setting, leaves, device)
        first_seconds.append(time.perf_counter() - started)
        if cell.impl == "ours":
            ours, ours.grad = cell, grad
        elif ours is not None:
            cell.rel_value = abs(cell.value - ours.value) / max(abs(ours.value), 1e-30)
            cell.rel_grad = _rel_norm(grad, ours.grad)
        if reference_value is not None:
            cell.ref_value_err = abs(cell.value - reference_value) / max(abs(reference_value), 1e-30)
        if reference_grad is not None:
            cell.ref_grad_err = _rel_norm(grad, reference_grad)
        steps.append(functools.partial(fn, *leaves))
    repeats = args.repeats
    if args.max_cell_s is not None:  # slow cells on a shared CPU: fewer repeats, never fewer than one
        repeats = max(1, min(repeats, int(args.max_cell_s / max(max(first_seconds), 1e-9))))
    timings = _measure.time_interleaved(steps, leaves, device, args.warmup - 1, repeats)
    for cell, timing in zip(group, timings):
        cell.timing = timing
        print(
            f"  {cell.setting} {cell.dtype} {cell.loss:7s} {cell.impl:9s} {timing.median:10.2f} ms "
            f"{_measure.format_bytes(cell.peak_bytes):>10s}  loss {cell.value:.6g}",
            flush=True,
        )
    if ours is not None:
        ours.grad = None  # free it


def first_step(cell: Cell, fn, setting: Setting, leaves, device) -> torch.Tensor:
    """The untimed first step: the loss on the shared directions, with its peak memory; returns the input
    gradient. Ours gets the directions explicitly; a peer draws them itself right after seeding."""
    directions, extra_bytes = None, 0
    if cell.loss in _peers.SLICED_LOSSES:
        directions = _peers.peer_directions(SEED, setting.dim, setting.num_slices, leaves[0].dtype, device)
    if cell.impl == "ours":
        module = _peers.our_module(cell.loss, setting.num_slices, setting.reg_weight).to(device)
        step = functools.partial(_ours_at, module, *leaves, directions)
        extra_bytes = 0 if directions is None else directions.numel() * directions.element_size()
    else:
        step = functools.partial(_seeded, fn, *leaves)
    cell.value, grad, cell.peak_bytes = _measure.profiled_step(step, leaves, device, extra_bytes)
    return grad


def _ours_at(module, global_proj, local_proj, directions) -> torch.Tensor:
    """Our total loss, on explicit directions for the sliced losses."""
    if directions is None:
        return module(global_proj, local_proj).total
    return _peers.our_loss_with_directions(module, global_proj, local_proj, directions.to(global_proj.dtype))


def _seeded(fn, global_proj, local_proj) -> torch.Tensor:
    torch.manual_seed(SEED)  # the peer's torch.randn(D, K) then equals _peers.peer_directions(SEED, ...)
    return fn(global_proj, local_proj)


def partition_scaling(args, device) -> list[tuple]:
    """Per-rank cost of our VISReg in partition mode with M real gloo processes (CPU only)."""
    if device.type != "cpu":
        print("partition: measured with gloo CPU processes only; skipped on", device.type)
        return []
    setting = args.settings[-1]  # the largest requested: where the per-rank cost matters
    return _partition.partition_scaling_gloo(setting, args.dtypes, args.warmup, args.repeats, seed=SEED)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--settings", default="light,heavy", help=f"comma list of {', '.join(SETTINGS)}")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16")
    parser.add_argument("--losses", default=",".join(_peers.LOSS_NAMES), help="comma list of losses")
    parser.add_argument("--repeats", type=int, default=3, help="timed fwd+bwd steps per cell")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per cell (cpu 1, cuda 3)")
    parser.add_argument("--official-repo", type=Path, default=ROOT / "third_party" / "visreg")
    parser.add_argument("--append-doc", type=Path, default=None, help="markdown file for the section")
    parser.add_argument("--max-mem-gib", type=float, default=None, help="skip cells estimated above this")
    parser.add_argument(
        "--max-cell-s",
        type=float,
        default=None,
        help="cap the timed rounds of a cell group near this many seconds per impl (>= 1; cpu 60, cuda none)",
    )
    parser.add_argument("--no-tf32", action="store_true", help="CUDA: full fp32 matmuls (default: TF32)")
    parser.add_argument(
        "--skip",
        default="",
        help="stages to skip: cells,memory,partition,profile,reference (the float64 agreement)",
    )
    parser.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="CPU timer: wall time, or this process's CPU time (a machine shared by more runnable processes "
        "than cores; use with --threads 1)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    try:
        args.settings = [SETTINGS[s] for s in args.settings.split(",")]
    except KeyError as exc:
        parser.error(f"unknown setting {exc}; choose from {', '.join(SETTINGS)}")
    args.dtypes = args.dtypes.split(",")
    if unknown := set(args.dtypes) - set(DTYPES):
        parser.error(f"unknown dtype {sorted(unknown)}; choose from fp32, bf16")
    args.losses = args.losses.split(",")
    if unknown := set(args.losses) - set(_peers.LOSS_NAMES):
        parser.error(f"unknown loss {sorted(unknown)}; choose from {', '.join(_peers.LOSS_NAMES)}")
    args.skip = set(filter(None, args.skip.split(",")))
    if args.max_cell_s is None and args.device == "cpu":
        args.max_cell_s = 60.0
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False; use --device cpu")
    if args.warmup is None:
        args.warmup = 3 if args.device == "cuda" else 1
    if args.warmup < 1 or args.repeats < 1:
        parser.error("--warmup and --repeats must be >= 1 (the first warm-up step is the profiled one)")
    if args.max_mem_gib is None:
        total = torch.cuda.get_device_properties(0).total_memory if args.device == "cuda" else 8 * 2**30
        args.max_mem_gib = 0.9 * total / 2**30 if args.device == "cuda" else 6.0
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        _measure.CPU_CLOCK = time.process_time
    _measure.PROFILE_CPU_MEMORY = "memory" not in args.skip
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = not args.no_tf32
    command = "python benchmarks/losses.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    load_start = _measure.load_average()
    peers = load_peers(args.official_repo)
    for peer in peers.values():
        print(f"{peer.name}: {peer.missing_reason or peer.version}")

    cells = measure_cells(args, peers, device) if "cells" not in args.skip else []
    has_ours = peers["ours"].missing_reason is None
    partition = partition_scaling(args, device) if has_ours and "partition" not in args.skip else []
    profiles = []
    if has_ours and "profile" not in args.skip:
        setting = args.settings[-1]
        for dtype_name in args.dtypes:
            global_proj, local_proj = split_views(make_master(setting), setting, DTYPES[dtype_name], device)
            fn = peers["ours"].factories["visreg"](setting.num_slices, setting.reg_weight)
            step = functools.partial(fn, global_proj, local_proj)
            ops = _measure.top_ops(step, (global_proj, local_proj))
            profiles.append((setting.name, dtype_name, ops))

    report = _doc.Report(
        date=datetime.date.today().isoformat(),
        device=_measure.device_description(device),
        device_type=device.type,
        load_start=load_start,
        load_end=_measure.load_average(),
        versions=_doc.versions(peers, tf32=device.type == "cuda" and not args.no_tf32),
        command=command,
        settings=[f"{s.name}: {s.describe()}" for s in args.settings],
        cells=cells,
        partition=partition,
        profiles=profiles,
    )
    text = report.render()
    print(text)
    if args.append_doc:
        _doc.write_section(args.append_doc, device.type, text)
        print(f"wrote section to {args.append_doc}")


if __name__ == "__main__":
    main()
