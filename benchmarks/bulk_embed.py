"""Bulk embedding (`embed_dataset`, resumable shards) against in-process `encode()` on the same files.

One run, same files, same model, same thread count, each measurement in a fresh process (so peak RSS is
that job's own):

* throughput: images/s of ``encode(model, paths)`` vs ``embed_dataset(folder, out)`` on 4N images, in
  one process, alternating, median of 3 (a shared machine's load swings too much for separate runs);
* memory: peak RSS of both at N and 4N images, each in a fresh process (bulk should stay flat);
* resume cost: the bulk job SIGKILLed at a random moment and re-run; seconds lost per kill = (time of the
  killed attempt + the re-run) - an uninterrupted run.

    python benchmarks/bulk_embed.py --n 2000 --append-doc
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import _doc  # noqa: E402  (benchmarks/, the script's own folder)

MODEL = "vit-mini-p7-fmnist"

CHILD = """
import json, resource, sys, time
from pathlib import Path
kind, folder, out, model = sys.argv[1:5]
from visreg_hub.hub import from_pretrained
net = from_pretrained(model, backend="torch")
paths = sorted(Path(folder).rglob("*.png"))
start = time.perf_counter()
if kind == "encode":
    from visreg_hub.inference import encode
    encode(net, paths, batch_size=64)
else:
    from visreg_hub.bulk import embed_dataset
    embed_dataset(folder, out, model=net, shard_size=500, batch_size=64)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "images": len(paths),
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def child(kind: str, folder: Path, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", CHILD, kind, str(folder), str(out), MODEL], env=env,
                            capture_output=True, text=True, check=False)  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def resume_cost(folder: Path, tmp: Path, full: float, kills: int, seed: int = 0) -> list[float]:
    """Seconds lost per kill: (killed attempt + re-run) - uninterrupted, one kill per job."""
    rng = random.Random(seed)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    lost = []
    for attempt in range(kills):
        out = tmp / f"resume-{attempt}"
        start = time.perf_counter()
        command = [sys.executable, "-c", CHILD, "bulk", str(folder), str(out), MODEL]
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, 0.8) * full)
        process.send_signal(signal.SIGKILL)
        process.wait()
        killed = time.perf_counter() - start
        again = timed_child("bulk", folder, out)  # wall time with start-up, like the uninterrupted run's
        lost.append(killed + again["wall"] - full)
    return lost


def timed_child(kind: str, folder: Path, out: Path) -> dict:
    start = time.perf_counter()
    row = child(kind, folder, out)
    row["wall"] = time.perf_counter() - start
    return row


def throughput(folder: Path, tmp: Path, repeats: int = 3) -> tuple[float, float]:
    """Median seconds of encode() and of embed_dataset on the same files, alternating in this process."""
    import shutil
    import statistics

    from visreg_hub.bulk import embed_dataset
    from visreg_hub.hub import from_pretrained
    from visreg_hub.inference import encode

    net = from_pretrained(MODEL, backend="torch")
    paths = sorted(folder.rglob("*.png"))
    encode(net, paths[:256], batch_size=64)  # warm-up: backend set-up, caches
    times: dict[str, list[float]] = {"encode": [], "bulk": []}
    for attempt in range(repeats):
        start = time.perf_counter()
        encode(net, paths, batch_size=64)
        times["encode"].append(time.perf_counter() - start)
        out = tmp / f"throughput-{attempt}"
        start = time.perf_counter()
        embed_dataset(folder, out, model=net, shard_size=500, batch_size=64)
        times["bulk"].append(time.perf_counter() - start)
        shutil.rmtree(out)
    return statistics.median(times["encode"]), statistics.median(times["bulk"])


def main() -> None:
    global MODEL  # why: every child process and the throughput loop read the module's model name
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=2000, help="images (the memory check also runs 4N)")
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--model", default=MODEL, help=f"registry name or folder (default {MODEL})")
    parser.add_argument(
        "--append-doc",
        action="store_true",
        help="write (or replace) this model's section of docs/benchmarks.md",
    )
    args = parser.parse_args()
    MODEL = args.model
    from tests.bulk.helpers import write_tile_folder

    with tempfile.TemporaryDirectory(prefix="bulk-bench-") as tmp_name:
        tmp = Path(tmp_name)
        write_tile_folder(tmp / "small", args.n)
        write_tile_folder(tmp / "large", 4 * args.n)
        rows = {}
        for size in ("small", "large"):
            rows[("encode", size)] = timed_child("encode", tmp / size, tmp / "unused")
            rows[("bulk", size)] = timed_child("bulk", tmp / size, tmp / f"out-{size}")
        full = rows[("bulk", "small")]["wall"]
        lost = resume_cost(tmp / "small", tmp, full, args.kills)
        encode_s, bulk_s = throughput(tmp / "large", tmp)
    import torch

    images = 4 * args.n
    lines = ["| job | images | median seconds (3 runs, alternating) | images/s | vs encode() |",
             "|---|---|---|---|---|",
             f"| encode() | {images} | {encode_s:.2f} | {images / encode_s:.0f} | 1.00x |",
             f"| embed_dataset | {images} | {bulk_s:.2f} | {images / bulk_s:.0f} | "
             f"{encode_s / bulk_s:.2f}x |",
             "", "| job (fresh process) | images | peak RSS MiB |", "|---|---|---|"]  # fmt: skip
    for (kind, _size), row in rows.items():
        name = "embed_dataset" if kind == "bulk" else "encode()"
        lines.append(f"| {name} | {row['images']} | {row['peak_rss'] / 2**20:.0f} |")
    text = (
        f"## Bulk embedding vs in-process encode() ({dt.date.today().isoformat()})\n\n"
        f"Device: {platform.machine()} CPU, {os.cpu_count()} cores (shared, busy); "
        f"torch {torch.__version__}; "
        f"model {MODEL}, torch backend on both sides; PNG tiles cut from tests/fixtures/photos; "
        f"shard size 500, batch 64, "
        f"every job in a fresh process. Command: `{shlex.join(['python', *sys.argv])}`\n\n"
        + "\n".join(lines)
        + f"\n\nResume cost ({args.kills} jobs of {args.n} images, each SIGKILLed once at 30-80 % of an "
        f"uninterrupted run, then re-run): seconds lost per kill {', '.join(f'{x:.1f}' for x in lost)} "
        f"(killed attempt + re-run - uninterrupted run of {full:.1f} s wall, each with process start-up "
        f"and model loading; at most one shard of work plus one start-up can be lost).\n"
    )
    print(text)
    if args.append_doc:  # one section per model: a re-run replaces it, other sections stay
        key = f"cpu-{Path(MODEL).name}"
        _doc.write_section(ROOT / "docs" / "benchmarks.md", key, text, script="benchmarks/bulk_embed.py")


if __name__ == "__main__":
    main()
