"""Every GPU measurement this project promises, each with its peer in the same run, in one command.

Sections (each row: ours, the peer, the ratio, the goal, or why it was not measured):

1. ``loss``: VISReg loss fwd+bwd, ours vs the official module (eager and ``torch.compile``) at the light
   (V10 N1024 D256 K4096) and heavy (V8 N2048 D2048 K2048) settings, fp32 (TF32) and bf16. Goal: ours at
   least 3x faster than the compiled official at heavy bf16. The opt-in Triton sort is timed as an extra
   row when triton is installed; it stays opt-in (``sort_backend="auto"`` is torch.sort) until this row
   shows it correct and faster. So is ours with 16x larger temporary blocks (the library's 16 MiB blocks
   were sized for the CPU's malloc; see ``_loss_chunks``).
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

    python benchmarks/gpu_suite.py --out results/h100          # on an H100/H200: about 6 minutes
    python benchmarks/gpu_suite.py --dry-run --out /tmp/suite  # CPU, tiny sizes, seconds
"""

from __future__ import annotations

import argparse
import contextlib
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
    compile_official: tuple[str, ...]  # loss settings whose official module is also timed under torch.compile
    train_models: tuple[tuple[str, int, str], ...]  # (model size, batch, where ours makes its views)
    train_args: tuple[str, ...]
    encode_size: str
    encode_img_size: int | None
    encode_batch: int
    encode_images: int
    encode_workers: int
    onnx_size: str
    onnx_overrides: tuple[tuple[str, int], ...]  # ModelConfig fields changed from the named size
    onnx_batches: tuple[int, ...]
    serve_args: tuple[str, ...]  # benchmarks/serve.py's options (the dry run only checks --help)
    repeats: int


FULL = Plan(
    device="cuda",
    loss_settings=(("light", 4, 6, 1024, 256, 4096), ("heavy", 2, 6, 2048, 2048, 2048)),
    loss_dtypes=("fp32", "bf16"),
    loss_warmup=3,
    loss_repeats=15,
    compile_official=("heavy",),  # the goal's setting; each compile costs tens of seconds of a short lease
    # ours with its views made in DataLoader workers (as the official loop) and on the GPU (its best)
    train_models=(("vit-s16", 256, "workers"), ("vit-s16", 256, "device"), ("vit-b16", 128, "device")),
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
    onnx_overrides=(),
    onnx_batches=(1, 256),
    serve_args=(
        *("--concurrency", "1,64", "--requests", "256"),
        *("--requests-large", "128", "--overload-requests", "512"),
    ),
    repeats=10,
)
DRY = Plan(
    device="cpu",
    loss_settings=(("tiny", 1, 1, 64, 32, 64),),
    loss_dtypes=("fp32",),
    loss_warmup=1,
    loss_repeats=1,
    compile_official=(),
    train_models=(("vit-t16", 2, "workers"),),
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
    onnx_overrides=(("img_size", 32), ("depth", 2)),  # 2 blocks: the dynamo export of 12 took 20 s on a CPU
    onnx_batches=(2,),
    serve_args=("--help",),
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
            if name in plan.compile_official and not missing:
                fns["official torch.compile"] = torch.compile(official.factories["visreg"](slices, 0.9))
            if device.type == "cuda" and _triton_available():
                from visreg_hub.losses import VISRegLoss

                module = VISRegLoss(num_slices=slices, reg_weight=0.9, sort_backend="triton").to(device)
                fns["ours, opt-in Triton sort"] = lambda g, loc, m=module: m(g, loc).total
            steps = [lambda fn=fn, leaves=leaves: fn(*leaves) for fn in fns.values()]
            timings = _measure.time_interleaved(steps, leaves, device, plan.loss_warmup, plan.loss_repeats)
            ms = {label: timing.median for label, timing in zip(fns, timings)}
            ours = ms["ours"]
            if device.type == "cuda":
                rows.append(_chunk_row(setting, dtype_name, fns["ours"], leaves, device, plan, ours))
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


@contextlib.contextmanager
def _loss_chunks(scale: int):
    """Every loss term's temporaries in blocks ``scale`` times larger than the CPU-tuned 16 MiB.

    The blocks were sized for glibc's malloc (see ``visreg_hub.losses._numerics``); on a GPU the caching
    allocator has no such threshold and each block costs kernel launches, so larger blocks may be faster.
    This times that hypothesis; the library's sizes stay as they are until a row shows it.
    """
    from visreg_hub.losses import _numerics, sort_shape

    saved = _numerics.TEMPORARY_ELEMENTS, sort_shape._CHUNK_ELEMENTS, sort_shape._SORT_BLOCK_ELEMENTS
    _numerics.TEMPORARY_ELEMENTS, sort_shape._CHUNK_ELEMENTS, sort_shape._SORT_BLOCK_ELEMENTS = (
        value * scale for value in saved
    )
    try:
        yield
    finally:
        _numerics.TEMPORARY_ELEMENTS, sort_shape._CHUNK_ELEMENTS, sort_shape._SORT_BLOCK_ELEMENTS = saved


def _chunk_row(setting, dtype_name: str, ours_fn, leaves, device, plan: Plan, ours_ms: float) -> Row:
    """Ours with 16x larger temporary blocks vs ours as shipped, timed back to back (a dedicated GPU)."""
    scale = 16
    with _loss_chunks(scale):
        timing = _measure.time_fwd_bwd(
            lambda: ours_fn(*leaves), leaves, device, plan.loss_warmup, plan.loss_repeats
        )
    return Row(
        "loss",
        f"{setting.describe()} {dtype_name}: ours, {scale}x larger blocks vs ours (16 MiB blocks)",
        ours=timing.median,
        peer=ours_ms,
        unit="ms",
        ratio=ours_ms / timing.median,
        goal="a GPU block size only if faster here",
    )


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
    for size, batch, augment_on in plan.train_models:
        argv = ["--device", plan.device, "--model", size, "--batch", str(batch), *plan.train_args]
        argv += ["--augment-on", augment_on, "--official-repo", str(official_repo)]
        argv += [] if have_official else ["--skip-official"]
        label = f"{size}, batch {batch}, {' '.join(plan.train_args[:4])}, our views in {augment_on}"
        try:  # one failing configuration must not hide the others
            args = train.parse_args(argv)
            summary = train.summarise(*train.measure(args), args)
        except Exception as exc:
            rows.append(
                Row(
                    "train",
                    f"{label}: ours vs official-style loop",
                    f"failed: {type(exc).__name__}: {exc}",
                    details={"traceback": traceback.format_exc()[-3000:]},
                )
            )
            continue
        rates = summary["images_per_s"]
        ours_name = next(name for name in rates if name.startswith("ours"))
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
    torch.manual_seed(0)
    config = ModelConfig.from_name(plan.onnx_size, **dict(plan.onnx_overrides))
    model = VISRegEncoder(config).to(device).eval()
    gpu = device.type == "cuda"
    providers = ["cuda"] if gpu else ["cpu"]
    if gpu:
        import onnxruntime

        available = onnxruntime.get_available_providers()
        if "CUDAExecutionProvider" not in available:  # the CPU-only wheel: nothing on the GPU to compare
            return [
                Row(
                    "onnx",
                    f"{plan.onnx_size}: ORT CUDA vs torch eager",
                    f"not measured: onnxruntime {onnxruntime.__version__} has no CUDAExecutionProvider "
                    f"(providers: {', '.join(available)}); install onnxruntime-gpu",
                )
            ]
        if "TensorrtExecutionProvider" in available:
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
    argv = [sys.executable, str(script), *plan.serve_args, *([] if dry else ["--device", plan.device])]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, cwd=ROOT)
    (out / "serve.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        return [Row("serve", name, f"failed: exit {done.returncode} (see serve.log)")]
    status = "not measured: dry run (serve.py --help ran)" if dry else "measured"
    return [Row("serve", name, status, details={"output_tail": done.stdout[-2000:]})]


# ---------------------------------------------------------------------------------------------- main
SECTIONS = ("loss", "train", "encode", "onnx", "serve")


def run_suite(plan: Plan, out: Path, official_repo: Path, only: tuple[str, ...] = ()) -> dict:
    """Run the sections (all, or those named in ``only``); return the JSON dict.

    ``gpu_suite.md`` and ``gpu_suite.json`` in ``out`` are rewritten after every section, so a run stopped
    at a lease's time limit keeps the sections it finished.
    """
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
    result = {}
    for name, section in sections.items():
        if only and name not in only:
            continue
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
    parser.add_argument(
        "--sections", default="", help=f"comma list of sections to run (default: all): {','.join(SECTIONS)}"
    )
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: the suite measures GPUs (use --dry-run to check it on a CPU)")
    plan = DRY if args.dry_run else FULL
    if args.dry_run:  # one thread: on a shared CPU, OpenMP barriers of 2+ threads stall under load
        torch.set_num_threads(1)
    if plan.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as the anchors (docs/reference.md) were measured
    print("python benchmarks/gpu_suite.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])))
    only = tuple(name for name in args.sections.split(",") if name)
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        parser.error(f"--sections: unknown {unknown}; choose from {', '.join(SECTIONS)}")
    result = run_suite(plan, args.out, args.official_repo, only)
    print(render(result))
    return result


if __name__ == "__main__":
    main()
