"""``python -m export.benchmark FILE.onnx``: images/s of an exported graph alone, per batch size.

Times :meth:`visreg_hub.inference.onnx.OnnxEmbedder.run` on random inputs of the graph's kind (normalised
float32, or uint8 images for graphs with baked preprocessing), after warm-up runs; reports the provider
that actually ran. For ONNX Runtime against torch eager and torch.compile in the same run, use
``benchmarks/onnx_runtime.py``.

    python -m export.benchmark vit-b16.onnx --batch-sizes 1,32,256 --provider cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from visreg_hub.cli_export import parse_batch_sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.benchmark", description=__doc__.splitlines()[0])
    parser.add_argument("onnx", help="the .onnx file")
    parser.add_argument("--batch-sizes", type=parse_batch_sizes, default=(1, 8, 32), help="default 1,8,32")
    parser.add_argument("--provider", help="cpu, cuda or tensorrt (default: the best available)")
    parser.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: all cores)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    from visreg_hub.errors import VisregHubError
    from visreg_hub.inference.onnx import OnnxEmbedder

    try:  # a bad path or file is one line naming it, as in export.validate (not a traceback)
        embedder = OnnxEmbedder(args.onnx, providers=args.provider, intra_op_num_threads=args.threads)
    except (VisregHubError, OSError) as exc:
        print(f"export.benchmark: error: {exc}", file=sys.stderr)
        return 1
    meta, rng = embedder.metadata, np.random.default_rng(0)
    print(f"{args.onnx}: {meta.model_name} {meta.precision}, provider {embedder.active_provider}")
    batch_sizes = args.batch_sizes
    if not meta.dynamic_batch:  # ONNX Runtime refuses any other batch size for a fixed-batch graph
        skipped = [batch for batch in batch_sizes if batch != 1]
        batch_sizes = (1,)
        if skipped:
            print(f"note: the graph was exported with a fixed batch of 1 (--static-batch); skipping batch "
                  f"sizes {','.join(map(str, skipped))}")  # fmt: skip
    print("| batch | median ms | images/s |\n|---:|---:|---:|")
    for batch in batch_sizes:
        height, width = meta.image_size
        if meta.has_preprocessing:
            shape = (batch, height, width, 3) if meta.input_layout == "NHWC" else (batch, 3, height, width)
            inputs = rng.integers(0, 256, shape, dtype=np.uint8)
        else:
            channels = meta.data_config["input_size"][0]
            inputs = rng.standard_normal((batch, channels, height, width), dtype=np.float32)
        for _ in range(args.warmup):
            embedder.run(inputs, ["embedding"])
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            embedder.run(inputs, ["embedding"])
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        print(f"| {batch} | {1e3 * median:.1f} | {batch / median:,.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
