"""Search throughput and recall of EmbeddingIndex against a plain torch matmul + topk and raw FAISS.

Rows (same database and queries, same thread count, in one run):

* ``torch matmul + topk``: the peer a user would write by hand (exact, chunked over queries).
* ``faiss IndexFlatIP (raw)``: FAISS without our wrapper, to show what the wrapper costs.
* ``EmbeddingIndex flat``: ours, exact.
* ``EmbeddingIndex ivf`` / ``hnsw``: approximate; recall@10 is measured against the exact top 10.

Usage::

    .venv/bin/python benchmarks/index.py                      # print the markdown table
    .venv/bin/python benchmarks/index.py --append-doc         # also append it to docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import _measure  # noqa: E402

from visreg_hub.retrieval import EmbeddingIndex, recall_at_k  # noqa: E402


def torch_topk(database: torch.Tensor, queries: torch.Tensor, k: int, chunk: int = 256) -> np.ndarray:
    ids = [
        (queries[i : i + chunk] @ database.T).topk(k, dim=1).indices for i in range(0, len(queries), chunk)
    ]
    return torch.cat(ids).numpy()


def make_data(name: str, n: int, q: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors: ``random`` (isotropic, no structure: the worst case for approximate indexes) or
    ``clustered`` (1,000 Gaussian clusters, closer to real embeddings, which have low intrinsic dimension)."""
    rng = np.random.default_rng(0)
    if name == "random":
        database = rng.standard_normal((n, dim), dtype=np.float32)
        queries = rng.standard_normal((q, dim), dtype=np.float32)
    elif name == "clustered":
        centres = rng.standard_normal((1000, dim), dtype=np.float32)
        database = centres[rng.integers(0, 1000, n)] + 0.5 * rng.standard_normal((n, dim), dtype=np.float32)
        queries = centres[rng.integers(0, 1000, q)] + 0.5 * rng.standard_normal((q, dim), dtype=np.float32)
    else:
        raise SystemExit(f"unknown --data {name!r}; use random or clustered")
    database /= np.linalg.norm(database, axis=1, keepdims=True)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return database, queries


def run_one(database: np.ndarray, queries: np.ndarray, args, faiss) -> list[tuple]:
    """All methods on one dataset: (method, build s, queries/s, ratio to torch, recall@k) rows.

    Every method is built first; then the searches run in interleaved rounds (each round times every
    method once) and each method keeps its best round, so a burst of load from other processes hits all
    methods alike instead of biasing one row.
    """
    q, k, dim = len(queries), args.k, database.shape[1]
    db_t, q_t = torch.from_numpy(database), torch.from_numpy(queries)
    raw = faiss.IndexFlatIP(dim)
    raw.add(database)
    methods = [  # (name, build seconds, search function returning (Q, k) ids)
        ("torch matmul + topk (peer)", 0.0, lambda: torch_topk(db_t, q_t, k)),
        ("faiss IndexFlatIP (raw)", 0.0, lambda: raw.search(queries, k)[1]),
    ]
    ivf_variants = [(f" nlist={args.nlist} nprobe={p}", {"nprobe": p}) for p in (8, 32)]
    hnsw_variants = [(f" m={args.hnsw_m} ef_search={e}", {"ef_search": e}) for e in (64, 256)]
    builds = [
        ("flat", dict(kind="flat"), [("", {})]),
        ("ivf", dict(kind="ivf", nlist=args.nlist), ivf_variants),
        ("hnsw", dict(kind="hnsw", m=args.hnsw_m), hnsw_variants),
    ]
    for kind, build, variants in builds:
        start = time.perf_counter()
        index = EmbeddingIndex(dim, **build)
        index.add(database)
        build_s = time.perf_counter() - start
        print(f"built {kind} in {build_s:.1f} s", file=sys.stderr)
        for suffix, knobs in variants:

            def search(index=index, knobs=knobs):
                for attr, value in knobs.items():  # several variants share one index
                    setattr(index, attr, value)
                return index.search(queries, k).ids

            methods.append((f"EmbeddingIndex {kind}{suffix}", build_s, search))

    exact = methods[0][2]()
    outputs = [method() for _, _, method in methods]  # warm-up
    best = [float("inf")] * len(methods)
    for _ in range(args.repeats):
        for i, (_, _, method) in enumerate(methods):
            start = time.perf_counter()
            method()
            best[i] = min(best[i], time.perf_counter() - start)
    torch_qps = q / best[0]
    return [
        (name, build_s, q / seconds, q / seconds / torch_qps, recall_at_k(ids, exact))
        for (name, build_s, _), seconds, ids in zip(methods, best, outputs, strict=True)
    ]


def load_average() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "n/a"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="database vectors")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--nlist", type=int, default=256)
    parser.add_argument("--hnsw-m", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--data", default="random,clustered", help="comma-separated: random, clustered")
    parser.add_argument("--append-doc", action="store_true", help="append the table to docs/benchmarks.md")
    args = parser.parse_args()

    import faiss

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    q, k = args.queries, args.k
    load_at_start = load_average()  # other processes on the machine make absolute numbers noisy
    rows = []  # (data, method, build s, queries/s, ratio to torch, recall@k)
    for data_name in args.data.split(","):
        database, queries = make_data(data_name, args.n, q, args.dim)
        rows.extend((data_name, *row) for row in run_one(database, queries, args, faiss))

    command = "python benchmarks/index.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = [
        f"## Retrieval: EmbeddingIndex search vs torch matmul + topk ({dt.date.today().isoformat()})",
        "",
        f"- device: {_measure.cpu_model()}, {args.threads} threads (CPU only); 1-min load average at start "
        f"{load_at_start} on {os.cpu_count()} cores",
        f"- versions: faiss {faiss.__version__}, torch {torch.__version__}, numpy {np.__version__}",
        f"- data: {args.n:,} x {args.dim} float32 unit vectors ({args.data}), {q:,} queries, k={k}, "
        f"inner product; best of {args.repeats} interleaved rounds after a warm-up; "
        "build = add (+ IVF training)",
        f"- command: `{command.strip()}`",
        "",
        f"| data | method | build (s) | queries/s | vs torch | recall@{k} vs exact |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for data_name, name, build_s, qps, ratio, recall in rows:
        lines.append(f"| {data_name} | {name} | {build_s:.1f} | {qps:,.0f} | {ratio:.2f}x | {recall:.3f} |")
    lines.append("")
    table = "\n".join(lines)
    print(table)
    if args.append_doc:
        doc = ROOT / "docs" / "benchmarks.md"
        if not doc.exists():
            doc.write_text("# Benchmarks\n\n", encoding="utf-8")
        with doc.open("a", encoding="utf-8") as handle:
            handle.write("\n" + table)
        print(f"appended to {doc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
