"""The demo process also serves the HTTP API (one app, the UI mounted at ``/``), exposes only the
public Gradio events by name, and gives memory back after a burst of large uploads."""

from __future__ import annotations

import base64
import io
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

from tests.demo.conftest import BUNDLED_GALLERY, EXAMPLES, SERVER_MAX_FILE_SIZE, SERVER_MAX_PIXELS
from visreg_hub.inference import list_image_files


def test_the_demo_serves_the_api(demo_server, demo_model, demo_model_dir):
    base = demo_server.url.rstrip("/")
    assert httpx.get(base + "/health", timeout=10).json() == {"status": "ok"}
    models = httpx.get(base + "/v1/models", timeout=10).json()["data"]
    assert [m["id"] for m in models] == [demo_model_dir.name, "vit-tiny-p8-colour", "vit-tiny-p4-fmnist"]
    payload = (EXAMPLES / "Bag_320.png").read_bytes()
    body = {"input": [base64.b64encode(payload).decode()], "model": demo_model_dir.name}
    response = httpx.post(base + "/v1/embeddings", json=body, timeout=60)
    assert response.status_code == 200, response.text
    expected = demo_model.encode([payload], convert_to_numpy=True)[0]
    np.testing.assert_allclose(response.json()["data"][0]["embedding"], expected, atol=1e-6)
    assert "openapi" in httpx.get(base + "/openapi.json", timeout=10).json()
    metrics = httpx.get(base + "/metrics", timeout=10).text
    assert 'visreg_requests_total{method="POST",route="/v1/embeddings",status="200"}' in metrics


def _embedded_total(base: str) -> float:
    """Images the server has embedded so far, over every model (its Prometheus counter)."""
    text = httpx.get(base + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("visreg_items_embedded_total{"))  # fmt: skip


def test_the_api_searches_the_galleries_the_page_searches(
    demo_server, demo_model, demo_model_dir, demo_gallery
):
    """Every gallery of the menu is a read-only index of /v1/search, with the model the page pairs it
    with; hits and scores against a numpy brute force over ``encode()`` of the gallery files."""
    base = demo_server.url.rstrip("/")
    deadline = time.monotonic() + 120
    while True:  # the galleries are built in the background; the list says which are not ready yet
        listed = {info["name"]: info for info in httpx.get(base + "/v1/indexes", timeout=60).json()["data"]}
        waiting = [info for info in listed.values() if info["status"] != "ready"]
        assert all(info["status"] == "building" and info["count"] is None for info in waiting), waiting
        if not waiting or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert list(listed) == ["gallery", "bundled-photos", "bundled"]  # no server path among the names
    assert all(info["normalize"] and info["metric"] == "ip" for info in listed.values())  # cosine scores
    assert [(info["model"], info["dim"]) for info in listed.values()] == [
        (demo_model_dir.name, demo_model.embedding_dim()),
        ("vit-tiny-p8-colour", 256),
        ("vit-tiny-p4-fmnist", 512),
    ]
    files = list_image_files(demo_gallery)
    good = [i for i, f in enumerate(files) if f.parent.name != "broken"]  # the truncated file is left out
    assert listed["gallery"]["count"] == len(good) and listed["bundled"]["count"] == len(
        list_image_files(BUNDLED_GALLERY)
    )
    gallery = demo_model.encode([files[i] for i in good], convert_to_numpy=True).astype(np.float64)
    payload = (EXAMPLES / "Trouser_216.png").read_bytes()
    query = demo_model.encode(payload, convert_to_numpy=True).astype(np.float64)
    scores = gallery @ query
    order = np.argsort(-scores)[:5]

    def search(**body):
        return httpx.post(base + "/v1/search", json={"index": "gallery", "k": 5, **body}, timeout=60)

    for answer in (search(image=base64.b64encode(payload).decode()), search(vector=(3.0 * query).tolist())):
        assert answer.status_code == 200, answer.text
        hits = answer.json()["hits"]
        assert answer.json()["model"] == demo_model_dir.name
        np.testing.assert_allclose([h["score"] for h in hits], scores[order], atol=1e-5)  # cosine, any length
        assert [h["id"] for h in hits] == [good[j] for j in order]
        assert [h["metadata"] for h in hits] == [
            {"path": files[h["id"]].relative_to(demo_gallery).as_posix(), "label": files[h["id"]].parent.name}
            for h in hits
        ]
    assert search(vector=[0.0] * demo_model.embedding_dim()).status_code == 422
    item = httpx.get(base + f"/v1/indexes/gallery/items/{good[3]}", timeout=10).json()
    assert item["metadata"]["path"] == files[good[3]].relative_to(demo_gallery).as_posix()
    # read-only: refused before any image is embedded, and nothing changes
    embedded = _embedded_total(base)
    image = base64.b64encode(payload).decode()
    add = httpx.post(base + "/v1/indexes/gallery/items", json={"images": [image]}, timeout=60)
    delete = httpx.delete(base + f"/v1/indexes/gallery/items/{good[0]}", timeout=10)
    for refused in (add, delete):
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"]["type"] == "permission_error" and "read-only" in refused.text
    assert _embedded_total(base) == embedded
    assert httpx.get(base + "/v1/indexes/gallery", timeout=10).json()["count"] == len(good)
    unknown = httpx.post(base + "/v1/search", json={"index": "nope", "vector": [1.0]}, timeout=10)
    assert unknown.status_code == 404 and "served indexes: bundled, bundled-photos, gallery" in unknown.text


def test_the_api_keeps_the_demos_file_size_limit(demo_server, demo_model, demo_model_dir):
    """``--max-file-size`` caps an image sent to /v1 as it caps an upload: that item is refused by name,
    the request's other image is embedded."""
    noise = np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8)  # 160k pixels
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "PNG")
    large, small = buffer.getvalue(), (EXAMPLES / "Bag_320.png").read_bytes()
    assert len(large) > SERVER_MAX_FILE_SIZE > len(small)
    body = {"input": [base64.b64encode(p).decode() for p in (large, small)], "model": demo_model_dir.name,
            "on_error": "skip"}  # fmt: skip
    response = httpx.post(demo_server.url.rstrip("/") + "/v1/embeddings", json=body, timeout=60)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert [row["index"] for row in answer["data"]] == [1]
    expected = demo_model.encode([small], convert_to_numpy=True)[0]
    np.testing.assert_allclose(answer["data"][0]["embedding"], expected, atol=1e-6)
    [error] = answer["errors"]
    assert error["index"] == 0 and f"max_image_bytes={SERVER_MAX_FILE_SIZE}" in error["message"], error


@pytest.mark.parametrize(
    "path", ["/gradio_api/call/status", "/gradio_api/call/preview", "/gradio_api/run/predict",
             "/gradio_api/api/status", "/gradio_api/call/pick", "/gradio_api/run/status/"],
)  # fmt: skip
def test_private_events_are_not_callable_by_name(demo_server, path):
    response = httpx.post(demo_server.url.rstrip("/") + path, json={"data": []}, timeout=10)
    assert response.status_code == 404


def _rgba_png(seed: int, side: int) -> str:
    """A compressible RGBA PNG (a few KB) that decodes to side x side x 4 bytes."""
    pixels = np.zeros((side, side, 4), np.uint8)
    pixels[..., 0] = seed
    pixels[..., 3] = np.arange(side)[None, :] % 256
    pixels[:: 7 + seed, ::5, 1] = 200
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGBA").save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_memory_returns_near_baseline_after_a_burst_of_large_images(demo_server, demo_model_dir):
    """Measured on this machine: without the allocator bound the process keeps ~60 MB after this burst
    (1 Mpx RGBA images); with it, within a few MB of its baseline."""
    side = int(SERVER_MAX_PIXELS**0.5)  # the shared server's pixel cap
    url = demo_server.url.rstrip("/") + "/v1/embeddings"
    payloads = [_rgba_png(seed, side) for seed in range(6)]
    process = psutil.Process(demo_server.process.pid)
    with httpx.Client(timeout=120) as client:
        assert client.post(url, json={"input": payloads[:2], "model": demo_model_dir.name}).status_code == 200
    time.sleep(3)  # idle trim
    baseline = process.memory_info().rss

    def burst(j: int) -> list[int]:
        with httpx.Client(timeout=120) as client:
            return [
                client.post(
                    url, json={"input": payloads[k % 6 : k % 6 + 2], "model": demo_model_dir.name}
                ).status_code
                for k in range(j, j + 6)
            ]

    with ThreadPoolExecutor(4) as pool:
        statuses = [s for batch in pool.map(burst, range(4)) for s in batch]
    assert set(statuses) == {200}
    time.sleep(4)  # the server trims freed memory once idle (every 2 s)
    grown = (process.memory_info().rss - baseline) / 2**20
    assert grown < 25, f"RSS grew by {grown:.0f} MB after the burst"


def test_no_outbound_fetch_and_no_files_outside_the_gallery(demo_server, demo_model_dir):
    """Re-checked on the combined server: URLs given to Gradio's file/proxy routes or to the API are never
    fetched (a local listener sees no connection), and files outside the gallery/examples are refused."""
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    connections = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                connections.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    base = demo_server.url.rstrip("/")
    target = f"http://127.0.0.1:{port}/secret.png"
    try:
        config = demo_model_dir / "config.json"
        paths = [f"/gradio_api/file={target}", f"/gradio_api/proxy={target}", f"/file={target}"]
        for path in [*paths, "/gradio_api/file=/etc/passwd", f"/gradio_api/file={config}"]:
            response = httpx.get(base + path, timeout=10)
            assert response.status_code in (400, 403, 404), (path, response.status_code)
            assert "root:" not in response.text and "architecture" not in response.text
        api = httpx.post(base + "/v1/embeddings", json={"input": [target]}, timeout=10)
        assert api.status_code == 422
        time.sleep(0.5)
    finally:
        stop.set()
        thread.join(5)
        listener.close()
    assert connections == []
