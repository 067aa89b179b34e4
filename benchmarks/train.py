"""Training throughput: our trainer vs an official-style loop, same data, model, views, batch, same run.

Both sides do a full training step per batch, data loading and multi-crop included:

* ``ours``: :class:`training.engine.Trainer` (accelerate, batched multi-crop in DataLoader workers or on
  the device, VISReg loss, online probe, clipping, AdamW, health checks), fed from an image folder.
* ``official``: the official repository's loop re-stated from its ``train.py`` with its own code read from a
  local checkout (github.com/HaiyuWu/visreg, CC BY-NC 4.0, never committed): its ``ViTEncoder`` (timm ViT +
  torchvision ``MLP`` projector, CLS of the last two blocks for the probe), its torchvision ``DinoMultiCrop``
  in DataLoader workers (one PIL pipeline per crop), its ``VISReg`` loss plus the invariance and lambda mix
  of ``train.py``, a linear online probe, clipping, AdamW.

Data: real photos (the repository's fixture photos, cut into ``--images`` distinct 256 px JPEG crops in a
temporary ImageFolder, one class per source photo). Images/s counts images per optimiser step (each image
gives ``global + local`` views), from the end of the warm-up steps to the end of the last step, so data
waits are included. Model FLOP utilisation = (forward + backward FLOPs of the backbone and projector for
one step, counted with ``torch.utils.flop_counter`` on our model) x steps / time / ``--peak-tflops``.

Examples::

    python benchmarks/train.py --device cpu --append-doc docs/benchmarks.md          # ViT-T/16, 64 px
    python benchmarks/train.py --device cuda --model vit-s16 --global-size 224 --local-size 96 \
        --batch 256 --steps 20 --append-doc docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import _measure  # noqa: E402
import _peers  # noqa: E402

PHOTOS = ROOT / "tests" / "fixtures" / "photos"
ARCHITECTURES = {
    "vit-t16": "vit_tiny_patch16_224",
    "vit-s16": "vit_small_patch16_224",
    "vit-b16": "vit_base_patch16_224",
}


@dataclass
class Result:
    """One side's measurement."""

    name: str
    images_per_s: float
    seconds: float
    steps: int
    images_per_cpu_s: float | None = None


# ---------------------------------------------------------------------------------------------- data
def make_photo_folder(root: Path, images: int, size: int = 256, seed: int = 0) -> Path:
    """``images`` distinct JPEG crops of the fixture photos, ImageFolder layout (one class per photo)."""
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    sources = sorted(PHOTOS.glob("*.jpg"))
    for index in range(images):
        source = sources[index % len(sources)]
        with Image.open(source) as photo:
            photo = photo.convert("RGB")
            width, height = photo.size
            side = int(min(width, height) * (0.5 + 0.5 * torch.rand((), generator=generator).item()))
            left = int((width - side) * torch.rand((), generator=generator).item())
            top = int((height - side) * torch.rand((), generator=generator).item())
            crop = photo.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
        folder = root / source.stem
        folder.mkdir(parents=True, exist_ok=True)
        crop.save(folder / f"{index:05d}.jpg", quality=90)
    return root


# ---------------------------------------------------------------------------------------------- ours
def our_config(args, data_dir: Path, output_dir: Path):
    from training.config import from_dict

    return from_dict(
        {
            "model": {"size": args.model, "img_size": args.global_size},
            "projector": {"hidden_dim": args.hidden_dim, "out_dim": args.proj_dim, "activation": "relu"},
            "data": {
                "source": "folder",
                "path": str(data_dir),
                "num_workers": args.workers,
                "base_size": 256,
            },
            "augment": {
                "global_count": args.global_count,
                "global_size": args.global_size,
                "local_count": args.local_count,
                "local_size": args.local_size,
                "augment_on": args.augment_on,
            },
            "loss": {"name": "visreg", "reg_weight": 0.9, "num_slices": args.num_slices},
            "optim": {"warmup_steps": 0},
            "train": {
                "output_dir": str(output_dir),
                "epochs": 1000,
                "max_steps": args.warmup + args.steps,
                "global_batch_size": args.batch,
                "per_device_batch_size": args.batch,
                "mixed_precision": "bf16" if args.bf16 else "no",
                "log_every": 10**6,
                "checkpoint_every": 0,
                "progress_bar": False,
                "log_with": "none",
                "online_probe": True,
            },
        }
    )


def run_ours(args, data_dir: Path) -> Result:
    from training.engine import Trainer

    with tempfile.TemporaryDirectory() as output_dir:
        trainer = Trainer(our_config(args, data_dir, Path(output_dir)))
        ends: list[float] = []
        cpu: list[float] = []
        step = trainer._train_step

        def timed_step(micro_batches):
            metrics = step(micro_batches)
            _sync(args.device)
            ends.append(time.perf_counter())
            cpu.append(_tree_cpu_seconds())
            if len(ends) == args.warmup + args.steps:
                raise _StopTimingError
            return metrics

        trainer._train_step = timed_step
        with contextlib.suppress(_StopTimingError):
            trainer.fit()
    seconds, cpu_seconds = ends[-1] - ends[args.warmup - 1], cpu[-1] - cpu[args.warmup - 1]
    images = args.steps * args.batch
    return Result(
        "ours (training.engine.Trainer)", images / seconds, seconds, args.steps, images / cpu_seconds
    )


class _StopTimingError(Exception):
    """Stops the trainer after the timed steps (before its export and evaluation at the end)."""


# ------------------------------------------------------------------------------------------ official
def _import(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class _OfficialFolder(torch.utils.data.Dataset):
    """The ImageFolder the official loop reads: PIL image -> official DinoMultiCrop -> list of crops."""

    def __init__(self, root: Path, transform) -> None:
        self.paths = sorted(root.glob("*/*.jpg"))
        classes = sorted({p.parent.name for p in self.paths})
        self.labels = [classes.index(p.parent.name) for p in self.paths]
        self.num_classes, self.transform = len(classes), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):
        from PIL import Image

        with Image.open(self.paths[index]) as image:
            return self.transform(image.convert("RGB")), self.labels[index]


def run_official(args, data_dir: Path) -> Result:
    repo = args.official_repo
    multicrop = _import(repo / "visreg" / "data" / "multicrop.py", "_official_multicrop")
    encoder_module = _import(repo / "visreg" / "models" / "vit_encoder.py", "_official_vit_encoder")
    loss_module = _import(repo / "visreg" / "losses" / "visreg.py", "_official_visreg_loss")
    # The official configs name ViT-S/8 .. ViT-g; the benchmark's architecture is added as one more entry,
    # without drop-path, as ours trains.
    encoder_module.VIT_CONFIGS["bench"] = (ARCHITECTURES[args.model], 0.0)
    device = torch.device(args.device)
    transform = multicrop.DinoMultiCrop(
        n_global=args.global_count,
        n_local=args.local_count,
        global_size=args.global_size,
        local_size=args.local_size,
    )
    dataset = _OfficialFolder(data_dir, transform)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.batch,
        shuffle=True,
        drop_last=True,
        num_workers=args.workers,
        prefetch_factor=4 if args.workers else None,
        persistent_workers=args.workers > 0,
        pin_memory=device.type == "cuda",
    )
    net = encoder_module.ViTEncoder(model_name="bench", proj_dim=args.proj_dim).to(device)
    net.proj = _mlp(net.embed_dim, args).to(device)  # the official MLP, at the benchmark's hidden size
    probe = torch.nn.Linear(net.embed_dim * 2, dataset.num_classes).to(device)
    reg_loss_fn = loss_module.VISReg(num_projections=args.num_slices)
    optimizer = torch.optim.AdamW(
        list(net.parameters()) + list(probe.parameters()), lr=9e-4, weight_decay=0.05
    )
    num_global, views_total, lamb = args.global_count, args.global_count + args.local_count, 0.9
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    ends: list[float] = []
    cpu: list[float] = []
    while len(ends) < args.warmup + args.steps:
        for views, labels in loader:
            views = [v.to(device, non_blocking=True) for v in views]
            labels = labels.to(device, non_blocking=True)
            with autocast:  # as the official train.py under accelerate's mixed precision
                emb, proj = net(views)
                global_mean = proj[:num_global].mean(0, keepdim=True)
                inv_loss = (proj - global_mean).square().mean()
                reg_loss = reg_loss_fn(proj)
                jepa_loss = reg_loss * lamb + inv_loss * (1 - lamb)
                probe_loss = torch.nn.functional.cross_entropy(
                    probe(emb.detach()), labels.repeat_interleave(views_total)
                )
                loss = jepa_loss + probe_loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
            _sync(args.device)
            ends.append(time.perf_counter())
            cpu.append(_tree_cpu_seconds())
            if len(ends) == args.warmup + args.steps:
                break
    seconds, cpu_seconds = ends[-1] - ends[args.warmup - 1], cpu[-1] - cpu[args.warmup - 1]
    images = args.steps * args.batch
    return Result("official-style loop", images / seconds, seconds, args.steps, images / cpu_seconds)


def _mlp(embed_dim: int, args):
    from torchvision.ops import MLP

    return MLP(
        embed_dim,
        [args.hidden_dim, args.hidden_dim, args.proj_dim],
        norm_layer=torch.nn.BatchNorm1d,
        activation_layer=torch.nn.ReLU,
    )


# --------------------------------------------------------------------------------------------- FLOPs
def step_flops(args) -> float:
    """Forward + backward FLOPs of our backbone + projector for one step (all views of one batch)."""
    from torch.utils.flop_counter import FlopCounterMode

    from training.build import build_model

    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(our_config(args, Path(tmp), Path(tmp)))
    g = torch.randn(args.global_count * args.batch, 3, args.global_size, args.global_size)
    local = torch.randn(args.local_count * args.batch, 3, args.local_size, args.local_size)
    counter = FlopCounterMode(display=False)
    with counter:
        features, projections = model(g, local if args.local_count else None)
        (features.float().sum() + projections.float().sum()).backward()
    return float(counter.get_total_flops())


def _tree_cpu_seconds() -> float:
    """CPU seconds used so far by this process and its live children (the DataLoader workers).

    On a CPU shared with other jobs, wall time measures the queue for a core as much as the work; the
    CPU time of the process tree is the work itself. (Workers that already exited are not counted, so it
    is read while the loader's workers are alive.)
    """
    import psutil  # a dependency of accelerate, so present wherever the trainer runs

    process = psutil.Process()
    total = sum(process.cpu_times()[:2])
    for child in process.children(recursive=True):
        with contextlib.suppress(psutil.Error):  # a child that just exited
            total += sum(child.cpu_times()[:2])
    return total


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default="vit-t16", choices=sorted(ARCHITECTURES))
    parser.add_argument("--global-count", type=int, default=2)
    parser.add_argument("--local-count", type=int, default=6)
    parser.add_argument("--global-size", type=int, default=64)
    parser.add_argument("--local-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--hidden-dim", type=int, default=2048, help="projector hidden width (both sides)")
    parser.add_argument("--proj-dim", type=int, default=256)
    parser.add_argument("--num-slices", type=int, default=4096)
    parser.add_argument("--images", type=int, default=256, help="distinct photo crops in the data folder")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers (both sides)")
    parser.add_argument("--augment-on", default="workers", choices=["workers", "device"], help="ours only")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the main process")
    parser.add_argument("--steps", type=int, default=4, help="timed optimiser steps per round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per round (>= 1)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds ours, official, ...")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast on both sides (default on cuda)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="for model FLOP utilisation")
    parser.add_argument("--official-repo", type=Path, default=ROOT / "third_party" / "visreg")
    parser.add_argument("--skip-official", action="store_true", help="ours only (no checkout needed)")
    parser.add_argument("--append-doc", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False; use --device cpu")
    if args.device == "cuda":
        args.bf16 = True
    if args.peak_tflops is None:  # dense peak of the precision: H100 SXM bf16 989; CPU: docs/reference.md
        threads = args.threads or torch.get_num_threads()
        args.peak_tflops = 989.0 if args.device == "cuda" else 0.095 * threads
    if not args.skip_official and not (args.official_repo / "visreg" / "losses" / "visreg.py").is_file():
        parser.error(
            f"official checkout not found at {args.official_repo} (see benchmarks/README.md); "
            "or pass --skip-official"
        )
    return args


def measure(args) -> tuple[list[Result], float]:
    """Alternating rounds of both sides on one photo folder; returns every round's results and FLOPs/step."""
    if args.threads:
        torch.set_num_threads(args.threads)
    results: list[Result] = []
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = make_photo_folder(Path(tmp) / "photos", args.images)
        for _ in range(args.rounds):
            results.append(run_ours(args, data_dir))
            print(f"  {results[-1].name}: {results[-1].images_per_s:.2f} img/s", flush=True)
            if not args.skip_official:
                results.append(run_official(args, data_dir))
                print(f"  {results[-1].name}: {results[-1].images_per_s:.2f} img/s", flush=True)
    return results, step_flops(args)


def summarise(results: list[Result], flops: float, args) -> dict:
    """Median images/s per side, the ratio, and model FLOP utilisation."""
    import statistics

    by_name: dict[str, list[float]] = {}
    per_cpu: dict[str, list[float]] = {}
    for result in results:
        by_name.setdefault(result.name, []).append(result.images_per_s)
        per_cpu.setdefault(result.name, []).append(result.images_per_cpu_s)
    medians = {name: statistics.median(values) for name, values in by_name.items()}
    summary = {"images_per_s": medians, "rounds": by_name, "step_tflop": flops / 1e12}
    summary["images_per_cpu_s"] = {name: statistics.median(values) for name, values in per_cpu.items()}
    for name, rate in medians.items():
        summary.setdefault("mfu", {})[name] = rate / args.batch * flops / (args.peak_tflops * 1e12)
    names = list(medians)
    if len(names) == 2:
        summary["ratio"] = medians[names[0]] / medians[names[1]]
        cpu_rates = summary["images_per_cpu_s"]
        summary["cpu_ratio"] = cpu_rates[names[0]] / cpu_rates[names[1]]
    return summary


def render(summary: dict, args, command: str, load: tuple[str, str]) -> str:
    views = f"{args.global_count} x {args.global_size} px + {args.local_count} x {args.local_size} px"
    lines = [
        f"## Training throughput: our trainer vs an official-style loop ({args.device})",
        "",
        f"- Date: {datetime.date.today().isoformat()}",
        f"- Device: {_measure.device_description(torch.device(args.device))}",
        f"- Versions: torch {torch.__version__}, "
        f"official commit {_peers._official_commit(args.official_repo)}",
        f"- Command: `{command}`",
        f"- Load average (1 min) at start / end: {load[0]} / {load[1]}",
        f"- Setting: {args.model}, views {views}, batch {args.batch} images, projector "
        f"{args.hidden_dim}-{args.hidden_dim}-{args.proj_dim}, K {args.num_slices}, "
        f"{'bf16 autocast' if args.bf16 else 'fp32'}, {args.workers} DataLoader worker(s), {args.images} "
        f"real photo crops; {args.rounds} alternating rounds of {args.warmup} warm-up + {args.steps} timed "
        "steps each (median of rounds).",
        f"- Model FLOPs per step (backbone + projector, fwd + bwd, torch.utils.flop_counter): "
        f"{summary['step_tflop'] * 1e3:.2f} GFLOP per image-batch of {args.batch}; utilisation against "
        f"{args.peak_tflops:g} TFLOP/s.",
        "",
        "| loop | images/s (median) | rounds | images per CPU-second (process + workers) | model FLOP "
        "utilisation |",
        "|---|---|---|---|---|",
    ]
    for name, rate in summary["images_per_s"].items():
        rounds = ", ".join(f"{r:.2f}" for r in summary["rounds"][name])
        per_cpu = summary["images_per_cpu_s"][name]
        lines.append(
            f"| {name} | {rate:.2f} | {rounds} | {per_cpu:.3f} | {summary['mfu'][name] * 100:.1f} % |"
        )
    if "ratio" in summary:
        lines += [
            "",
            f"Ratio ours / official-style: **{summary['ratio']:.2f}x** in images/s, "
            f"**{summary['cpu_ratio']:.2f}x** in images per CPU-second (goal >= 1.5x).",
        ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    command = "python benchmarks/train.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    load_start = _measure.load_average()
    results, flops = measure(args)
    summary = summarise(results, flops, args)
    text = render(summary, args, command, (load_start, _measure.load_average()))
    print(text)
    if args.append_doc:
        import _doc

        _doc.write_section(args.append_doc, args.device, text, script="benchmarks/train.py")
    return summary


if __name__ == "__main__":
    main()
