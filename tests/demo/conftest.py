"""Fixtures for the demo tests: a tiny 1-channel model, a small real gallery, and one real demo server.

The server is ``python -m demo.app`` in a subprocess on a free localhost port, shared by every test of the
session that asks for it (start-up costs seconds: torch, timm and gradio imports). Its ``TMPDIR`` is a
folder of its own, so tests can see the temporary files it makes and that they go away.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.fixtures_models import tiny_encoder

REPO = Path(__file__).resolve().parents[2]
BUNDLED_GALLERY = REPO / "demo" / "assets" / "gallery"
EXAMPLES = REPO / "demo" / "assets" / "examples"
PER_CLASS = 5
SERVER_MAX_FILE_SIZE = 200 * 1024
SERVER_MAX_PIXELS = 1_000_000
SPARE_REQUEST_TIMEOUT_S = 4.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class DemoServer:
    """A running ``python -m demo.app``."""

    url: str
    process: subprocess.Popen
    root: Path
    tmpdir: Path
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


def launch_server(root: Path, args: list[str]) -> DemoServer:
    """Start ``python -m demo.app`` with ``args`` on a free port; returns at once (see wait_until_ready)."""
    tmpdir = root / "tmp"
    tmpdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, "TMPDIR": str(tmpdir), "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    env.pop("GRADIO_TEMP_DIR", None)
    log_path = root / "server.log"
    command = [sys.executable, "-m", "demo.app", "--port", str(port), "--device", "cpu", *args]
    with log_path.open("w") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    return DemoServer(f"http://127.0.0.1:{port}/", process, root, tmpdir, log_path)


def wait_until_ready(server: DemoServer, timeout: float = 180.0) -> DemoServer:
    """Poll the page until it answers 200; fail with the server's log if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"demo server exited with {server.process.returncode}:\n{server.log()}")
        try:
            if httpx.get(server.url, timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    stop_server(server)
    pytest.fail(f"demo server did not answer within {timeout} s:\n{server.log()}")


def stop_server(server: DemoServer, timeout: float = 30.0) -> int:
    """SIGTERM (what service managers send), then SIGKILL if it hangs; returns the exit code."""
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
    return server.process.returncode


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory) -> Path:
    """A tiny random 1-channel ViT (Fashion-MNIST format: 28 px grey, 4 px patches) in hub format."""
    folder = tmp_path_factory.mktemp("demo_model")
    tiny_encoder(seed=3, in_chans=1, mean=(0.2860,), std=(0.3530,), name="demo-test").save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def demo_model(demo_model_dir):
    """The same model loaded the way users load it (the reference the demo is compared with)."""
    from visreg_hub import from_pretrained

    return from_pretrained(str(demo_model_dir))


def hold_builds(monkeypatch) -> tuple[threading.Event, threading.Event]:
    """Make every gallery index build of ``demo.service`` set ``started``, then wait (30 s at most) for
    ``release`` before it builds; returns (started, release)."""
    from demo import service

    started, release = threading.Event(), threading.Event()
    real = service.load_or_build

    def held(*args, **kwargs):
        started.set()
        release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(service, "load_or_build", held)
    return started, release


def copy_gallery(target: Path, per_class: int = PER_CLASS) -> Path:
    """The first ``per_class`` images of each class of the bundled gallery, plus one corrupt file."""
    for class_dir in sorted(p for p in BUNDLED_GALLERY.iterdir() if p.is_dir()):
        (target / class_dir.name).mkdir(parents=True)
        for image in sorted(class_dir.glob("*.png"))[:per_class]:
            shutil.copy2(image, target / class_dir.name / image.name)
    (target / "broken").mkdir()
    (target / "broken" / "truncated.png").write_bytes((BUNDLED_GALLERY / "LICENSE.md").read_bytes()[:64])
    return target


@pytest.fixture(scope="session")
def demo_gallery(tmp_path_factory) -> Path:
    """50 real Fashion-MNIST images (5 per class) and one file that does not decode."""
    return copy_gallery(tmp_path_factory.mktemp("demo_gallery") / "gallery")


@pytest.fixture(scope="session")
def demo_servers(tmp_path_factory, demo_model_dir, demo_gallery):
    """Two real demo servers, started at the same time (start-up is mostly imports, so they overlap):

    * ``shared``: for every test that only makes requests; small upload limits;
    * ``spare``: for tests that fill its queue (``--queue-size 1 --concurrency 1``), trickle request
      bodies (``--request-timeout-s``) or stop it.
    """
    common = ["--model", str(demo_model_dir), "--gallery", str(demo_gallery)]
    shared_root, spare_root = tmp_path_factory.mktemp("demo_server"), tmp_path_factory.mktemp("spare_server")
    shared = launch_server(shared_root, [
        *common, "--cache-dir", str(shared_root / "cache"),
        "--max-file-size", f"{SERVER_MAX_FILE_SIZE}b", "--max-pixels", str(SERVER_MAX_PIXELS),
    ])  # fmt: skip
    spare = launch_server(spare_root, [
        *common, "--cache-dir", str(spare_root / "cache"), "--queue-size", "1", "--concurrency", "1",
        "--request-timeout-s", str(SPARE_REQUEST_TIMEOUT_S),
    ])  # fmt: skip
    try:
        yield {"shared": wait_until_ready(shared), "spare": wait_until_ready(spare)}
    finally:
        for server in (shared, spare):
            stop_server(server)


@pytest.fixture(scope="session")
def demo_server(demo_servers) -> DemoServer:
    return demo_servers["shared"]


@pytest.fixture(scope="session")
def spare_demo_server(demo_servers) -> DemoServer:
    return demo_servers["spare"]
