"""int8 ONNX Runtime graphs against ORT fp32 on the CPU: throughput and retrieval recall, same run.

Rows, per model and batch size (the same preprocessed real images for every row; model only):

* ``ORT fp32`` (the peer; ratios are to it): ``export_onnx(model, path)``, run by ``OnnxEmbedder``'s session.
* ``ORT int8 dynamic``: what ``export_onnx(..., int8=True)`` and ``from_pretrained(..., precision="int8")``
  write (``quantize_int8`` on the fp32 file): int8 weights of every linear layer (per output channel),
  activations quantised per batch at run time.
* ``ORT int8 static``: what ``export_onnx(..., int8=True, calibration_images=...)`` writes: QDQ graph,
  activation ranges from calibration photos that are not in the evaluation set.

The fp32 graph is exported once and both int8 graphs are quantised from that file (one export: the
dynamo exporter needs GBs of memory for ViT-S/16).

Quality: every evaluation image is embedded (L2-normalised) by the fp32 graph and by each int8 graph;
recall@10 is the mean over queries of |top-10 neighbours by int8 embeddings & top-10 by fp32| / 10 (the
query itself excluded), plus the smallest cosine between an image's int8 and fp32 embeddings.

Models: ``vit-s16`` (timm ViT-S/16 at 224 px, random weights: docs/reference.md's CPU anchor size) on the
bundled photo gallery (demo/assets/photo-gallery, 333 real photos and clip art; 64 for calibration, the rest
evaluated), and ``bundled`` (vit-mini-p7-fmnist, trained) on the 700 real Fashion-MNIST fixture images.

Usage::

    .venv/bin/python benchmarks/int8.py                     # print the table
    .venv/bin/python benchmarks/int8.py --append-doc        # also write its section of docs/benchmarks.md
    # on a shared, oversubscribed machine: one ORT thread per session, CPU seconds instead of wall time
    .venv/bin/python benchmarks/int8.py --threads 1 --clock cpu

``--clock cpu`` times each call with ``time.process_time`` (CPU seconds of this process; with one intra-op
thread ORT computes on the calling thread). When other jobs keep every core busy, wall time measures the
queue for a core; CPU time measures the work each graph does.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import statistics
import subprocess
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
from onnx_runtime import versions  # noqa: E402

from visreg_hub.hub import from_pretrained  # noqa: E402
from visreg_hub.inference.inputs import list_image_files  # noqa: E402
from visreg_hub.inference.onnx import OnnxEmbedder, export_onnx, validate_onnx  # noqa: E402
from visreg_hub.inference.onnx.quantize import calibration_inputs, quantize_int8  # noqa: E402
from visreg_hub.models import ModelConfig, VISRegEncoder  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
GALLERY = ROOT / "demo" / "assets" / "photo-gallery"
FIXTURES = ROOT / "tests" / "fixtures"
PEER = "ORT fp32"
CLOCKS = {
    "wall": "wall time (`time.perf_counter`)",
    "cpu": "CPU time of this process (`time.process_time`): the work each graph does, not the queue for a "
    "core on a shared machine",
}


def model_and_images(size: str) -> tuple[torch.nn.Module, list, list, str]:
    """(model, calibration images, evaluation images, description of the images)."""
    if size == "bundled":
        model = from_pretrained("vit-mini-p7-fmnist", backend="torch")
        images = []
        for name in ("fmnist_train_500.npz", "fmnist_test_200.npz"):
            with np.load(FIXTURES / name) as data:
                images += list(data["images"])
        return model, images[:64], images[64:], "700 real Fashion-MNIST fixture images (64 calibrate)"
    torch.manual_seed(0)
    model = VISRegEncoder(ModelConfig.from_name(size)).eval()
    files = list_image_files(GALLERY)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(files))
    calibration = [files[i] for i in order[:64]]
    evaluation = [files[i] for i in sorted(order[64:])]
    return model, calibration, evaluation, f"{len(files)} photos of demo/assets/photo-gallery (64 calibrate)"


def recall_at_k(reference: np.ndarray, other: np.ndarray, k: int = 10) -> float:
    """Mean over queries of the overlap of the k nearest neighbours (cosine, query excluded)."""

    def neighbours(embeddings: np.ndarray) -> np.ndarray:
        scores = embeddings.astype(np.float64) @ embeddings.astype(np.float64).T
        np.fill_diagonal(scores, -np.inf)
        return np.argsort(-scores, axis=1, kind="stable")[:, :k]

    ours, ref = neighbours(other), neighbours(reference)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ours, ref, strict=True)]))


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def measure(args) -> tuple[list, list]:
    rows, notes = [], []
    threads = torch.get_num_threads()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    for size in args.sizes:
        model, calibration, evaluation, described = model_and_images(size)
        data_config = model.data_config
        inputs = calibration_inputs(data_config, evaluation, limit=len(evaluation))
        with tempfile.TemporaryDirectory(prefix="visreg-int8-bench-") as folder:
            fp32 = Path(folder) / "fp32.onnx"
            start = time.perf_counter()
            # why: in a child process, so the exporter's GBs go back to the OS before quantising (the shared
            # 24 GiB machine OOM-killed the single-process version three times)
            subprocess.run([sys.executable, __file__, "--export-only", size, str(fp32)], check=True)
            notes.append(
                f"{size} fp32 export + validation (child process) {time.perf_counter() - start:.0f} s"
            )
            variants = {PEER: None, "ORT int8 dynamic": None, "ORT int8 static": calibration}
            sessions, embeddings = {}, {}
            for name, images in variants.items():
                path = fp32 if name == PEER else Path(folder) / f"{name.replace(' ', '-')}.onnx"
                start = time.perf_counter()
                if name != PEER:
                    data = None if images is None else calibration_inputs(data_config, images)
                    method = quantize_int8(fp32, path, input_name="pixel_values", calibration=data)
                    check = validate_onnx(
                        model, path, batch_sizes=(1, 3), min_cosine=0.98, raise_on_failure=False
                    )  # int8 graphs are judged by cosine, as export_onnx(int8=True) does
                    notes.append(
                        f"{size} {name} ({method}): {time.perf_counter() - start:.0f} s; min cosine vs torch "
                        f"fp32 on random inputs {check.min_cosine:.4f}"
                    )
                sessions[name] = OnnxEmbedder(path, providers="cpu", intra_op_num_threads=threads)
                embeddings[name] = unit(
                    np.concatenate(
                        [sessions[name].run(inputs[i : i + 8])[0] for i in range(0, len(inputs), 8)]
                    )
                )
                notes.append(f"{size} {name}: file {path.stat().st_size / 2**20:.1f} MiB")
            quality = {
                name: (recall_at_k(embeddings[PEER], embeddings[name]),
                       float((embeddings[PEER] * embeddings[name]).sum(1).min()))
                for name in variants
            }  # fmt: skip
            for batch in args.batch_sizes:
                feed = np.ascontiguousarray(np.resize(inputs, (batch, *inputs.shape[1:])))
                runners = {name: (lambda s=s, f=feed: s.run(f)) for name, s in sessions.items()}
                for run in runners.values():
                    run()
                times = {name: [] for name in runners}
                for _ in range(args.repeats):
                    for name, run in runners.items():
                        start = clock()
                        run()
                        times[name].append(clock() - start)
                for name, values in times.items():
                    rows.append((size, described, batch, name, statistics.median(values), *quality[name]))
                print(f"{size} batch {batch}: done", file=sys.stderr)
    return rows, notes


def render(args, rows, notes, load_start: float, command: str) -> str:
    peer = {(r[0], r[2]): r[4] for r in rows if r[3] == PEER}
    table = [
        f"| model | batch | runtime | {'CPU ' if args.clock == 'cpu' else ''}ms per batch (median) | "
        f"{'images per CPU-second' if args.clock == 'cpu' else 'images/s'} "
        "| ratio to ORT fp32 "
        "| recall@10 vs fp32 | min cosine vs fp32 |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for size, _, batch, name, seconds, recall, cosine in rows:
        table.append(
            f"| {size} | {batch} | {name} | {1e3 * seconds:,.1f} | {batch / seconds:,.1f} | "
            f"{peer[(size, batch)] / seconds:.2f}x | {recall:.3f} | {cosine:.4f} |"
        )
    images = sorted({(r[0], r[1]) for r in rows})
    device = _measure.device_description(torch.device("cpu"), threads="torch and ORT threads")
    lines = [
        f"## int8 ONNX Runtime vs ORT fp32 (cpu{', CPU time' if args.clock == 'cpu' else ''})",
        "",
        f"- Date: {dt.date.today().isoformat()}",
        f"- Device: {device}",
        f"- Clock: {CLOCKS[args.clock]}",
        f"- Versions: {versions()}",
        f"- Command: `{command}`",
        f"- Load average (1 min) at start / end: {load_start:.1f} / {os.getloadavg()[0]:.1f} "
        "(other jobs on the machine; interleaved rounds keep the ratios fair)",
        f"- Images: {'; '.join(f'{size}: {text}' for size, text in images)}. Model only (preprocessed "
        f"images, no decoding); 1 warm-up call, median of {args.repeats} interleaved rounds.",
        "- Goal (issue 14): int8 >= 1.8x ORT fp32 with recall@10 >= 0.98 against the fp32 embeddings.",
        "",
        *table,
        "",
        *(f"- {note}" for note in notes),
    ]
    return "\n".join(lines) + "\n"


def export_only(size: str, path: str) -> None:
    model, *_ = model_and_images(size)
    export_onnx(model, path, validation_batch_sizes=(1, 3))


def main() -> None:
    if sys.argv[1:2] == ["--export-only"]:
        export_only(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", default="vit-s16,bundled", help="comma-separated: named sizes or 'bundled'"
    )
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="ORT intra-op threads (default: usable cores)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="what a timing measures")
    parser.add_argument("--append-doc", action="store_true", help=f"write the section into {DOC}")
    args = parser.parse_args()
    args.sizes = args.sizes.split(",")
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    load_start = os.getloadavg()[0]
    command = "python benchmarks/int8.py " + shlex.join(sys.argv[1:])
    rows, notes = measure(args)
    text = render(args, rows, notes, load_start, command.strip())
    print(text)
    if args.append_doc:
        key = "cpu" if args.clock == "wall" else "cpu-clock"  # one section per clock
        _doc.write_section(DOC, key, text, script="benchmarks/int8.py")


if __name__ == "__main__":
    main()
