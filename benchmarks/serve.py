"""`visreg-hub serve` under load vs direct in-process ``encode()`` of the same images, in the same run.

For each model (the bundled ``vit-mini-p7-fmnist`` and a ViT-S/16-sized model, 22 M parameters, 224 px,
random weights: speed does not depend on them) and each client concurrency (1, 8, 32, 64), N requests of
one real image each go through a real server process (uvicorn, dynamic batching, base64 JSON), and the
same N images go through ``model.encode(images, batch_size=B)`` in this process with B = the batch the
server can form at that concurrency (min(concurrency, --max-batch-size)). The two are measured back to
back per row, so their ratio is fair on a busy machine. Then an overload run floods a server whose queue
holds --overload-queue images: it must answer 429 (never 5xx), keep p99 latency bounded and its memory
flat.

    python benchmarks/serve.py                    # CPU, both models, appends to docs/benchmarks.md
    python benchmarks/serve.py --dry-run          # seconds: bundled model, 2 levels, prints only
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import _doc  # noqa: E402
import _measure  # noqa: E402

import visreg_hub  # noqa: E402
from visreg_hub.models import ModelConfig, VISRegEncoder  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def vit_s16(folder: Path) -> Path:
    """A ViT-S/16 (384 wide, 12 blocks, 6 heads, 224 px) with random weights, saved as a model folder."""
    config = ModelConfig(
        architecture="vit_small_patch16_224", img_size=224, patch_size=16, embed_dim=384, depth=12,
        num_heads=6, name="vit-s16-random",
    )  # fmt: skip
    torch.manual_seed(0)
    VISRegEncoder(config).eval().save_pretrained(folder)
    return folder


def images_for(model_name: str) -> list[bytes]:
    """Real images at the model's scale: Fashion-MNIST PNGs for the bundled model, photos for ViT-S."""
    if model_name == "bundled":
        return [p.read_bytes() for p in sorted((ROOT / "demo" / "assets" / "gallery").glob("*/*.png"))[:64]]
    return [p.read_bytes() for p in sorted((ROOT / "tests" / "fixtures" / "photos").glob("*.jpg"))]


class Server:
    """``python -m visreg_hub.cli serve`` in a subprocess."""

    def __init__(
        self,
        model_arg: str,
        device: str,
        max_batch_size: int,
        max_wait_ms: float,
        max_queue: int,
        backend: str,
        root: Path = ROOT,
        extra: tuple[str, ...] = (),
    ):
        """``root``: the checkout whose ``visreg_hub`` serves (another one measures an earlier version);
        ``extra``: more ``serve`` flags."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [
            sys.executable, "-m", "visreg_hub.cli", "serve", "--model", model_arg, "--port", str(self.port),
            "--device", device, "--max-batch-size", str(max_batch_size), "--max-wait-ms", str(max_wait_ms),
            "--max-queue", str(max_queue), "--max-items", "256", "--backend", backend, *extra,
        ]  # fmt: skip
        # ROOT first, the caller's PYTHONPATH kept (packages installed with --target live there)
        python_path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": python_path, "OMP_NUM_THREADS": str(torch.get_num_threads())}
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - closed with the process in stop()
        self.process = subprocess.Popen(command, cwd=root, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"server exited:\n{self.log.read().decode(errors='replace')}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("server not ready in 900 s")

    @property
    def rss_mb(self) -> float:
        return psutil.Process(self.process.pid).memory_info().rss / 2**20

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


async def _load(
    url: str, payloads: list[str], total: int, concurrency: int, per_request: int = 1
) -> tuple[float, list[float], dict]:
    """``total`` requests of ``per_request`` images each from ``concurrency`` clients.

    Returns:
        (wall seconds, latencies of the 200 answers, count per status; -1 = connection error).
    """
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    counter = iter(range(total))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:

        async def worker() -> None:
            for i in counter:
                batch = [payloads[(i * per_request + j) % len(payloads)] for j in range(per_request)]
                body = {"input": batch, "encoding_format": "base64"}
                started = time.perf_counter()
                try:
                    response = await client.post("/v1/embeddings", json=body)
                    status = response.status_code
                except httpx.HTTPError:
                    status = -1
                if status == 200:
                    latencies.append(time.perf_counter() - started)
                statuses[status] = statuses.get(status, 0) + 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started, latencies, statuses


def percentile_ms(values: list[float], q: float) -> float:
    return float(np.percentile(values, q) * 1000) if values else float("nan")


def measure_model(label: str, source: str, args, rows: list[str]) -> None:
    images = images_for("bundled" if label == "bundled" else "photos")
    payloads = [base64.b64encode(b).decode() for b in images]
    model = visreg_hub.from_pretrained(source, device=args.device, backend=args.backend)
    server = Server(
        f"{label}={source}",
        args.device,
        args.max_batch_size,
        args.max_wait_ms,
        max_queue=4096,
        backend=args.backend,
    )
    try:
        total = args.requests if label == "bundled" else args.requests_large
        per = args.images_per_request
        asyncio.run(_load(server.url, payloads, min(total, 16), 4))  # warm-up
        model.encode(images[:4], batch_size=4)
        for concurrency in args.concurrency:
            batch = min(concurrency * per, args.max_batch_size)
            batches_before, images_before = (
                server.metric("visreg_batch_size_count"),
                server.metric("visreg_batch_size_sum"),
            )
            wall, latencies, statuses = asyncio.run(
                _load(server.url, payloads, total // per, concurrency, per)
            )
            mean_batch = (server.metric("visreg_batch_size_sum") - images_before) / max(
                1.0, server.metric("visreg_batch_size_count") - batches_before
            )
            inputs = [images[i % len(images)] for i in range(total)]
            started = time.perf_counter()
            model.encode(inputs, batch_size=batch)
            direct = time.perf_counter() - started
            served, local = (total // per) * per / wall, total / direct
            bad = sum(n for s, n in statuses.items() if s != 200)
            rows.append(
                f"| {label} | {concurrency} x {per} | {served:.1f} | {percentile_ms(latencies, 50):.0f} | "
                f"{percentile_ms(latencies, 99):.0f} | {mean_batch:.1f} | {local:.1f} (B={batch}) | "
                f"**{served / local:.2f}x** | {bad} |"
            )
            print(rows[-1], flush=True)
    finally:
        server.stop()


def measure_overload(args) -> list[str]:
    """Flood a small-queue server with the bundled model; 429s expected, never 5xx; RSS before/peak/after."""
    images = images_for("bundled")
    payloads = [base64.b64encode(b).decode() for b in images]
    server = Server(
        "bundled=vit-mini-p7-fmnist",
        args.device,
        args.max_batch_size,
        args.max_wait_ms,
        args.overload_queue,
        backend=args.backend,
    )
    try:
        asyncio.run(_load(server.url, payloads, 64, 8))
        time.sleep(3)
        before = server.rss_mb
        peak = [before]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], server.rss_mb)
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        wall, latencies, statuses = asyncio.run(
            _load(server.url, payloads, args.overload_requests, args.overload_concurrency)
        )
        stop.set()
        sampler.join()
        time.sleep(3)
        after = server.rss_mb
        normal = httpx.post(
            server.url + "/v1/embeddings", json={"input": [payloads[0]]}, timeout=60
        ).status_code
    finally:
        server.stop()
    fivexx = sum(n for s, n in statuses.items() if s >= 500 or s < 0)
    p50, p99 = percentile_ms(latencies, 50), percentile_ms(latencies, 99)
    flood = (
        f"{args.overload_requests} one-image requests from {args.overload_concurrency} concurrent clients "
        f"at a server with `--max-queue {args.overload_queue}` ({wall:.1f} s)"
    )
    answers = f"{statuses.get(200, 0)} answered 200, {statuses.get(429, 0)} refused 429"
    return [
        f"- Flood: {flood}: {answers}, **{fivexx} 5xx or dropped**; p50/p99 of the 200s "
        f"{p50:.0f}/{p99:.0f} ms; a normal request afterwards: {normal}.",
        f"- Server RSS: {before:.0f} MB before, {peak[0]:.0f} MB peak, {after:.0f} MB after (idle 3 s).",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--backend", default="torch", choices=("torch", "onnx", "auto"), help="server and encode()"
    )
    parser.add_argument("--models", default="bundled,vit-s16", help="comma list of bundled, vit-s16")
    parser.add_argument("--concurrency", default="1,8,32,64")
    parser.add_argument("--requests", type=int, default=512, help="requests per level, bundled model")
    parser.add_argument("--requests-large", type=int, default=64, help="requests per level, ViT-S/16")
    parser.add_argument("--images-per-request", type=int, default=1)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--overload-queue", type=int, default=64)
    parser.add_argument("--overload-requests", type=int, default=1024)
    parser.add_argument("--overload-concurrency", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server and of encode()")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes, print only (seconds)")
    args = parser.parse_args(argv)
    # the same intra-op threads on both sides; 1 by default: OpenMP teams crawl on an oversubscribed machine
    torch.set_num_threads(args.threads)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    models = args.models.split(",")
    if args.dry_run:
        models, args.concurrency, args.requests = ["bundled"], [1, 8], 16
        args.overload_requests, args.overload_concurrency = 64, 32
    load_start = _measure.load_average()
    columns = [
        "model",
        "clients x images/request",
        "served img/s",
        "p50 ms",
        "p99 ms",
        "mean batch",
        "direct encode() img/s",
    ]
    columns += ["served / direct", "non-200"]
    rows = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    print("\n".join(rows), flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        for label in models:
            source = "vit-mini-p7-fmnist" if label == "bundled" else str(vit_s16(Path(scratch) / "vit-s16"))
            measure_model(label, source, args, rows)
    overload = measure_overload(args)
    print("\n".join(overload))
    device = torch.device(args.device)
    where = _measure.device_description(device) if device.type == "cuda" else _measure.cpu_model()
    command = " ".join(["python benchmarks/serve.py", *(argv if argv is not None else sys.argv[1:])])
    versions = (
        f"Python {platform.python_version()}, torch {torch.__version__}, visreg_hub {visreg_hub.__version__}"
    )
    text = "\n".join([
        f"## HTTP service: `visreg-hub serve` vs direct `encode()` ({device.type})\n",
        f"- Date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Device: {where}, {os.cpu_count()} cores; 1-min load average {load_start} at start, "
        f"{_measure.load_average()} at the end (a shared machine: compare the ratios, measured back to back)",
        f"- Versions: {versions}",
        f"- Command: `{command}`",
        f"- Server: `visreg-hub serve --max-batch-size {args.max_batch_size} "
        f"--max-wait-ms {args.max_wait_ms:g}` in its own process; server and direct encode() on the "
        f"`{args.backend}` backend with {args.threads} torch thread(s) each; clients: httpx (asyncio) in "
        "the benchmark process, "
        "base64 JSON (--images-per-request per request). The load generator shares the CPU with the "
        "server; direct encode() has it alone",
        "- Images: bundled model: 64 Fashion-MNIST PNGs of demo/assets/gallery; ViT-S/16 (random weights, "
        "224 px): the 4 JPEG photos of tests/fixtures/photos, cycled",
        "",
        *rows,
        "",
        "Overload (bundled model):",
        "",
        *overload,
    ])  # fmt: skip
    if not args.dry_run:
        _doc.write_section(DOC, device.type, text, script="benchmarks/serve.py")
        print(f"wrote the {device.type} section of {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
