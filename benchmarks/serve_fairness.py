"""A small request behind a large one: `visreg-hub serve` of this checkout vs a baseline checkout.

One client sends requests of --large-images real photos (the four photos of tests/fixtures/photos,
enlarged to --large-side px and saved as PNG, so that decoding them costs what a camera photo costs)
back to back; --small-clients clients each send one-image requests (a bundled example photo), one after
another, for --seconds. Reported per server: the small requests' p50 / p99 latency, the large requests'
images/s, and answers other than 200. With ``--baseline DIR`` (a checkout of an earlier commit, e.g.
``git worktree add /tmp/base 34984b3``) the same load also hits a server started from that checkout; the
two alternate for --rounds rounds, so both see the same machine.

    python benchmarks/serve_fairness.py --baseline /tmp/base     # appends to docs/benchmarks.md
    python benchmarks/serve_fairness.py --dry-run                # seconds: this checkout, prints only
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import io
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import _doc  # noqa: E402
import _measure  # noqa: E402
from serve import Server, percentile_ms  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
MODEL = "vit-tiny-p8-colour"
SMALL = ROOT / "demo" / "assets" / "photo-examples" / "mountain4.jpg"


def large_payloads(side: int) -> list[str]:
    """The fixture photos enlarged to ``side`` px on the long side, as base64 PNG (slow to decode)."""
    payloads = []
    for path in sorted((ROOT / "tests" / "fixtures" / "photos").glob("*.jpg")):
        image = Image.open(path).convert("RGB")
        scale = side / max(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        payloads.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return payloads


async def _mixed_load(url: str, large: list[str], small: str, args) -> dict:
    """The large client and the small clients together for ``args.seconds``; what each measured."""
    small_latencies: list[float] = []
    large_images, statuses = 0, {}
    deadline = time.perf_counter() + args.seconds
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:

        async def post(inputs: list[str]) -> int:
            try:
                body = {"input": inputs, "encoding_format": "base64"}
                response = await client.post("/v1/embeddings", json=body)
                status = response.status_code
            except httpx.HTTPError:
                status = -1
            statuses[status] = statuses.get(status, 0) + 1
            return status

        async def large_client() -> None:
            nonlocal large_images
            batch = [large[i % len(large)] for i in range(args.large_images)]
            while time.perf_counter() < deadline:
                if await post(batch) == 200:
                    large_images += len(batch)

        async def small_client() -> None:
            await asyncio.sleep(0.5)  # the large client's first request is decoding
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                if await post([small]) == 200:
                    small_latencies.append(time.perf_counter() - started)
                await asyncio.sleep(0.05)

        started = time.perf_counter()
        await asyncio.gather(large_client(), *(small_client() for _ in range(args.small_clients)))
        seconds = time.perf_counter() - started
    return {"small": small_latencies, "large_rate": large_images / seconds, "statuses": statuses}


def commit_of(root: Path) -> str:
    done = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True)  # fmt: skip
    return done.stdout.strip() or "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="a checkout of an earlier commit to measure beside")
    parser.add_argument("--large-images", type=int, default=64, help="images per large request")
    parser.add_argument("--large-side", type=int, default=1600, help="long side of the large images, px")
    parser.add_argument("--small-clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=30.0, help="per server and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes, print only")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.large_images, args.large_side, args.seconds, args.rounds = 8, 400, 3.0, 1
    torch.set_num_threads(args.threads)  # Server passes it on as OMP_NUM_THREADS
    large = large_payloads(args.large_side)
    small = base64.b64encode(SMALL.read_bytes()).decode("ascii")
    servers = {f"this checkout ({commit_of(ROOT)})": ROOT}
    if args.baseline is not None:
        servers[f"baseline ({commit_of(args.baseline)})"] = args.baseline.resolve()
    results: dict[str, list[dict]] = {name: [] for name in servers}
    load_start = _measure.load_average()
    for _ in range(args.rounds):
        for name, root in servers.items():
            # bodies of ~80 MB (64 base64 PNGs of about 1 MB): above the default --max-body-bytes
            server = Server(MODEL, "cpu", 32, 5.0, 1024, "torch", root=root,
                            extra=("--max-body-bytes", str(256 * 2**20)))  # fmt: skip
            try:
                results[name].append(asyncio.run(_mixed_load(server.url, large, small, args)))
            finally:
                server.stop()
    failed = [(name, run["statuses"]) for name, runs in results.items() for run in runs
              if not run["large_rate"]]  # fmt: skip
    if failed:  # every large request refused: the table would measure nothing
        print(f"no large request was answered 200 ({failed}); nothing written", file=sys.stderr)
        return 1
    columns = ["server", "round", "small p50 ms", "small p99 ms", "small requests", "large img/s", "non-200"]
    rows = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for name, runs in results.items():
        for number, run in enumerate(runs, 1):
            other = sum(count for status, count in run["statuses"].items() if status != 200)
            p50, p99 = percentile_ms(run["small"], 50), percentile_ms(run["small"], 99)
            rows.append(
                f"| {name} | {number} | {p50:.0f} | {p99:.0f} | {len(run['small'])} | "
                f"{run['large_rate']:.1f} | {other} |"
            )
    print("\n".join(rows))
    command = " ".join(["python benchmarks/serve_fairness.py", *(argv if argv is not None else sys.argv[1:])])
    text = "\n".join([
        "## HTTP service: a small request behind a large one (cpu)\n",
        f"- Date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Device: {_measure.cpu_model()}, {os.cpu_count()} cores; 1-min load average {load_start} at "
        f"start, {_measure.load_average()} at the end",
        f"- Versions: Python {platform.python_version()}, torch {torch.__version__}",
        f"- Command: `{command}`",
        f"- Load: one client sends requests of {args.large_images} PNG photos ({args.large_side} px long "
        f"side) back to back; {args.small_clients} clients send one-image requests (a "
        f"{SMALL.stat().st_size // 1024} kB JPEG) with 50 ms between them, for {args.seconds:g} s per server "
        f"and round; `visreg-hub serve --model {MODEL} --max-body-bytes {256 * 2**20}` (torch, "
        f"{args.threads} thread(s), 2 decode threads, batches of 32)",
        "",
        *rows,
    ])  # fmt: skip
    if not args.dry_run:
        _doc.write_section(DOC, "cpu", text, script="benchmarks/serve_fairness.py")
        print(f"wrote the cpu section of {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
