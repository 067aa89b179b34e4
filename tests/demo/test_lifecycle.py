"""The spare demo server, for what the shared one must not do: fill its queue, and stop.

It runs with ``--queue-size 1 --concurrency 1``: a burst of requests gets "queue is full" for some and
answers for the others, and the server serves again afterwards. Stopped with SIGTERM (what systemd and
docker send): it exits 0 and its temporary folder (uploads, Gradio's cache, .npy downloads) is gone.
"""

from __future__ import annotations

import socket
import time
from urllib.parse import urlparse

import numpy as np
from gradio_client import Client, handle_file

from tests.demo.conftest import EXAMPLES, SPARE_REQUEST_TIMEOUT_S, stop_server


def _post_head(url: str, path: str, content_type: str, length: int) -> socket.socket:
    address = urlparse(url)
    sock = socket.create_connection((address.hostname, address.port), timeout=30)
    head = f"POST {path} HTTP/1.1\r\nHost: {address.netloc}\r\nContent-Type: {content_type}\r\n"
    sock.sendall(f"{head}Content-Length: {length}\r\n\r\n".encode())
    return sock


def test_the_pages_routes_time_out_a_trickled_body_and_ignore_an_abandoned_one(spare_demo_server):
    """Gradio's upload and queue routes read their bodies with no deadline of their own: a client sending
    a byte a second held a connection and a coroutine for as long as it liked. They get --request-timeout-s,
    as /v1 does. A client that drops its upload half way is no server error (no traceback in the log,
    checked at the end of the next test)."""
    server = spare_demo_server
    boundary = "b0undary"
    multipart = f"multipart/form-data; boundary={boundary}"
    part = f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\n'
    routes = (
        ("/gradio_api/upload", multipart, part.encode()),
        ("/gradio_api/queue/join", "application/json", b'{"data": ['),
    )
    for path, content_type, opening in routes:
        sock = _post_head(server.url, path, content_type, 100_000)
        start = time.monotonic()
        sock.sendall(opening)
        answer = b""
        sock.settimeout(1.0)
        while time.monotonic() - start < 3 * SPARE_REQUEST_TIMEOUT_S:
            try:
                chunk = sock.recv(4096)
            except TimeoutError:
                sock.sendall(b" ")  # a byte a second, never the whole body
                continue
            answer += chunk
            if not chunk or b"request_timeout_s" in answer:
                break
        sock.close()
        waited = time.monotonic() - start
        assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout_s" in answer, (path, answer[:200])
        assert SPARE_REQUEST_TIMEOUT_S - 0.5 < waited < 2 * SPARE_REQUEST_TIMEOUT_S + 2, (path, waited)

    sock = _post_head(server.url, "/gradio_api/upload", multipart, 100_000)
    sock.sendall(part.encode())
    sock.sendall(b"\x89PNG" + bytes(5000))
    time.sleep(0.3)
    sock.close()  # gone half way through its upload
    time.sleep(0.5)
    assert "Traceback" not in server.log()


def test_bounded_queue_and_clean_shutdown(
    spare_demo_server, tmp_path, demo_model_dir, demo_model, demo_gallery
):
    server = spare_demo_server
    try:
        client = Client(
            server.url, verbose=False, download_files=str(tmp_path / "client"), analytics_enabled=False
        )
        query = EXAMPLES / "Sandal_384.png"
        gallery_key = demo_gallery.name  # the menu key: the folder's own name
        jobs = [
            client.submit(demo_model_dir.name, gallery_key, handle_file(str(query)), 5, api_name="/search")
            for _ in range(16)
        ]
        outcomes = []
        for job in jobs:
            try:
                outcomes.append(job.result(timeout=120))
            except Exception as exc:  # the client raises QueueError for a full queue
                outcomes.append(exc)
        refused = [o for o in outcomes if isinstance(o, Exception)]
        answered = [o for o in outcomes if not isinstance(o, Exception)]
        assert refused and answered, outcomes
        assert all("Queue is full" in str(exc) for exc in refused), refused

        # still serving, and the .npy download lands in the run's temporary folder
        _, _, npy_path, *_ = client.predict(
            demo_model_dir.name, handle_file(str(query)), "model default", True, api_name="/extract"
        )
        np.testing.assert_allclose(
            np.load(npy_path), demo_model.encode(query, convert_to_numpy=True), atol=1e-6
        )
        workspaces = list(server.tmpdir.glob("visreg-demo-*"))
        assert len(workspaces) == 1
        assert list((workspaces[0] / "downloads").rglob("*.npy")) and (workspaces[0] / "gradio").is_dir()
        client.close()
    finally:
        code = stop_server(server)
    assert code == 0, server.log()
    assert not list(server.tmpdir.glob("visreg-demo-*")), "the temporary folder was left behind"
    assert "Traceback" not in server.log()
