"""Every GPU measurement this project promises, each with its peer in the same run, in one command.

Sections (each row: ours, the peer, the ratio, the goal, or why it was not measured):

1. ``loss``: VISReg loss fwd+bwd, ours vs the official module (eager and ``torch.compile``) at the light
   (V10 N1024 D256 K4096) and heavy (V8 N2048 D2048 K2048) settings, fp32 (TF32) and bf16. Goal: ours at
   least 3x faster than the compiled official at heavy bf16. The opt-in Triton sort is timed as an extra
   row when triton is installed; it stays opt-in (``sort_backend="auto"`` is torch.sort) until this row
   shows it correct and faster.
2. ``train``: images/s of a full training step (data loading and multi-crop included), our trainer vs the
   official-style loop of :mod:`benchmarks.train`, ViT-S/16 (batch 256) and ViT-B/16 (batch 128), 2 x 224 +
   6 x 96 views, bf16. Goal: 1.5x.
3. ``encode``: ``encode()`` end to end (JPEG files -> normalised embeddings) vs the model alone on pre-made
   tensors, ViT-B/16, batch 256, bf16. Goal: at least 0.9x.
4. ``onnx``: ONNX Runtime (CUDA EP; TensorRT EP when present) vs torch eager fp16, ViT-B/16, batch 1 and 256.
5. ``serve``: the HTTP service under load, by ``benchmarks/serve.py`` when that script exists.

Output: ``gpu_suite.md`` (a markdown section) and ``gpu_suite.json`` (every row) in ``--out``. One part
failing is reported as a failed row; the others still run. ``--dry-run`` runs every part at tiny sizes on
the CPU in seconds (the default test run does, so this script cannot rot); its numbers mean nothing.

Usage::

    python benchmarks/gpu_suite.py --out results/h100          # on an H100/H200: about 8 minutes
    python benchmarks/gpu_suite.py --dry-run --out /tmp/suite  # CPU, tiny sizes, seconds
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = Path(__file__).resolve().parent
# Loaded by path (the tests do), benchmarks/ is not on sys.path yet; its helpers are imported by name below
# and the sibling scripts load their own (see _bench).
if str(BENCHMARKS) not in sys.path:
    sys.path.append(str(BENCHMARKS))
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import _measure  # noqa: E402
import _peers  # noqa: E402


def _bench(name: str):
    """A sibling benchmark script as a module, loaded by path under a private name (no shadowing)."""
    module_name = f"_bench_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


@dataclass
class Row:
    """One measurement and its peer.

    ``status`` is ``measured``, ``not measured: <why>`` or ``failed: <why>``.
    """

    section: str
    name: str
    status: str = "measured"
    ours: float | None = None
    peer: float | None = None
    unit: str = ""
    ratio: float | None = None  # ours / peer in the unit's "better" direction (higher is better)
    goal: str = ""
    details: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Plan:
    """Sizes of one run: the full GPU suite or the tiny dry run."""

    device: str
    loss_settings: tuple[tuple, ...]  # (name, num_global, num_local, batch, dim, num_slices)
    loss_dtypes: tuple[str, ...]
    loss_warmup: int
    loss_repeats: int
    compile_official: bool
    train_models: tuple[tuple[str, int], ...]  # (model size, batch)
    train_args: tuple[str, ...]
    encode_size: str
    encode_img_size: int | None
    encode_batch: int
    encode_images: int
    encode_workers: int
    onnx_size: str
    onnx_img_size: int | None
    onnx_batches: tuple[int, ...]
    repeats: int


FULL = Plan(
    device="cuda",
    loss_settings=(("light", 4, 6, 1024, 256, 4096), ("heavy", 2, 6, 2048, 2048, 2048)),
    loss_dtypes=("fp32", "bf16"),
    loss_warmup=3,
    loss_repeats=20,
    compile_official=True,
    train_models=(("vit-s16", 256), ("vit-b16", 128)),
    train_args=tuple(
        [
            "--global-size",
            "224",
            "--local-size",
            "96",
            "--steps",
            "8",
            "--warmup",
            "3",
            "--rounds",
            "1",
            "--workers",
            "14",
            "--images",
            "2048",
        ]
    ),
    encode_size="vit-b16",
    encode_img_size=None,
    encode_batch=256,
    encode_images=2048,
    encode_workers=12,
    onnx_size="vit-b16",
    onnx_img_size=None,
    onnx_batches=(1, 256),
    repeats=10,
)
DRY = Plan(
    device="cpu",
    loss_settings=(("tiny", 1, 1, 64, 32, 64),),
    loss_dtypes=("fp32",),
    loss_warmup=1,
    loss_repeats=1,
    compile_official=False,
    train_models=(("vit-t16", 2),),
    train_args=tuple(
        [
            "--global-size",
            "32",
            "--local-size",
            "16",
            "--global-count",
            "2",
            "--local-count",
            "1",
            "--threads",
            "1",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--rounds",
            "1",
            "--workers",
            "0",
            "--images",
            "8",
            "--hidden-dim",
            "32",
            "--proj-dim",
            "16",
            "--num-slices",
            "16",
        ]
    ),
    encode_size="vit-t16",
    encode_img_size=32,
    encode_batch=4,
    encode_images=4,
    encode_workers=0,
    onnx_size="vit-t16",
    onnx_img_size=32,
    onnx_batches=(2,),
    repeats=1,
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------- loss
def loss_rows(plan: Plan, official_repo: Path) -> list[Row]:
    losses = _bench("losses")
    Setting, make_master, split_views = losses.Setting, losses.make_master, losses.split_views
    device = torch.device(plan.device)
    ours_peer, official = _peers.our_losses(), _peers.official_losses(official_repo)
    missing = official.missing_reason
    rows = []
    for name, num_global, num_local, batch, dim, slices in plan.loss_settings:
        setting = Setting(name, num_global, num_local, batch, dim, slices)
        master = make_master(setting)
        for dtype_name in plan.loss_dtypes:
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
            leaves = split_views(master, setting, dtype, device)
            fns = {"ours": ours_peer.factories["visreg"](slices, 0.9)}
            if not missing:
                fns["official eager"] = official.factories["visreg"](slices, 0.9)
            if plan.compile_official and not missing:
                fns["official torch.compile"] = torch.compile(official.factories["visreg"](slices, 0.9))
            if device.type == "cuda" and _triton_available():
                from visreg_hub.losses import VISRegLoss

                module = VISRegLoss(num_slices=slices, reg_weight=0.9, sort_backend="triton").to(device)
                fns["ours, opt-in Triton sort"] = lambda g, loc, m=module: m(g, loc).total
            steps = [lambda fn=fn, leaves=leaves: fn(*leaves) for fn in fns.values()]
            timings = _measure.time_interleaved(steps, leaves, device, plan.loss_warmup, plan.loss_repeats)
            ms = {label: timing.median for label, timing in zip(fns, timings)}
            ours = ms["ours"]
            if missing:  # ours is still timed, so the code path is exercised; no ratio without the peer
                label = f"{setting.describe()} {dtype_name}: ours vs official"
                status = f"not measured: official code {missing}"
                rows.append(Row("loss", label, status, ours=ours, unit="ms"))
            for label in fns:
                if label == "ours":
                    continue
                goal = ""
                if label == "official torch.compile" and name == "heavy" and dtype_name == "bf16":
                    goal = ">= 3x"
                if label.startswith("ours,"):
                    rows.append(
                        Row(
                            "loss",
                            f"{setting.describe()} {dtype_name}: {label} vs ours (torch.sort)",
                            ours=ms[label],
                            peer=ours,
                            unit="ms",
                            ratio=ours / ms[label],
                            goal="opt-in until faster and correct here",
                        )
                    )
                    continue
                rows.append(
                    Row(
                        "loss",
                        f"{setting.describe()} {dtype_name}: ours vs {label}",
                        ours=ours,
                        peer=ms[label],
                        unit="ms",
                        ratio=ms[label] / ours,
                        goal=goal,
                    )
                )
    return rows


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------------------------- train
def train_rows(plan: Plan, official_repo: Path) -> list[Row]:
    train = _bench("train")
    rows = []
    have_official = (official_repo / "visreg" / "losses" / "visreg.py").is_file()
    for size, batch in plan.train_models:
        argv = ["--device", plan.device, "--model", size, "--batch", str(batch), *plan.train_args]
        argv += ["--official-repo", str(official_repo)] + ([] if have_official else ["--skip-official"])
        args = train.parse_args(argv)
        summary = train.summarise(*train.measure(args), args)
        rates = summary["images_per_s"]
        ours_name = next(name for name in rates if name.startswith("ours"))
        label = f"{size}, batch {batch}, {' '.join(plan.train_args[:4])}"
        if not have_official:
            rows.append(
                Row(
                    "train",
                    f"{label}: ours vs official-style loop",
                    f"not measured: no official checkout at {official_repo}",
                    ours=rates[ours_name],
                    unit="images/s",
                    details={"mfu": summary["mfu"]},
                )
            )
            continue
        peer_name = next(name for name in rates if name != ours_name)
        rows.append(
            Row(
                "train",
                f"{label}: ours vs official-style loop",
                ours=rates[ours_name],
                peer=rates[peer_name],
                unit="images/s",
                ratio=summary["ratio"],
                goal=">= 1.5x",
                details={"mfu": summary["mfu"], "step_tflop": summary["step_tflop"]},
            )
        )
    return rows


# -------------------------------------------------------------------------------------------- encode
def encode_rows(plan: Plan) -> list[Row]:
    write_images = _bench("encode").write_images

    from visreg_hub.inference import encode
    from visreg_hub.models import ModelConfig, VISRegEncoder

    device = torch.device(plan.device)
    overrides = {} if plan.encode_img_size is None else {"img_size": plan.encode_img_size}
    model = VISRegEncoder(ModelConfig.from_name(plan.encode_size, **overrides)).to(device).eval()
    dtype = torch.bfloat16 if device.type == "cuda" else None
    autocast = torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_images(Path(tmp), plan.encode_images)
        premade = torch.randn(plan.encode_batch, *model.data_config["input_size"], device=device)

        def model_only():
            with torch.inference_mode(), autocast:
                for start in range(0, len(paths), plan.encode_batch):
                    model(premade[: len(paths[start : start + plan.encode_batch])])

        def end_to_end():
            encode(
                model,
                paths,
                batch_size=plan.encode_batch,
                num_workers=plan.encode_workers,
                dtype=dtype,
                show_progress_bar=False,
            )

        rates = _best_rates([model_only, end_to_end], device, plan.repeats, len(paths))
    return [
        Row(
            "encode",
            f"{plan.encode_size}, batch {plan.encode_batch}, {'bf16' if dtype else 'fp32'}: "
            "encode() end to end vs model only",
            ours=rates[1],
            peer=rates[0],
            unit="images/s",
            ratio=rates[1] / rates[0],
            goal=">= 0.9x",
        )
    ]


def _best_rates(runs, device: torch.device, repeats: int, count: int) -> list[float]:
    for run in runs:  # warm-up
        run()
    best = [float("inf")] * len(runs)
    for _ in range(repeats):
        for slot, run in enumerate(runs):
            _sync(device)
            start = time.perf_counter()
            run()
            _sync(device)
            best[slot] = min(best[slot], time.perf_counter() - start)
    return [count / seconds for seconds in best]


# ---------------------------------------------------------------------------------------------- onnx
def onnx_rows(plan: Plan) -> list[Row]:
    from visreg_hub.inference.onnx import OnnxEmbedder, export_onnx
    from visreg_hub.models import ModelConfig, VISRegEncoder

    device = torch.device(plan.device)
    overrides = {} if plan.onnx_img_size is None else {"img_size": plan.onnx_img_size}
    torch.manual_seed(0)
    model = VISRegEncoder(ModelConfig.from_name(plan.onnx_size, **overrides)).to(device).eval()
    gpu = device.type == "cuda"
    providers = ["cuda"] if gpu else ["cpu"]
    if gpu:
        import onnxruntime

        if "TensorrtExecutionProvider" in onnxruntime.get_available_providers():
            providers.append("tensorrt")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(model, path, fp16=gpu, validation_batch_sizes=(1,), validation_providers=providers[0])
        baseline = model.half() if gpu else model
        input_size = model.data_config["input_size"]
        ort_runner = _bench("onnx_runtime").ort_runner  # IOBinding on the GPU, as onnx_runtime.py times ORT
        for provider in providers:
            embedder = OnnxEmbedder(path, providers=provider)
            if embedder.fell_back:
                rows.append(
                    Row("onnx", f"ORT {provider}", f"not measured: fell back to {embedder.active_provider}")
                )
                continue
            for batch in plan.onnx_batches:
                pixels = torch.randn(batch, *input_size, device=device)
                baseline_pixels = pixels.to(next(baseline.parameters()).dtype)

                def torch_run(p=baseline_pixels):
                    with torch.inference_mode():
                        baseline(p)

                rates = _best_rates(
                    [torch_run, ort_runner(embedder, pixels, device)], device, plan.repeats, batch
                )
                precision = "fp16" if gpu else "fp32"
                rows.append(
                    Row(
                        "onnx",
                        f"{plan.onnx_size} batch {batch}: ORT {provider} {precision} vs torch eager "
                        f"{precision}",
                        ours=rates[1],
                        peer=rates[0],
                        unit="images/s",
                        ratio=rates[1] / rates[0],
                        goal=">= 1x at 256, > 1x at 1" if gpu else "",
                    )
                )
    return rows


# --------------------------------------------------------------------------------------------- serve
def serve_rows(plan: Plan, out: Path) -> list[Row]:
    """The HTTP service under load, by ``benchmarks/serve.py`` (another engineer's script) when it exists.

    Its options are its own: the full run passes ``--device cuda`` and reports its output; the dry run
    only checks that ``--help`` runs (it cannot know a tiny setting of a script it does not own).
    """
    script = BENCHMARKS / "serve.py"
    name = "HTTP service under load (benchmarks/serve.py)"
    if not script.is_file():
        return [
            Row("serve", "HTTP service under load", "not measured: no serve benchmark (benchmarks/serve.py)")
        ]
    dry = plan.device == "cpu"
    argv = [sys.executable, str(script), *(["--help"] if dry else ["--device", plan.device])]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=ROOT)
    (out / "serve.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        return [Row("serve", name, f"failed: exit {done.returncode} (see serve.log)")]
    status = "not measured: dry run (serve.py --help ran)" if dry else "measured"
    return [Row("serve", name, status, details={"output_tail": done.stdout[-2000:]})]


# ---------------------------------------------------------------------------------------------- main
def run_suite(plan: Plan, out: Path, official_repo: Path) -> dict:
    """Run every section, write ``gpu_suite.md`` and ``gpu_suite.json`` to ``out``; return the JSON dict."""
    out.mkdir(parents=True, exist_ok=True)
    sections = {
        "loss": lambda: loss_rows(plan, official_repo),
        "train": lambda: train_rows(plan, official_repo),
        "encode": lambda: encode_rows(plan),
        "onnx": lambda: onnx_rows(plan),
        "serve": lambda: serve_rows(plan, out),
    }
    rows, seconds = [], {}
    started = time.perf_counter()
    for name, section in sections.items():
        begun = time.perf_counter()
        try:
            rows += section()
        except Exception as exc:  # one broken part must not hide the others' numbers
            rows.append(
                Row(
                    name,
                    name,
                    f"failed: {type(exc).__name__}: {exc}",
                    details={"traceback": traceback.format_exc()[-3000:]},
                )
            )
        seconds[name] = time.perf_counter() - begun
        print(f"[gpu_suite] {name}: {seconds[name]:.1f} s", flush=True)
    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": _measure.device_description(torch.device(plan.device)),
        "dry_run": plan is DRY,
        "torch": torch.__version__,
        "official_commit": _peers._official_commit(official_repo),
        "seconds": {**seconds, "total": time.perf_counter() - started},
        "rows": [asdict(row) for row in rows],
    }
    (out / "gpu_suite.json").write_text(json.dumps(result, indent=2))
    (out / "gpu_suite.md").write_text(render(result))
    return result


def render(result: dict) -> str:
    title = (
        "GPU suite (dry run: tiny sizes on the CPU; the numbers mean nothing)"
        if result["dry_run"]
        else ("GPU suite")
    )
    lines = [
        f"## {title}",
        "",
        f"- Date: {result['date']}",
        f"- Device: {result['device']}",
        f"- Versions: torch {result['torch']}, official commit {result['official_commit']}",
        "- Command: `python benchmarks/gpu_suite.py" + (" --dry-run" if result["dry_run"] else "") + "`",
        "- Wall time per section: " + ", ".join(f"{k} {v:.0f} s" for k, v in result["seconds"].items()),
        "",
        "| section | measurement | ours | peer | ratio (higher is better) | goal | status |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        ours = "" if row["ours"] is None else f"{row['ours']:.4g} {row['unit']}"
        peer = "" if row["peer"] is None else f"{row['peer']:.4g} {row['unit']}"
        ratio = "" if row["ratio"] is None else f"{row['ratio']:.2f}x"
        cells = [row["section"], row["name"], ours, peer, ratio, row["goal"], row["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_suite.md and gpu_suite.json")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (seconds)")
    parser.add_argument("--official-repo", type=Path, default=ROOT / "third_party" / "visreg")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: the suite measures GPUs (use --dry-run to check it on a CPU)")
    plan = DRY if args.dry_run else FULL
    if args.dry_run:  # one thread: on a shared CPU, OpenMP barriers of 2+ threads stall under load
        torch.set_num_threads(1)
    if plan.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as the anchors (REFERENCE.md) were measured
    print("python benchmarks/gpu_suite.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])))
    result = run_suite(plan, args.out, args.official_repo)
    print(render(result))
    return result


if __name__ == "__main__":
    main()
