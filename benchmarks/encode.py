"""End-to-end ``encode()`` throughput against model-only throughput and a hand-written timm pipeline.

Rows (same model, same JPEG files, same batch size, one run):

* ``model only``: the model's forward on pre-made, already normalised tensors (the ceiling).
* ``timm pipeline, by hand``: the loop a user would write: ``PIL.Image.open(p).convert("RGB")``, the
  transform of ``timm.data.create_transform(**model.data_config)``, ``torch.stack``, forward. The peer.
* ``timm: open + convert + transform only``: the peer's loading half alone, no model.
* ``decode + preprocess only``: our loading half alone (``ImageDataset`` + ``Collate`` through a DataLoader,
  then normalisation), no model, to show where the time goes.
* ``encode(num_workers=W)``: ours, end to end (decode JPEG from disk, preprocess, forward, L2-normalise).
  With ``num_workers=0`` the next batch is decoded in a thread while this one runs; the row
  ``pipeline without the decode thread`` is the same loop without it.
* ``encode(), one call per image`` (batch size 1 only): ``encode(model, path)`` once per image, the way a
  caller embeds images as they arrive; it pays the per-call set-up (backend lookup, loader) every image.

``--backend onnx`` runs ``encode()`` on the ONNX Runtime backend (``from_pretrained``'s default on a CPU):
then ``model only`` is the exported graph's session on pre-made tensors, the ceiling ``encode()`` is held to.

The ratio column is images/s divided by ``model only``: 1.00 means loading costs nothing extra.

On a shared machine whose cores are all busy, ``--threads 1 --clock cpu`` gives every row one intra-op
thread (torch and ONNX Runtime) and times CPU seconds of this process instead of wall time: the work each
row does, not the queue for a core. It cannot show decoding overlapping with compute (which only saves
wall time), so it measures the CPU-time bound ``model / (model + decode + overhead)``.

Images: the colour and grayscale sample photos bundled with scikit-image (300x451 to 1411x1411 px),
saved as JPEG (quality 90) and replicated to ``--num-images`` files in a temporary folder; or, with
``--images-from DIR``, the image files under DIR copied byte for byte (e.g. camera-size photos).

``--draft`` adds ``encode(draft_decode=True)`` rows (large JPEGs decoded at 1/2-1/8 scale by libjpeg) and
reports how far its embeddings are from a full decode's: the cosine similarity per distinct image and
whether each image's nearest neighbour among the others stays the same. ``--model NAME`` measures a
pretrained model (``from_pretrained``) instead of random weights of ``--size``; agreement is only
meaningful for a trained model.

Usage::

    .venv/bin/python benchmarks/encode.py                  # CPU, ViT-T/16 at 224: print the table
    .venv/bin/python benchmarks/encode.py --append-doc     # also write its section of docs/benchmarks.md
    .venv/bin/python benchmarks/encode.py --backend onnx --size vit-s16 --batch-size 1 --num-workers 0 \\
        --append-doc                                         # the ONNX Runtime backend, batch 1
    # the GPU goal, end to end within 10% of model only:
    python benchmarks/encode.py --device cuda --size vit-b16 --batch-size 256 --num-images 4096 \\
        --num-workers 0,8,16 --dtype bf16 --append-doc
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import timm.data
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import _doc  # noqa: E402
import _measure  # noqa: E402

from visreg_hub.inference import EmbeddingPipeline, backend_for, encode, set_backend  # noqa: E402
from visreg_hub.inference.inputs import expand_inputs  # noqa: E402
from visreg_hub.inference.onnx.runtime import create_session  # noqa: E402
from visreg_hub.inference.preprocess import Collate, ImageDataset, Preprocessor  # noqa: E402
from visreg_hub.models import ModelConfig, VISRegEncoder  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
CLOCKS = {
    "wall": "wall time (`time.perf_counter`)",
    "cpu": "CPU time of this process (`time.process_time`): the work each row does, not the queue for a "
    "core on a shared machine; decoding overlapped with compute saves nothing on this clock",
}
SAMPLES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
           "colorwheel", "camera", "coins", "retina")  # fmt: skip


def write_images(folder: Path, count: int, source_dir: Path | None = None) -> list[Path]:
    """``count`` JPEG files made from scikit-image's sample photos (falls back to the test fixtures), or
    the image files under ``source_dir`` copied unchanged, cycled to ``count``."""
    if source_dir is not None:
        from visreg_hub.inference.inputs import list_image_files

        originals = list_image_files(source_dir)
        if not originals:
            raise SystemExit(f"--images-from {source_dir}: no image files there")
        copies = []
        for index in range(count):
            original = originals[index % len(originals)]
            copies.append(folder / f"img_{index:05d}{original.suffix.lower()}")
            copies[-1].write_bytes(original.read_bytes())
        return copies
    try:
        import skimage.data

        sources = [Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in SAMPLES]
    except ImportError:
        photos = sorted((ROOT / "tests" / "fixtures" / "photos").glob("*.jpg"))
        sources = [Image.open(p).convert("RGB").resize((480, 360), Image.Resampling.BICUBIC) for p in photos]
    paths = []
    for index in range(count):
        path = folder / f"img_{index:05d}.jpg"
        sources[index % len(sources)].save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_rates(
    runs: list,
    paths: list[Path],
    warmup: list[Path],
    device: torch.device,
    repeats: int,
    clock=time.perf_counter,
) -> list[float]:
    """Images/s of each ``run(paths)``: best of ``repeats`` rounds after an untimed round on ``warmup``.

    Rounds interleave the runs (A B C, A B C, ...) so that load from other processes on a shared
    machine hits every row alike instead of whichever happened to run during a busy spell.
    """
    for _, run in runs:
        run(warmup)
    best = [float("inf")] * len(runs)
    for _ in range(repeats):
        for slot, (_, run) in enumerate(runs):
            synchronize(device)
            start = clock()
            run(paths)
            synchronize(device)
            best[slot] = min(best[slot], clock() - start)
    return [len(paths) / seconds for seconds in best]


def measure(args: argparse.Namespace) -> tuple[list[tuple[str, float]], str]:
    device = torch.device(args.device)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    torch.manual_seed(0)
    if args.model:
        from visreg_hub import from_pretrained

        model = from_pretrained(args.model, backend="torch", device=device).eval()
    else:
        model = VISRegEncoder(ModelConfig.from_name(args.size)).to(device).eval()
    config = model.data_config
    if args.backend == "onnx":
        set_backend(model, "onnx")
        runner = backend_for(model)  # exports (or reads the on-disk cache) before any timing
        if args.threads:
            # why: encode() has no thread knob; its cached embedder's session is swapped for one with the
            # same file and args.threads intra-op threads, which every row below then runs
            runner.embedder.session = create_session(
                runner.embedder.path, providers="cpu", intra_op_num_threads=args.threads
            ).session
        session_run = runner.embedder.run
    autocast = torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_images(Path(tmp), args.num_images, args.images_from)
        premade = torch.randn(args.batch_size, *config["input_size"], device=device)
        transform = timm.data.create_transform(**config)

        def batches(subset: list[Path]) -> list[list[Path]]:
            return [subset[i : i + args.batch_size] for i in range(0, len(subset), args.batch_size)]

        def model_only(subset: list[Path]):
            if args.backend == "onnx":
                feed = premade.numpy()
                for batch in batches(subset):
                    session_run(feed[: len(batch)])
                return
            with torch.inference_mode(), autocast:
                for batch in batches(subset):
                    model(premade[: len(batch)])

        def timm_by_hand(subset: list[Path]):
            with torch.inference_mode():
                for batch in batches(subset):
                    pixels = torch.stack([transform(Image.open(p).convert("RGB")) for p in batch]).to(device)
                    with autocast:
                        torch.nn.functional.normalize(model(pixels).float(), dim=-1).cpu()

        def timm_loading_only(subset: list[Path]):
            for batch in batches(subset):
                torch.stack([transform(Image.open(p).convert("RGB")) for p in batch])

        def loading_only(subset: list[Path], workers: int, draft: bool = False):
            preprocessor = Preprocessor(config)
            dataset = ImageDataset(expand_inputs(subset), preprocessor, draft_decode=draft)
            collate = Collate(preprocessor.output_shape)
            loader = torch.utils.data.DataLoader(
                dataset, batch_size=args.batch_size, num_workers=workers, collate_fn=collate
            )
            for batch in loader:
                preprocessor.normalize(batch.pixels.to(device))

        def encode_run(subset: list[Path], workers: int, draft: bool = False):
            return encode(
                model, subset, batch_size=args.batch_size, num_workers=workers, dtype=dtype,
                show_progress_bar=False, draft_decode=draft, convert_to_numpy=True,
            )  # fmt: skip

        runs = [
            ("model only (pre-made tensors)", model_only),
            ("timm pipeline, by hand (peer)", timm_by_hand),
            ("timm: open + convert + transform only (peer of the next rows)", timm_loading_only),
        ]
        for workers in args.num_workers:
            runs.append(
                (
                    f"decode + preprocess only, num_workers={workers}",
                    lambda subset, w=workers: loading_only(subset, w),
                )
            )
        for workers in args.num_workers:
            runs.append((f"encode(), num_workers={workers}", lambda subset, w=workers: encode_run(subset, w)))
        if args.draft:
            for workers in args.num_workers:
                runs.append(
                    (
                        f"decode + preprocess only, draft_decode=True, num_workers={workers}",
                        lambda subset, w=workers: loading_only(subset, w, draft=True),
                    )
                )
                runs.append(
                    (
                        f"encode(draft_decode=True), num_workers={workers}",
                        lambda subset, w=workers: encode_run(subset, w, draft=True),
                    )
                )
        if args.batch_size == 1:

            def per_call(subset: list[Path]):
                for path in subset:
                    encode(model, path, dtype=dtype, show_progress_bar=False)

            runs.append(("encode(), one call per image", per_call))
        if 0 in args.num_workers:

            def serial(subset: list[Path]):
                pipeline = EmbeddingPipeline(backend_for(model, dtype=dtype))
                pipeline.run(subset, batch_size=args.batch_size, prefetch=False, show_progress_bar=False)

            runs.append(("pipeline without the decode thread, num_workers=0", serial))
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        rates = best_rates(runs, paths, paths[: args.batch_size], device, args.repeats, clock)
        if args.draft:
            distinct = paths[: len(set(p.read_bytes() for p in paths))] if args.images_from else paths
            args.agreement = draft_agreement(encode_run(distinct, 0), encode_run(distinct, 0, draft=True))
    return [(name, rate) for (name, _), rate in zip(runs, rates)], _measure.device_description(device)


def draft_agreement(full: np.ndarray, draft: np.ndarray) -> str:
    """How close draft-decoded embeddings are to full-decode ones: (N, E) L2-normalised each."""
    cosine = (full * draft).sum(axis=1)
    full_sim, draft_sim = full @ full.T, draft @ draft.T
    np.fill_diagonal(full_sim, -np.inf)
    np.fill_diagonal(draft_sim, -np.inf)
    same = (full_sim.argmax(axis=1) == draft_sim.argmax(axis=1)).mean() if len(full) > 2 else float("nan")
    return (
        f"{len(full)} distinct images: cosine(full decode, draft decode) min {cosine.min():.4f}, median "
        f"{np.median(cosine):.4f}; nearest neighbour among the others unchanged for {100 * same:.0f} %"
    )


def render(args: argparse.Namespace, rows: list[tuple[str, float]], device: str, command: str) -> str:
    ceiling = rows[0][1]
    peer = rows[1][1]
    unit = "images per CPU-second" if args.clock == "cpu" else "images/s"
    table = [f"| pipeline | {unit} | ratio to model only | ratio to timm by hand |", "|---|---|---|---|"]
    table += [f"| {name} | {rate:.1f} | {rate / ceiling:.2f} | {rate / peer:.2f} |" for name, rate in rows]
    lines = [
        f"## encode(): end to end vs model only ({args.device}"
        + (f", {args.backend} backend, batch {args.batch_size}" if args.backend != "torch" else "")
        + (", CPU time)" if args.clock == "cpu" else ")"),
        "",
        f"- Date: {dt.date.today().isoformat()}",
        f"- Device: {device}",
        f"- Versions: torch {torch.__version__}, timm {timm.__version__}, Pillow {Image.__version__}, "
        f"numpy {np.__version__}",
        f"- Command: `{command}`",
        f"- Clock: {CLOCKS[args.clock]}"
        + (
            f"; every row runs with {args.threads} intra-op thread(s) (torch and ONNX Runtime)"
            if args.threads
            else ""
        ),
        f"- Load average (1 min) at start / end: {args.load_start:.1f} / {os.getloadavg()[0]:.1f} "
        f"(other jobs on the machine)",
        (
            f"- Model: `{args.model}` (pretrained), batch {args.batch_size}, dtype {args.dtype}; "
            if args.model
            else f"- Model: {args.size} (random weights; speed does not depend on them), batch "
            f"{args.batch_size}, dtype {args.dtype}; "
        )
        + (
            f"{args.num_images} files copied from `{args.images_from}` (cycled) "
            if args.images_from
            else f"{args.num_images} JPEG files (quality 90, scikit-image samples 300x451 to 1411x1411 px) "
        )
        + f"in a temporary folder; best of {args.repeats} interleaved rounds after a warm-up round on one "
        "batch.",
        *([f"- Draft decoding against a full decode: {args.agreement}"] if args.draft else []),
        "",
        *table,
        "",
    ]
    if args.device == "cpu":
        lines += [
            "On the CPU the model and the JPEG decoding share the same cores, so worker processes cannot "
            "overlap loading with compute as they do next to a GPU; the ratio to model only is bounded by "
            "decode + preprocess cost. The CPU was shared with other jobs while this ran (load average "
            "above), so absolute numbers are low and noisy; the interleaved rounds keep the ratios fair.",
            "",
            "GPU goal (not measured here: this session had no GPU): `encode()` end to end within 10 % of "
            "model-only throughput for ViT-B/16 at batch 256 (bf16), using DataLoader workers, pinned uint8 "
            "batches (4x fewer bytes than float) and normalisation on the device. To measure it: "
            "`python benchmarks/encode.py --device cuda --size vit-b16 --batch-size 256 --num-images 4096 "
            "--num-workers 0,8,16 --dtype bf16 --append-doc`.",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", default="vit-t16", help="ModelConfig.from_name size, e.g. vit-t16, vit-b16")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-images", type=int, default=128)
    parser.add_argument("--num-workers", default="0,2", help="comma-separated worker counts to measure")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--backend", default="torch", choices=("torch", "onnx"), help="encode()'s backend")
    parser.add_argument(
        "--threads", type=int, help="intra-op threads of torch and ONNX Runtime (default: theirs)"
    )
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="what a timing measures")
    parser.add_argument("--images-from", type=Path, help="copy the image files under this folder instead")
    parser.add_argument("--draft", action="store_true", help="add encode(draft_decode=True) rows")
    parser.add_argument("--model", help="a pretrained model (from_pretrained) instead of random --size")
    parser.add_argument("--append-doc", action="store_true", help=f"write the section into {DOC}")
    args = parser.parse_args()
    args.num_workers = [int(w) for w in args.num_workers.split(",")]
    if args.clock == "cpu" and (args.device != "cpu" or any(args.num_workers)):
        parser.error("--clock cpu needs --device cpu and --num-workers 0 (it counts this process only)")
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python benchmarks/encode.py " + shlex.join(sys.argv[1:])
    args.load_start = os.getloadavg()[0]
    rows, device = measure(args)
    text = render(args, rows, device, command.strip())
    sys.stdout.write(text + "\n")
    if args.append_doc:
        key = args.device.split(":")[0]
        if args.backend != "torch":
            key = f"{key}-{args.backend}-batch{args.batch_size}"
        if args.clock == "cpu":
            key += "-clock"
        if args.draft:
            key += "-draft"
        _doc.write_section(DOC, key, text, script="benchmarks/encode.py")


if __name__ == "__main__":
    main()
