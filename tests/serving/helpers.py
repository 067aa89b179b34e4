"""Real servers for the serving tests: uvicorn in a thread of the test process (so embeddings can be
compared with ``encode()`` of the very same model object) or ``visreg-hub serve`` in a subprocess (for
signals and crashes). Both bind 127.0.0.1 on a port the OS picks."""

from __future__ import annotations

import base64
import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class ThreadServer:
    """``uvicorn.Server`` running ``app`` in a daemon thread of this process."""

    def __init__(self, app) -> None:
        import uvicorn

        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(60)

    @property
    def service(self):
        return self.app.state.service


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text output (0.0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        match = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(match.group(3))
    return 0.0


@dataclass
class ProcessServer:
    """``visreg-hub serve`` in a subprocess."""

    url: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_ready(self, timeout: float = 120.0) -> ProcessServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"server not ready within {timeout} s:\n{self.log()}")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def terminate(self, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode


def launch(args: list[str], log_path: Path) -> ProcessServer:
    """Start ``python -m visreg_hub.cli serve ARGS`` on a free port (returns at once)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "visreg_hub.cli", "serve", "--port", str(port), "--device", "cpu", *args]
    with log_path.open("a") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    return ProcessServer(f"http://127.0.0.1:{port}", process, log_path)


class Zygote:
    """``tests/serving/zygote.py`` in a subprocess: forks ready-imported ``visreg-hub serve`` processes."""

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.serving.zygote"], cwd=REPO, env=env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )  # fmt: skip
        assert self._read() == {"ready": True}

    def _read(self) -> dict:
        import json

        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"zygote exited with {self.process.wait()}")
        return json.loads(line)

    def _send(self, command: list) -> dict:
        import json

        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        return self._read()

    def start(self, args: list[str], log_path: Path) -> ForkedServer:
        port = free_port()
        command = ["serve", "--port", str(port), "--device", "cpu", *args]
        pid = self._send(["start", command, str(log_path)])["pid"]
        return ForkedServer(f"http://127.0.0.1:{port}", pid, log_path, self)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(30)


@dataclass
class ForkedServer:
    """A server forked by a :class:`Zygote` (our own process, addressed by its pid)."""

    url: str
    pid: int
    log_path: Path
    zygote: Zygote
    status: int | None = None

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_ready(self, timeout: float = 60.0) -> ForkedServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.signal(signal.SIGKILL)
        raise RuntimeError(f"forked server not ready within {timeout} s:\n{self.log()}")

    def signal(self, number: int) -> int:
        """Send ``number`` to the server and reap it; returns its exit status."""
        if self.status is None:
            os.kill(self.pid, number)
            self.status = self.zygote._send(["wait", self.pid])["status"]
        return self.status
