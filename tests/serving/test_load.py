"""Concurrency, overload, timeouts and auth on real uvicorn servers (in-process threads, httpx clients)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from tests.serving.helpers import ThreadServer, b64, metric_value, png_bytes
from visreg_hub.serving.config import Limits, ModelSpec, ServeConfig
from visreg_hub.serving.security import hash_key, load_api_keys

# the dynamo export of one model runs once per session (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("export_each_graph_once")


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from visreg_hub import from_pretrained

    return from_pretrained(str(tiny_model_dir))


def start(model, *, delay: float = 0.0, decode_delay: float = 0.0, **config) -> ThreadServer:
    """A server on ``model``; ``delay`` seconds are added to every forward pass (a slow model),
    ``decode_delay`` to every image decode (large images)."""
    from visreg_hub.serving.app import create_app
    from visreg_hub.serving.runtime import runtime_from_model

    runtime = runtime_from_model("tiny", model)
    if decode_delay:
        decode = runtime.decode

        def slow_decode(*args, **kwargs):
            time.sleep(decode_delay)
            return decode(*args, **kwargs)

        runtime.decode = slow_decode
    if delay:
        fast = runtime.forward

        def slow(pixels):
            time.sleep(delay)
            return fast(pixels)

        runtime.forward = slow
    return ThreadServer(
        create_app(ServeConfig(models=(ModelSpec("tiny", "tiny"),), **config), runtimes={"tiny": runtime})
    )


def test_64_concurrent_clients_are_batched_and_correct(model, fmnist_images):
    payloads = [
        png_bytes(fmnist_images[i % len(fmnist_images)][::-1] if i >= 40 else fmnist_images[i])
        for i in range(64)
    ]
    reference = model.encode(payloads, convert_to_numpy=True)
    with start(model, max_batch_size=64, max_wait_ms=50.0) as server:
        barrier = threading.Barrier(64)

        def one(i: int):
            with httpx.Client(base_url=server.url, timeout=60) as client:
                barrier.wait()
                return i, client.post("/v1/embeddings", json={"input": [b64(payloads[i])]})

        with ThreadPoolExecutor(64) as pool:
            results = list(pool.map(one, range(64)))
        metrics = httpx.get(server.url + "/metrics").text
    for i, response in results:
        assert response.status_code == 200, response.text
        np.testing.assert_array_equal(
            np.asarray(response.json()["data"][0]["embedding"], np.float32), reference[i]
        )
    batches = metric_value(metrics, "visreg_batch_size_count", model="tiny")
    images = metric_value(metrics, "visreg_batch_size_sum", model="tiny")
    assert images == 64 and 1 <= batches < 64, (batches, images)  # coalesced: mean batch size > 1
    assert (
        metric_value(metrics, "visreg_requests_total", route="/v1/embeddings", method="POST", status="200")
        == 64
    )


def test_overload_gets_429_never_5xx_and_recovers(model, fmnist_images):
    payload = b64(png_bytes(fmnist_images[0]))
    reference = model.encode([png_bytes(fmnist_images[0])], convert_to_numpy=True)[0]
    limits = Limits(max_queue=8)
    with start(model, delay=0.05, max_batch_size=4, max_wait_ms=1.0, limits=limits) as server:

        def flood(_):
            statuses = []
            with httpx.Client(base_url=server.url, timeout=60) as client:
                for _ in range(2):
                    response = client.post("/v1/embeddings", json={"input": [payload, payload]})
                    if response.status_code == 429:
                        assert int(response.headers["Retry-After"]) >= 1
                        assert "max_queue=8" in response.json()["error"]["message"]
                    elif response.status_code == 200:
                        np.testing.assert_array_equal(
                            np.asarray(response.json()["data"][1]["embedding"], np.float32), reference
                        )
                    statuses.append(response.status_code)
            return statuses

        with ThreadPoolExecutor(32) as pool:
            statuses = [s for batch in pool.map(flood, range(32)) for s in batch]
        assert set(statuses) <= {200, 429} and statuses.count(429) > 0 and statuses.count(200) > 0
        after = httpx.post(server.url + "/v1/embeddings", json={"input": [payload]}, timeout=60)
        assert after.status_code == 200
        metrics = httpx.get(server.url + "/metrics").text
        assert metric_value(metrics, "visreg_queue_depth", model="tiny") == 0
        assert metric_value(metrics, "visreg_rejected_total", limit="max_queue") == statuses.count(429)


def test_one_large_request_does_not_hold_back_a_small_one(model, fmnist_images):
    """A 40-image request whose images take 50 ms each to decode (2 s on the 2 decode threads) and a
    1-image request sent while it decodes: the small one is answered first and both are correct. With
    one first-come-first-served queue for decoding and for batches it waited for all 40."""
    payloads = [png_bytes(fmnist_images[i]) for i in range(40)]
    reference = model.encode(payloads, convert_to_numpy=True)
    finished: dict[str, float] = {}
    with start(model, decode_delay=0.05, max_batch_size=8, max_wait_ms=1.0) as server:

        def post(name: str, items: list[bytes]):
            with httpx.Client(base_url=server.url, timeout=60) as client:
                response = client.post("/v1/embeddings", json={"input": [b64(p) for p in items]})
            finished[name] = time.monotonic()
            return response

        with ThreadPoolExecutor(2) as pool:
            large = pool.submit(post, "large", payloads)
            time.sleep(0.3)  # the large request is decoding
            small = pool.submit(post, "small", payloads[7:8])
            large, small = large.result(), small.result()
    assert large.status_code == small.status_code == 200, (large.text, small.text)
    assert finished["small"] < finished["large"], finished
    rows = np.asarray([row["embedding"] for row in large.json()["data"]], np.float32)
    np.testing.assert_array_equal(rows, reference)
    np.testing.assert_array_equal(np.asarray(small.json()["data"][0]["embedding"], np.float32), reference[7])


def test_limit_request_timeout(model, fmnist_images):
    payload = b64(png_bytes(fmnist_images[0]))
    with start(model, delay=1.0, limits=Limits(request_timeout_s=0.3)) as server:
        response = httpx.post(server.url + "/v1/embeddings", json={"input": [payload]}, timeout=30)
        assert response.status_code == 408
        assert "request_timeout_s=0.3" in response.json()["error"]["message"]
        time.sleep(1.2)  # the slow batch in flight finishes; the server is fine afterwards
        assert httpx.get(server.url + "/health").status_code == 200


def test_api_keys_on(model, fmnist_images, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# operators\nsha256:{hash_key('s3cret-one')}\n\nplain-key-two\n")
    digests = load_api_keys(keys)
    assert digests == {hash_key("s3cret-one"), hash_key("plain-key-two")}
    payload = {"input": [b64(png_bytes(fmnist_images[0]))]}
    with start(model, api_key_hashes=digests, cors_origins=("https://app.example",)) as server:
        url = server.url + "/v1/embeddings"
        assert httpx.post(url, json=payload).status_code == 401
        wrong = httpx.post(url, json=payload, headers={"Authorization": "Bearer s3cret-on"})
        assert wrong.status_code == 401 and wrong.headers["WWW-Authenticate"] == "Bearer"
        assert wrong.json()["error"]["code"] == "invalid_api_key"  # OpenAI's code for a bad key
        assert httpx.post(url, json=payload, headers={"Authorization": "Basic s3cret-one"}).status_code == 401
        for key in ("s3cret-one", "plain-key-two"):
            ok = httpx.post(url, json=payload, headers={"Authorization": f"Bearer {key}"}, timeout=30)
            assert ok.status_code == 200
        assert httpx.get(server.url + "/v1/models").status_code == 401
        assert httpx.get(server.url + "/v1/indexes").status_code == 401
        assert httpx.get(server.url + "/v1/indexes/x/items/1").status_code == 401  # the key comes first
        listed = httpx.get(server.url + "/v1/indexes", headers={"Authorization": "Bearer plain-key-two"})
        assert listed.json() == {"object": "list", "data": []}  # a server started without --index
        missing = httpx.post(server.url + "/v1/search", json={"index": "x", "vector": [0.0]},
                             headers={"Authorization": "Bearer plain-key-two"})  # fmt: skip
        assert missing.status_code == 404 and "`visreg-hub serve --index NAME=FOLDER`" in missing.text
        assert httpx.get(server.url + "/metrics").status_code == 401
        assert httpx.get(server.url + "/health").status_code == 200  # probes stay open
        assert httpx.get(server.url + "/ready").json() == {"status": "ready"}  # names only behind the key
        allowed = httpx.get(server.url + "/health", headers={"Origin": "https://app.example"})
        assert allowed.headers["access-control-allow-origin"] == "https://app.example"
        other = httpx.get(server.url + "/health", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


@pytest.mark.parametrize("content", ["", "# only a comment\n", "sha256:xyz\n"])
def test_bad_api_key_files_are_refused(tmp_path, content):
    from visreg_hub.errors import ConfigError

    path = tmp_path / "keys"
    path.write_text(content)
    with pytest.raises(ConfigError):
        load_api_keys(path)


@pytest.mark.slow
def test_onnx_backend_serves_the_same_embeddings(tiny_model_dir, fmnist_images):
    """``--backend onnx``: the model is exported once at load and run with ONNX Runtime (slow: export)."""
    from visreg_hub import from_pretrained
    from visreg_hub.serving.app import create_app

    config = ServeConfig(models=(ModelSpec("tiny", str(tiny_model_dir)),), backend="onnx", device="cpu")
    payloads = [png_bytes(a) for a in fmnist_images[:6]]
    reference = from_pretrained(str(tiny_model_dir)).encode(payloads, convert_to_numpy=True)
    with ThreadServer(create_app(config)) as server:
        assert "onnx" in server.service.runtimes["tiny"].backend.describe()
        response = httpx.post(
            server.url + "/v1/embeddings", json={"input": [b64(p) for p in payloads]}, timeout=60
        )
    got = np.asarray([d["embedding"] for d in response.json()["data"]], np.float32)
    np.testing.assert_allclose(got, reference, atol=1e-5)


def test_cors_admits_sdk_headers_exposes_retry_after_and_decorates_500s(model, fmnist_images):
    """The OpenAI JS SDK's x-stainless-* headers failed the preflight; a 500 came without CORS headers
    (answered outside the CORS middleware), so a browser saw an opaque failure instead of the JSON."""
    origin = {"Origin": "https://app.example"}
    with start(model, cors_origins=("https://app.example",)) as server:
        preflight = httpx.options(
            server.url + "/v1/embeddings",
            headers={**origin, "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "authorization,content-type,x-stainless-os"},
        )  # fmt: skip
        assert preflight.status_code == 200, preflight.text
        assert "x-stainless-os" in preflight.headers["access-control-allow-headers"].lower()
        ok = httpx.get(server.url + "/health", headers=origin)
        assert "retry-after" in ok.headers["access-control-expose-headers"].lower()

        def broken(name):
            raise RuntimeError("boom")

        server.service.runtime = broken  # a bug inside a route
        failed = httpx.post(
            server.url + "/v1/embeddings", json={"input": [b64(png_bytes(fmnist_images[0]))]}, headers=origin,
            timeout=30,
        )  # fmt: skip
        assert failed.status_code == 500
        assert failed.json()["error"]["type"] == "server_error" and "boom" not in failed.text
        assert failed.headers["access-control-allow-origin"] == "https://app.example"
        metrics = httpx.get(server.url + "/metrics").text
        assert metric_value(metrics, "visreg_requests_total", route="/v1/embeddings", method="POST",
                            status="500") == 1  # fmt: skip
