"""`index build --kind auto` under memory budgets against plain FAISS flat search (the exact reference).

Synthetic clustered unit vectors (1,000 Gaussian clusters, 256-d) are written as parquet shards, then
for each budget a fresh process runs ``build_index(kind="auto", max_memory=budget)`` and reports build
time, peak RSS, the index's FAISS memory estimate and file size, and recall@10 measured by the build
against exact search. The reference row is ``faiss.IndexFlatIP`` over the same vectors (exact: recall
1.0), built and searched in its own fresh process, with its peak RSS.

The issue's setting is N = 1,000,000 with budgets 256 MB and 1 GB. ``--scale s`` runs N * s vectors with
budgets * s (the same bytes per vector, so auto makes the same choices) when the full size does not
fit the machine's time.

    python benchmarks/index_build.py --scale 0.125 --append-doc
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import _doc  # noqa: E402  (benchmarks/, the script's own folder)

DIM = 256


def write_shards(folder: Path, n: int, seed: int = 0, per_shard: int = 100_000) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((1000, DIM)).astype(np.float32)
    for number, start in enumerate(range(0, n, per_shard)):
        rows = min(per_shard, n - start)
        data = centres[rng.integers(0, 1000, rows)] + 0.5 * rng.standard_normal((rows, DIM), dtype=np.float32)
        data /= np.linalg.norm(data, axis=1, keepdims=True)
        column = pa.FixedSizeListArray.from_arrays(pa.array(data.reshape(-1)), DIM)
        paths = pa.array([f"img_{start + i}.jpg" for i in range(rows)])
        pq.write_table(pa.table({"path": paths, "embedding": column}), folder / f"part-{number:05d}.parquet")


def child_build(folder: str, budget: int, out: str) -> dict:
    from visreg_hub.retrieval.build import build_index

    start = time.perf_counter()
    index = build_index([folder], out, kind="auto", max_memory=budget, target_recall=0.95, num_queries=1000)
    seconds = time.perf_counter() - start
    info = index.build_info
    return {"factory": info["factory"], "seconds": seconds, "recall": info["recall_at_10"],
            "estimated_bytes": info["estimated_bytes"], "nprobe": info["nprobe"],
            "file_bytes": (Path(out) / "index.faiss").stat().st_size,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # fmt: skip


def child_flat(folder: str) -> dict:
    import faiss

    from visreg_hub.retrieval.sources import iter_batches, open_sources

    start = time.perf_counter()
    index = faiss.IndexFlatIP(DIM)
    for vectors, _ in iter_batches(open_sources([folder])):
        index.add(vectors)
    seconds = time.perf_counter() - start
    return {"factory": "IndexFlatIP (plain FAISS)", "seconds": seconds, "recall": 1.0,
            "estimated_bytes": index.ntotal * DIM * 4, "nprobe": None, "file_bytes": None,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # fmt: skip


def run_child(*args: str) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True,
                            check=False, env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", type=float, default=1.0, help="N and budgets times this (default 1)")
    parser.add_argument(
        "--append-doc",
        action="store_true",
        help="write (or replace) this scale's section of docs/benchmarks.md",
    )
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        row = child_build(rest[0], int(rest[1]), rest[2]) if kind == "build" else child_flat(rest[0])
        print(json.dumps(row))
        return
    n = int(1_000_000 * args.scale)
    budgets = [int(256 * 2**20 * args.scale), int(2**30 * args.scale)]
    with tempfile.TemporaryDirectory(prefix="index-bench-") as tmp:
        data = Path(tmp) / "shards"
        data.mkdir()
        write_shards(data, n)
        rows = [("plain FAISS flat", run_child("flat", str(data)))]
        for budget in budgets:
            row = run_child("build", str(data), str(budget), str(Path(tmp) / f"idx-{budget}"))
            rows.append((f"auto, {budget / 2**20:.0f} MiB", row))
    flat = rows[0][1]
    lines = [
        "| index | factory | build s | x flat build | peak RSS MiB | FAISS MiB (est.) | file MiB "
        "| recall@10 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, row in rows:
        file_mib = "" if row["file_bytes"] is None else f"{row['file_bytes'] / 2**20:.1f}"
        lines.append(
            f"| {label} | {row['factory']} | {row['seconds']:.1f} | "
            f"{row['seconds'] / flat['seconds']:.1f}x | "
            f"{row['peak_rss'] / 2**20:.0f} | {row['estimated_bytes'] / 2**20:.1f} | {file_mib} | "
            f"{row['recall']:.3f} |"
        )
    import faiss

    header = (
        f"## index build --kind auto vs plain FAISS flat ({dt.date.today().isoformat()})\n\n"
        f"Device: {platform.machine()} CPU, {os.cpu_count()} cores (shared, busy), "
        f"faiss {faiss.__version__}, "
        f"numpy {np.__version__}. N = {n:,} clustered unit vectors, {DIM}-d; budgets "
        f"{', '.join(f'{b / 2**20:.0f} MiB' for b in budgets)} (the issue's 1M / 256 MB / 1 GB scaled by "
        f"{args.scale}, same bytes per vector). Recall@10: 1,000 held-out queries vs exact search, measured "
        f"by the build. Command: `{shlex.join(['python', *sys.argv])}`\n"
    )
    text = header + "\n" + "\n".join(lines) + "\n"
    print(text)
    if args.append_doc:  # one section per scale: a re-run replaces it, other sections stay
        key = "cpu" if args.scale == 1 else f"cpu-scale-{args.scale:g}"
        _doc.write_section(ROOT / "docs" / "benchmarks.md", key, text, script="benchmarks/index_build.py")


if __name__ == "__main__":
    main()
