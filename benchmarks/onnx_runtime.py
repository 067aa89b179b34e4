"""ONNX Runtime against torch eager and torch.compile: model-only embedding throughput, same run.

Rows, per model and batch size (the same pre-made, normalised input batch for every row):

* ``torch eager`` (the peer; ratios are to it): ``model(x)`` under ``torch.inference_mode``; fp32, and on
  CUDA also fp16 (``model.half()``), the anchor of the issue's GPU goal.
* ``torch.compile``: the same model through ``torch.compile`` (default mode); fp32 on CPU, fp16 on CUDA.
* ``ORT ...``: files written by ``visreg_hub.export_onnx`` (validated at batch 1 and 3 here; the tests
  cover 1, 3, 17, 64) and run by the session of :class:`~visreg_hub.inference.onnx.OnnxEmbedder`: fp32,
  fp32 with ORT fusions (``optimize=True``: MultiHeadAttention, SkipLayerNormalization, BiasGelu), fp16
  and, on CUDA, fp16 with fusions. On CUDA the input and output are bound by pointer (IOBinding, as
  ``OnnxEmbedder`` does), so no host copy is timed; on CPU it is a plain ``session.run``.

Timing: warm-up calls first (torch.compile compiles there), then ``--repeats`` interleaved rounds (every
row once per round, so a busy machine slows all rows alike); the median per call is reported. CPU rows
use the same thread count for torch and ONNX Runtime.

Usage::

    .venv/bin/python benchmarks/onnx_runtime.py               # CPU: ViT-T/16, ViT-S/16 at 224, batch 1, 8, 32
    .venv/bin/python benchmarks/onnx_runtime.py --append-doc  # also write the section in docs/benchmarks.md
    python benchmarks/onnx_runtime.py --device cuda --append-doc  # H100: ViT-S/16, ViT-B/16, batch 1, 32, 256
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import _doc  # noqa: E402
import _measure  # noqa: E402

from visreg_hub.inference.onnx import OnnxEmbedder, export_onnx  # noqa: E402
from visreg_hub.models import ModelConfig, VISRegEncoder  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
PEER = "torch eager fp32"


def versions() -> str:
    import onnx
    import onnxruntime
    import onnxscript
    import timm

    return (
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, onnx {onnx.__version__}, "
        f"onnxscript {onnxscript.__version__}, timm {timm.__version__}, numpy {np.__version__}"
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def torch_runner(model, pixels: torch.Tensor):
    def run():
        with torch.inference_mode():
            return model(pixels)

    return run


def ort_runner(embedder: OnnxEmbedder, pixels: torch.Tensor, device: torch.device):
    session = embedder.session
    if device.type != "cuda":
        feed = {"pixel_values": pixels.float().cpu().numpy()}
        return lambda: session.run(["embedding"], feed)
    # IOBinding as in OnnxEmbedder: float32 input and output stay on the GPU, bound by pointer
    pixels = pixels.float().contiguous()
    out = torch.empty((pixels.shape[0], embedder.embedding_dim), dtype=torch.float32, device=device)
    binding = session.io_binding()
    index = device.index or 0
    binding.bind_input("pixel_values", "cuda", index, np.float32, tuple(pixels.shape), pixels.data_ptr())
    binding.bind_output("embedding", "cuda", index, np.float32, tuple(out.shape), out.data_ptr())
    return lambda: session.run_with_iobinding(binding)


def export_variants(model, folder: Path, args, device: torch.device) -> tuple[dict, list[str]]:
    """ORT sessions per variant name, and a line per export (time, fusions, validation)."""
    variants = {"ORT fp32": dict(), "ORT fp32 fused": dict(optimize=True), "ORT fp16": dict(fp16=True)}
    if device.type == "cuda":
        variants["ORT fp16 fused"] = dict(fp16=True, optimize=True)
    provider = "cuda" if device.type == "cuda" else "cpu"
    sessions, notes = {}, []
    for name, kwargs in variants.items():
        path = folder / f"{model.config.name}-{name.replace(' ', '-')}.onnx"
        start = time.perf_counter()
        report = export_onnx(
            model, path, validation_batch_sizes=(1, 3), validation_providers=provider, **kwargs
        )
        seconds = time.perf_counter() - start
        embedder = OnnxEmbedder(path, providers=provider, intra_op_num_threads=torch.get_num_threads())
        if embedder.fell_back:
            raise RuntimeError(f"{name} fell back to {embedder.active_provider}; the numbers would be wrong")
        sessions[name] = embedder
        fusions = ", ".join(f"{k} {v}" for k, v in sorted(embedder.metadata.fusions.items())) or "none"
        notes.append(
            f"{model.config.name} {name}: export + validation {seconds:.0f} s, max abs error "
            f"{report.max_abs_error:.1e}, min cosine {report.min_cosine:.6f} vs torch fp32; "
            f"fusions: {fusions}"
        )
    return sessions, notes


def measure(args, device: torch.device) -> tuple[list[tuple], list[str]]:
    rows, notes = [], []
    for size in args.sizes:
        torch.manual_seed(0)
        model = VISRegEncoder(ModelConfig.from_name(size)).eval().to(device)
        with tempfile.TemporaryDirectory(prefix="visreg-onnx-bench-") as folder:
            sessions, export_notes = export_variants(model, Path(folder), args, device)
            notes += export_notes
            eager = {"torch eager fp32": model}
            if device.type == "cuda":
                eager["torch eager fp16"] = VISRegEncoder(model.config).to(device).half().eval()
                eager["torch eager fp16"].load_state_dict(model.state_dict())
            compiled_from = "torch eager fp16" if device.type == "cuda" else "torch eager fp32"
            compiled_name = compiled_from.replace("torch eager", "torch.compile")
            compiled = None if args.no_compile else torch.compile(eager[compiled_from])
            for batch in args.batch_sizes:
                pixels = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch)).to(
                    device
                )
                runners = {
                    name: torch_runner(m, pixels.to(next(m.parameters()).dtype)) for name, m in eager.items()
                }
                if compiled is not None:
                    runners[compiled_name] = torch_runner(
                        compiled, pixels.to(next(compiled.parameters()).dtype)
                    )
                for name, embedder in sessions.items():
                    runners[name] = ort_runner(embedder, pixels, device)
                times = {name: [] for name in runners}
                for run in runners.values():  # warm-up (and compilation)
                    for _ in range(args.warmup):
                        run()
                synchronize(device)
                for _ in range(args.repeats):
                    for name, run in runners.items():
                        start = time.perf_counter()
                        run()
                        synchronize(device)
                        times[name].append(time.perf_counter() - start)
                for name, values in times.items():
                    rows.append((size, batch, name, statistics.median(values), len(values)))
                print(f"{size} batch {batch}: done", file=sys.stderr)
    return rows, notes


def render(args, rows, notes, device: torch.device, load_start: float, command: str) -> str:
    peers = {(size, batch): ms for size, batch, name, ms, _ in rows if name == PEER}
    table = ["| model | batch | runtime | ms per batch (median) | images/s | ratio to torch eager fp32 |"]
    table.append("|---|---:|---|---:|---:|---:|")
    for size, batch, name, seconds, repeats in rows:
        ratio = peers[(size, batch)] / seconds
        table.append(
            f"| {size} | {batch} | {name} | {1e3 * seconds:,.1f} (n={repeats}) | {batch / seconds:,.1f} "
            f"| {ratio:.2f}x |"
        )
    goal = gpu_goal(rows) if device.type == "cuda" else (
        "**pending**: not measurable in this run (no GPU). Goal from the issue: on an H100, ORT fp16 at "
        "least as fast as torch eager (fp16) at batch 256 and faster at batch 1, for ViT-S/16 and ViT-B/16. "
        "Command: `python benchmarks/onnx_runtime.py --device cuda --append-doc`. For scale, the anchor "
        "(docs/reference.md, H100, ORT 1.31 CUDA EP, plain export, IOBinding, ViT-B/16 batch 256): ORT fp32 "
        "3.4k, fp16 5.4k img/s vs torch fp16 eager 8.4k, so the goal needs the fused fp16 graph or TensorRT."
    )  # fmt: skip
    lines = [
        f"## ONNX Runtime vs torch eager vs torch.compile ({device.type})",
        "",
        f"- Date: {dt.date.today().isoformat()}",
        f"- Device: {_measure.device_description(device, threads='torch and ORT threads')}",
        f"- Versions: {versions()}",
        f"- Command: `{command}`",
        f"- Load average (1 min) at start / end: {load_start:.1f} / {os.getloadavg()[0]:.1f}",
        f"- Models: {', '.join(args.sizes)} at 224x224 (random weights: speed does not depend on them), "
        f"batch sizes {', '.join(map(str, args.batch_sizes))}; {args.warmup} warm-up calls, then "
        f"{args.repeats} interleaved rounds; model only (pre-made normalised input, no decoding).",
        "",
        *table,
        "",
        "Exports (`export_onnx`, validated against torch fp32 at batch 1 and 3):",
        "",
        *(f"- {note}" for note in notes),
        "",
        f"GPU goal: {goal}",
    ]
    if device.type == "cpu":
        lines += [
            "",
            "Not measurable here: the CUDA and TensorRT providers, IOBinding (its code path is in "
            "`OnnxEmbedder` but only runs with a GPU provider), and fp16 speed on a GPU (on the CPU provider "
            "fp16 kernels are few and mostly emulated, so the fp16 row shows correctness, not GPU speed). "
            "CPU batch sizes and models are smaller than the GPU setting so the run takes minutes.",
        ]
    return "\n".join(lines) + "\n"


def gpu_goal(rows) -> str:
    by = {(size, batch, name): seconds for size, batch, name, seconds, _ in rows}
    verdicts = []
    for size in sorted({row[0] for row in rows}):
        batches = sorted({row[1] for row in rows if row[0] == size})
        for batch, need in ((batches[-1], "at least as fast"), (batches[0], "faster")):
            eager = by.get((size, batch, "torch eager fp16"))
            best = min((by[k], k[2]) for k in by if k[:2] == (size, batch) and k[2].startswith("ORT fp16"))
            ratio = eager / best[0]
            ok = ratio >= 1.0 if need == "at least as fast" else ratio > 1.0
            verdicts.append(
                f"{size} batch {batch}: best {best[1]} {ratio:.2f}x torch eager fp16 "
                f"({'met' if ok else 'NOT met'})"
            )
    return "; ".join(verdicts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--sizes", help="comma-separated named sizes (CPU: vit-t16,vit-s16; CUDA: vit-s16,vit-b16)"
    )
    parser.add_argument("--batch-sizes", help="comma-separated (CPU: 1,8,32; CUDA: 1,32,256)")
    parser.add_argument("--repeats", type=int, help="timed rounds (CPU 3, CUDA 20)")
    parser.add_argument("--warmup", type=int, help="untimed calls per row first (CPU 1, CUDA 5)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch and ORT (default: usable cores)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    parser.add_argument("--append-doc", action="store_true", help=f"write the section into {DOC}")
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.sizes = (args.sizes or ("vit-s16,vit-b16" if gpu else "vit-t16,vit-s16")).split(",")
    args.batch_sizes = [int(b) for b in (args.batch_sizes or ("1,32,256" if gpu else "1,8,32")).split(",")]
    args.repeats = args.repeats or (20 if gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    elif not gpu:
        torch.set_num_threads(
            len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        )
    load_start = os.getloadavg()[0]
    command = "python benchmarks/onnx_runtime.py " + shlex.join(sys.argv[1:])
    rows, notes = measure(args, device)
    text = render(args, rows, notes, device, load_start, command.strip())
    print(text)
    if args.append_doc:
        _doc.write_section(DOC, device.type, text, script="benchmarks/onnx_runtime.py")
        print(f"wrote the {device.type} section of {DOC}", file=sys.stderr)


if __name__ == "__main__":
    main()
