"""Crash safety of index writes: ``kill -9`` of a real ``visreg-hub serve`` while clients add items.

After every kill the server is restarted on the same folder and must start, hold every acknowledged
item (searchable by its own vector, with its metadata), and hold nothing that was never sent: the item
count lies between the acknowledged and the attempted. The last round ends with SIGTERM instead, which
must drain, snapshot (an empty log after it) and exit 0.

The killed servers are forked from a parent that has already imported torch, timm and FastAPI
(tests/serving/zygote.py), so a restart costs milliseconds instead of seconds of imports; each runs the
real ``visreg-hub serve`` entry point (``visreg_hub.cli.main``) in its own process. Each kill comes
at a random moment after the round's first acknowledged write. Default run: 3 kills; the ``slow``
version: 12.
"""

from __future__ import annotations

import base64
import json
import random
import signal
import threading
import time
import uuid

import httpx
import numpy as np
import pytest

from tests.inference.malformed import tiff_with_samples_per_pixel
from tests.serving.helpers import Zygote
from visreg_hub.serving.wal import read_log

DIM = 32  # the tiny model's embedding width


def _clients(url: str, stop: threading.Event, acked: dict, attempted: dict, lock: threading.Lock, seed: int):
    rng = np.random.default_rng(seed)
    with httpx.Client(base_url=url, timeout=10) as client:
        while not stop.is_set():
            n = int(rng.integers(1, 4))
            vectors = rng.standard_normal((n, DIM)).astype(np.float32)
            tags = [uuid.uuid4().hex for _ in range(n)]
            with lock:
                attempted.update(zip(tags, vectors))
            try:
                response = client.post("/v1/indexes/crash/items", json={
                    "vectors": vectors.tolist(), "metadata": [{"tag": t} for t in tags],
                })  # fmt: skip
            except httpx.HTTPError:
                return  # the server died mid-request: these items are unacknowledged
            assert response.status_code == 200, response.text  # never a 5xx while alive
            with lock:
                for item_id, tag, vector in zip(response.json()["ids"], tags, vectors):
                    acked[item_id] = (tag, vector)


def _verify(url: str, acked: dict, attempted: dict) -> None:
    with httpx.Client(base_url=url, timeout=30) as client:
        count = client.get("/v1/indexes/crash").json()["count"]
        assert len(acked) <= count <= len(attempted), (len(acked), count, len(attempted))
        for item_id, (tag, vector) in acked.items():
            hits = client.post(
                "/v1/search", json={"index": "crash", "vector": vector.tolist(), "k": 1}
            ).json()
            assert hits["hits"][0]["id"] == item_id and hits["hits"][0]["metadata"] == {"tag": tag}
            assert hits["hits"][0]["score"] == pytest.approx(1.0, abs=1e-5)


def _run(tmp_path, tiny_model_dir, kills: int) -> None:
    folder = tmp_path / "index"
    args = ["--model", f"tiny={tiny_model_dir}", "--index", f"crash={folder}", "--snapshot-every", "5"]
    log_path = tmp_path / "server.log"
    acked: dict[int, tuple[str, np.ndarray]] = {}
    attempted: dict[str, np.ndarray] = {}
    lock = threading.Lock()
    chance = random.Random(8)
    zygote = Zygote()
    for round_number in range(kills + 1):
        server = zygote.start(args, log_path).wait_ready()
        try:
            _verify(server.url, acked, attempted)
            stop = threading.Event()
            threads = [
                threading.Thread(
                    target=_clients, args=(server.url, stop, acked, attempted, lock, 100 * round_number + j)
                )
                for j in range(4)
            ]
            for thread in threads:
                thread.start()
            before = len(acked)
            deadline = time.monotonic() + 30
            while len(acked) == before and time.monotonic() < deadline:  # writes are under way
                time.sleep(0.01)
            time.sleep(chance.uniform(0.0, 0.4))
            if round_number < kills:
                assert server.signal(signal.SIGKILL) == -signal.SIGKILL  # clients mid-request
            else:
                stop.set()
                for thread in threads:
                    thread.join(30)
                # a graceful SIGTERM stop (drained, snapshotted) is a successful exit
                assert server.signal(signal.SIGTERM) == 0, server.log()
                # the address is logged (uvicorn names none for sockets bound before the models load)
                assert f"listening on {server.url.rstrip('/')}" in server.log()
                assert (
                    server.log().rstrip().endswith("Finished server process")
                    or "Application shutdown complete" in server.log()
                )
            stop.set()
            for thread in threads:
                thread.join(30)
        finally:
            if server.status is None:
                server.signal(signal.SIGKILL)
    assert len(acked) > 0
    current = json.loads((folder / "CURRENT").read_text())
    assert read_log(folder / f"log-{current['generation']:06d}.wal") == ([], 0)  # SIGTERM: snapshot, no log
    final = zygote.start(args, log_path).wait_ready()
    try:
        _verify(final.url, acked, attempted)
        # a malformed upload is its request's 422, not an ERROR line of Pillow's in the server log
        hostile = base64.b64encode(tiff_with_samples_per_pixel(38)).decode()
        assert httpx.post(final.url + "/v1/embeddings", json={"input": [hostile]}).status_code == 422
    finally:
        final.signal(signal.SIGTERM)
        zygote.close()
    assert "Traceback" not in log_path.read_text()
    assert "samples per pixel" not in log_path.read_text()


def test_kill_9_during_writes_loses_nothing_acknowledged(tmp_path, tiny_model_dir):
    _run(tmp_path, tiny_model_dir, kills=3)


@pytest.mark.slow
def test_kill_9_twelve_times_during_writes(tmp_path, tiny_model_dir):
    _run(tmp_path, tiny_model_dir, kills=12)


def test_the_shutdown_grace_covers_the_request_timeout(tiny_model_dir, monkeypatch):
    """Probe 20: the grace period was a fixed 30 s, so under --request-timeout-s 45 a SIGTERM cut admitted
    requests off with a bare 500; it is now request_timeout_s + 5 s."""
    import uvicorn

    from visreg_hub import from_pretrained
    from visreg_hub.serving.app import create_app
    from visreg_hub.serving.config import Limits, ModelSpec, ServeConfig
    from visreg_hub.serving.runtime import runtime_from_model
    from visreg_hub.serving.server import listening_sockets, run_app

    seen = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: seen.append(self.config))
    model = from_pretrained(str(tiny_model_dir))
    for timeout in (45.0, 2.0):
        config = ServeConfig(models=(ModelSpec("tiny", str(tiny_model_dir)),),
                             limits=Limits(request_timeout_s=timeout))  # fmt: skip
        app = create_app(config, runtimes={"tiny": runtime_from_model("tiny", model)})
        run_app(app, "127.0.0.1", 0, sockets=listening_sockets("127.0.0.1", 0))
    assert [c.timeout_graceful_shutdown for c in seen] == [50.0, 7.0]


def test_a_second_ctrl_c_cuts_requests_off_and_is_no_clean_exit(tmp_path, tiny_model_dir):
    """Probe 20: a second Ctrl-C while a request was in flight force-quit (the request cut off) yet the
    process exited 0, as after a drained stop; it now ends as interrupted (130), with a log line. The cut
    request was uvicorn's plain-text 500; it is now the API's JSON 503 ("unavailable")."""
    import os
    import socket
    from urllib.parse import urlsplit

    zygote = Zygote()
    try:
        server = zygote.start(["--model", f"tiny={tiny_model_dir}"], tmp_path / "server.log").wait_ready()
        address = urlsplit(server.url)
        with socket.create_connection((address.hostname, address.port)) as slow:  # a body still arriving
            slow.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 4096\r\n\r\n{\"input\": [")  # fmt: skip
            time.sleep(0.5)
            os.kill(server.pid, signal.SIGINT)  # drains: waits for the slow request
            time.sleep(2.0)
            status = server.signal(signal.SIGINT)
            answer = b""
            slow.settimeout(30)  # the process has exited: its socket is closed
            while chunk := slow.recv(65536):
                answer += chunk
        assert status not in (0, None), server.log()
        # the cut request is told the service is unavailable (JSON, like every other error), not a 500
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503"), answer
        error = json.loads(body)["error"]
        assert error["type"] == "server_error" and error["code"] == "server_stopping"
        assert "stopped without waiting for the requests in flight" in server.log()
        # one line says so: no traceback per cancelled task (the cut request, the lifespan)
        assert "Traceback" not in server.log() and "CancelledError" not in server.log(), server.log()
    finally:
        zygote.close()
