"""The HTTP API on a real uvicorn server (in a thread of this process, sharing the model object with the
reference ``encode()`` calls, so embeddings must be exactly equal), driven with httpx."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import socket
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.inference.malformed import png_header_only
from tests.serving.helpers import ThreadServer, b64, metric_value, png_bytes
from visreg_hub.errors import ConfigError
from visreg_hub.serving.config import IndexSpec, Limits, ModelSpec, ServeConfig

LIMITS = Limits(
    max_body_bytes=256 * 1024, max_pixels=256 * 256, max_image_bytes=40 * 1024, max_items=16, max_k=50,
    max_queue=64, request_timeout_s=30.0, max_metadata_bytes=1024,
)  # fmt: skip


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from visreg_hub import from_pretrained

    return from_pretrained(str(tiny_model_dir))


@pytest.fixture(scope="module")
def server(model, tiny_model_dir, tmp_path_factory):
    from visreg_hub.serving.app import create_app
    from visreg_hub.serving.runtime import runtime_from_model

    folder = tmp_path_factory.mktemp("api_index")
    config = ServeConfig(
        models=(ModelSpec("tiny", str(tiny_model_dir)),),
        indexes=(IndexSpec("items", folder / "items"),),
        max_batch_size=8, max_wait_ms=2.0, limits=LIMITS,
    )  # fmt: skip
    app = create_app(config, runtimes={"tiny": runtime_from_model("tiny", model, str(tiny_model_dir))})
    with ThreadServer(app) as running:
        yield running


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def embed(http, inputs, **extra) -> httpx.Response:
    return http.post("/v1/embeddings", json={"input": inputs, **extra})


def as_matrix(response: httpx.Response) -> np.ndarray:
    return np.asarray([item["embedding"] for item in response.json()["data"]], dtype=np.float32)


def test_embeddings_equal_encode_exactly(http, model, fmnist_images, photo_bytes):
    payloads = [png_bytes(a) for a in fmnist_images[:10]] + photo_bytes
    response = embed(http, [b64(p) for p in payloads])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list" and body["model"] == "tiny" and body["errors"] == []
    assert [item["index"] for item in body["data"]] == list(range(len(payloads)))
    assert body["usage"]["images"] == len(payloads)
    reference = model.encode(payloads, convert_to_numpy=True)
    np.testing.assert_array_equal(as_matrix(response), reference)


def test_base64_encoding_format_and_data_urls(http, model, fmnist_images):
    payload = png_bytes(fmnist_images[0])
    response = embed(http, [f"data:image/png;base64,{b64(payload)}"], encoding_format="base64")
    assert response.status_code == 200, response.text
    vector = np.frombuffer(base64.b64decode(response.json()["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_array_equal(vector, model.encode([payload], convert_to_numpy=True)[0])
    single = embed(http, b64(payload))  # OpenAI also takes one string
    np.testing.assert_array_equal(as_matrix(single)[0], vector)


def test_multipart_upload_equals_json(http, fmnist_images, photo_bytes):
    payloads = [png_bytes(fmnist_images[3]), photo_bytes[0]]
    files = [("input", (f"{i}.img", p, "application/octet-stream")) for i, p in enumerate(payloads)]
    response = http.post("/v1/embeddings", files=files, data={"model": "tiny"})
    assert response.status_code == 200, response.text
    np.testing.assert_array_equal(as_matrix(response), as_matrix(embed(http, [b64(p) for p in payloads])))


def test_mixed_good_and_bad_inputs(http, model, fmnist_images):
    good = [png_bytes(fmnist_images[1]), png_bytes(fmnist_images[2])]
    inputs = [
        b64(good[0]),
        "not base64 at all!",
        b64(b"plain text, not an image"),
        b64(good[1][: len(good[1]) // 2]),  # truncated PNG
        b64(good[1]),
        "http://169.254.169.254/latest/meta-data",
        "file:///etc/passwd",
    ]
    response = embed(http, inputs, on_error="skip")
    assert response.status_code == 200, response.text
    body = response.json()
    assert [item["index"] for item in body["data"]] == [0, 4]
    errors = {e["index"]: e["message"] for e in body["errors"]}
    assert sorted(errors) == [1, 2, 3, 5, 6]
    assert "base64" in errors[1] and "not an image" in errors[2] and "truncated" in errors[3]
    assert "URLs and file paths are not accepted" in errors[5] and "not accepted" in errors[6]
    np.testing.assert_array_equal(as_matrix(response), model.encode(good, convert_to_numpy=True))


def test_on_error_raise_fails_the_whole_request_as_openai_does(http, model, fmnist_images):
    """With "skip", `data` is shorter than `input` after a bad image, so client code that pairs vectors
    with inputs by position (as OpenAI-client code does) silently shifts them; "raise", the server's
    default, answers as OpenAI's API does: a 422 naming every failure, and no vectors."""
    good, truncated = png_bytes(fmnist_images[1]), png_bytes(fmnist_images[2])[:40]
    for inputs, failed in (([b64(good), "@@@", b64(good)], [1]), ([b64(truncated), b64(good)], [0])):
        response = embed(http, inputs)  # refused early (base64), or when decoding
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["code"] == "input_not_embedded"
        assert f"{len(failed)} of {len(inputs)} inputs" in error["message"]
        assert [e["index"] for e in response.json()["errors"]] == failed and "data" not in response.json()
    files = [("input", ("a.png", good, "image/png")), ("input", ("b.png", truncated, "image/png"))]
    for form in ({"on_error": "raise"}, {}):
        multipart = http.post("/v1/embeddings", files=files, data=form)
        assert multipart.status_code == 422 and multipart.json()["error"]["code"] == "input_not_embedded"
    assert http.post("/v1/embeddings", files=files, data={"on_error": "never"}).status_code == 422
    # a failure found early (bad base64) does not hide one found when decoding: the 422 lists both
    both = embed(http, [b64(good), b64(truncated), "@@@"], on_error="raise")
    assert both.status_code == 422 and [e["index"] for e in both.json()["errors"]] == [1, 2]
    fine = embed(http, [b64(good)], on_error="raise")
    assert fine.status_code == 200
    np.testing.assert_array_equal(as_matrix(fine), model.encode([good], convert_to_numpy=True))
    assert embed(http, [b64(good)], on_error="ignore").status_code == 422  # only "skip" or "raise"


def test_all_inputs_bad_is_a_4xx(http):
    response = embed(http, ["@@@", b64(b"GIF89a broken")], on_error="skip")
    assert response.status_code == 422
    assert "no input could be embedded" in response.json()["error"]["message"]
    response = embed(http, ["@@@", b64(b"GIF89a broken")])
    assert response.status_code == 422 and "2 of 2 inputs could not be embedded" in response.text


@pytest.mark.parametrize(
    ("body", "expected", "param"),
    [
        ({"input": []}, 400, "input"),
        ({"input": ""}, 400, "input"),  # OpenAI's 400 for an empty input (the README says so)
        ({"input": [1, 2]}, 422, "input"),
        ({"input": ["x"], "encoding_format": "hex"}, 422, "encoding_format"),
        ({"input": ["x"], "dimensions": 0}, 422, "dimensions"),
        ({"input": ["x"], "dimensions": 10_000}, 422, "dimensions"),  # over the model's width: the same field
        ({"input": ["x"], "unknown": 1}, 422, "unknown"),
        ({"input": ["x"], "model": "nope"}, 404, None),  # OpenAI's model_not_found has a null param
        ([1, 2, 3], 422, None),
    ],
)
def test_malformed_requests_are_4xx(http, body, expected, param):
    """...with OpenAI's ``param`` naming the field at fault (it was always null)."""
    response = http.post("/v1/embeddings", json=body)
    assert response.status_code == expected, response.text
    assert response.json()["error"]["message"] and response.json()["error"]["param"] == param


@pytest.mark.parametrize(
    ("inputs", "named"),
    [
        (123, "input is a number"),
        (None, "input is null"),
        ({"image": "x"}, "input is an object"),
        (["ok", 7], "input[1] is a number"),
        ([["x"]], "input[0] is an array"),
        ([True], "input[0] is a boolean"),
    ],
)
def test_an_input_that_is_no_string_is_named_with_the_fix(http, inputs, named):
    """pydantic named each union branch ("input.str: Input should be a valid string; input.list[str].0:
    ..."): neither the item at fault nor what to send. One message now says both."""
    response = http.post("/v1/embeddings", json={"input": inputs})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert named in error["message"] and "base64" in error["message"] and error["param"] == "input"
    assert "list[str]" not in error["message"]


def test_error_params_name_form_and_path_fields_and_stay_short(http):
    files = [("input", ("a.png", b"x", "image/png"))]
    form = http.post("/v1/embeddings", files=files, data={"dimensions": "0"})
    assert form.status_code == 422 and form.json()["error"]["param"] == "dimensions"
    path = http.delete("/v1/indexes/items/items/not-a-number")
    assert path.status_code == 422 and path.json()["error"]["param"] == "item_id"
    for route, body, field in (("/v1/search", {"index": "items", "vector": [1.0] * 32, "k": 0}, "k"),
                               ("/v1/search", {"index": "items", "k": 1}, "image")):  # fmt: skip
        refused = http.post(route, json=body)
        assert refused.status_code == 422 and refused.json()["error"]["param"] == field, refused.text
    too_large = http.delete("/v1/indexes/items/items/9999999999999999999")
    assert too_large.status_code == 422 and too_large.json()["error"]["param"] == "item_id"
    huge = http.post("/v1/embeddings", json={"input": ["x"], "f" * 100_000: 1})
    assert huge.status_code == 422 and len(huge.text) < 2_000 and len(huge.json()["error"]["param"]) == 80


@pytest.mark.parametrize(
    ("route", "body", "field"),
    [
        ("/v1/search", {"index": "items", "vector": [1.0, 2.0]}, "vector"),  # not the index's width
        ("/v1/search", {"index": "items", "vector": [float("nan")] * 32}, "vector"),
        ("/v1/search", {"index": "items", "image": "bm90IGFuIGltYWdl"}, "image"),  # b"not an image"
        ("/v1/indexes/items/items", {"vectors": [[1.0, 2.0]]}, "vectors"),
        ("/v1/indexes/items/items", {"vectors": [[1.0] * 32], "metadata": [{}, {}]}, "metadata"),
        ("/v1/indexes/items/items", {"vectors": [[1.0] * 32], "ids": [1, 2]}, "ids"),
        ("/v1/indexes/items/items", {"vectors": [[1.0] * 32], "metadata": [{"a": "x" * 2000}]}, "metadata"),
        ("/v1/indexes/items/items", {"images": ["bm90IGFuIGltYWdl"]}, "images"),
        ("/v1/indexes/items/items", {"ids": [1]}, "images"),  # neither images nor vectors
    ],
)
def test_refusals_the_route_finds_name_the_field_at_fault(http, route, body, field):
    """OpenAI's ``param`` named the field only for what pydantic refused; the routes' own checks (a vector
    of the wrong width, a metadata list of the wrong length, an image that does not decode) left it null."""
    before = http.get("/v1/indexes/items").json()["count"]
    response = http.post(
        route, content=json.dumps(body, allow_nan=True), headers={"Content-Type": "application/json"}
    )
    assert 400 <= response.status_code < 500 and response.json()["error"]["param"] == field, response.text
    assert http.get("/v1/indexes/items").json()["count"] == before  # refused whole: nothing added


# ---------------------------------------------------------------------------------------------- limits
def test_limit_max_body_bytes(http, server):
    big = "A" * (LIMITS.max_body_bytes + 10)
    labels = {"route": "/v1/embeddings", "method": "POST", "status": "413"}
    before = metric_value(http.get("/metrics").text, "visreg_requests_total", **labels)
    response = http.post("/v1/embeddings", json={"input": [big]})
    assert response.status_code == 413 and "max_body_bytes" in response.json()["error"]["message"]
    # probe 20: the refusal comes before routing, and was counted under the label of unknown paths
    assert metric_value(http.get("/metrics").text, "visreg_requests_total", **labels) == before + 1

    def chunks():  # no Content-Length: the limit must hold while the body streams in
        for _ in range(LIMITS.max_body_bytes // 65536 + 2):
            yield b"A" * 65536

    response = http.post("/v1/embeddings", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413 and "max_body_bytes" in response.text


@pytest.mark.parametrize("declared_times_limit", [1.5, 3.5])
def test_an_async_client_reads_the_413_of_a_body_it_is_still_uploading(server, declared_times_limit):
    """Closing the connection on a declared-too-large body reset it mid-upload: httpx's async client (the
    one openai.AsyncOpenAI uses) then raised ReadError, never saw the 413, and the SDK re-sent it twice."""
    import asyncio

    body = b"A" * int(LIMITS.max_body_bytes * declared_times_limit)

    async def post_three_times():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            headers = {"content-type": "application/json"}
            return [await client.post("/v1/embeddings", content=body, headers=headers) for _ in range(3)]

    for response in asyncio.run(post_three_times()):
        assert response.status_code == 413 and "max_body_bytes" in response.json()["error"]["message"]


def test_a_client_waiting_for_100_continue_gets_the_413_before_uploading(server):
    """curl sends `Expect: 100-continue` with uploads over 1 MB and waits: reading the refused body to drop
    it made uvicorn answer 100 Continue, and the client then uploaded all of it just to see the 413."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        raw.sendall(
            f"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {3 * LIMITS.max_body_bytes}\r\nExpect: 100-continue\r\n\r\n".encode()
        )
        answer = b""
        while chunk := raw.recv(4096):  # the connection closes after the answer
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413") and b"max_body_bytes" in answer


def test_limit_max_pixels(http, fmnist_images):
    too_big = png_bytes(np.zeros((300, 300), dtype=np.uint8))  # 90,000 > 65,536 pixels
    response = embed(http, [b64(too_big), b64(png_bytes(fmnist_images[0]))], on_error="skip")
    assert response.status_code == 200
    message = response.json()["errors"][0]["message"]
    assert "max_pixels=65,536" in message and message.endswith("; send a smaller image (resize it)")
    assert "encode(" not in message  # the library's hint is for library callers
    assert response.json()["errors"][0]["limit"] == "max_pixels"  # by name, as the 413s' limit (probe)
    alone = embed(http, [b64(too_big)])
    assert alone.status_code == 422 and "max_pixels" in alone.json()["error"]["message"]
    assert (
        alone.json()["error"]["limit"] == "max_pixels" and alone.json()["errors"][0]["limit"] == "max_pixels"
    )
    search = http.post("/v1/search", json={"index": "items", "image": b64(too_big)})
    assert search.status_code == 422 and search.json()["error"]["limit"] == "max_pixels"


def test_limit_max_image_bytes(http, fmnist_images):
    noise = np.random.default_rng(1).integers(0, 256, (250, 250), dtype=np.uint8)  # 62,500 pixels
    too_long = png_bytes(noise)
    assert len(too_long) > LIMITS.max_image_bytes
    response = embed(http, [b64(too_long), b64(png_bytes(fmnist_images[0]))], on_error="skip")
    assert response.status_code == 200 and [row["index"] for row in response.json()["data"]] == [1]
    [error] = response.json()["errors"]
    assert error["index"] == 0 and f"{len(too_long)} bytes, over max_image_bytes=40960" in error["message"]
    assert error["limit"] == "max_image_bytes"
    alone = embed(http, [b64(too_long)])
    assert alone.status_code == 422 and "max_image_bytes" in alone.json()["error"]["message"]
    assert alone.json()["error"]["limit"] == "max_image_bytes"
    bad = embed(http, ["bm90IGFuIGltYWdl"])  # not an image: no limit broken
    assert bad.status_code == 422 and bad.json()["error"]["limit"] is None
    assert bad.json()["errors"][0]["limit"] is None


def test_limit_max_items(http, fmnist_images):
    inputs = [b64(png_bytes(fmnist_images[0]))] * (LIMITS.max_items + 1)
    response = embed(http, inputs)
    assert response.status_code == 413 and "max_items=16" in response.json()["error"]["message"]
    response = http.post("/v1/indexes/items/items", json={"vectors": [[0.0] * 32] * (LIMITS.max_items + 1)})
    assert response.status_code == 413 and "max_items" in response.text


@pytest.mark.parametrize("k", [0, -1, LIMITS.max_k + 1, 10**30])
def test_limit_max_k(http, k):
    response = http.post("/v1/search", json={"index": "items", "vector": [1.0] * 32, "k": k})
    assert response.status_code == 422, response.text
    assert "max_k" in response.json()["error"]["message"] or "k" in response.json()["error"]["message"]


def test_limit_max_metadata_bytes(http):
    meta = {"text": "x" * (LIMITS.max_metadata_bytes + 1)}
    response = http.post("/v1/indexes/items/items", json={"vectors": [[1.0] * 32], "metadata": [meta]})
    assert response.status_code == 413 and "max_metadata_bytes" in response.json()["error"]["message"]


# ---------------------------------------------------------------------------------------------- hostile
def _nested(depth: int) -> bytes:
    return b'{"input": ' + b"[" * depth + b"]" * depth + b"}"


def _bomb_png() -> bytes:
    image = Image.new("L", (3000, 3000))  # 9 Mpx of zeros: ~9 KB compressed
    buffer = io.BytesIO()
    image.save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


JSON = "application/json"
BOMB_HEADER = b64(png_header_only(100_000, 100_000))
DEEP_VECTOR = b'{"index": "items", "vector": ' + b"[" * 50_000 + b"}"
DEEP_METADATA = b'{"vectors": [[1]], "metadata": [' + b'{"a":' * 5000 + b"}"
NAN_VECTOR = b'{"index": "items", "vector": [NaN' + b", 1" * 31 + b"]}"

HOSTILE = {
    "invalid-base64": ("/v1/embeddings", {"input": ["%%%notbase64%%%"]}, None),
    "non-image": ("/v1/embeddings", {"input": [b64(b"#!/bin/sh\necho hi\n")]}, None),
    "decompression-bomb-header": ("/v1/embeddings", {"input": [BOMB_HEADER]}, None),
    "decompression-bomb-zeros": ("/v1/embeddings", {"input": [b64(_bomb_png())]}, None),
    "nested-json-embeddings": ("/v1/embeddings", _nested(100_000), "application/json"),
    "nested-json-search": ("/v1/search", DEEP_VECTOR, JSON),
    "nested-metadata": ("/v1/indexes/items/items", DEEP_METADATA, None),
    "wrong-content-type": ("/v1/embeddings", b'{"input": []}', "text/plain"),
    "xml": ("/v1/search", b"<search/>", "application/xml"),
    "huge-k": ("/v1/search", {"index": "items", "vector": [1.0] * 32, "k": 10**40}, None),
    "negative-k": ("/v1/search", {"index": "items", "vector": [1.0] * 32, "k": -5}, None),
    "file-url": ("/v1/embeddings", {"input": ["file:///etc/passwd"]}, None),
    "http-url": ("/v1/embeddings", {"input": ["http://127.0.0.1:1/x.png"]}, None),
    "file-url-search": ("/v1/search", {"index": "items", "image": "file:///etc/passwd"}, None),
    "http-url-add": ("/v1/indexes/items/items", {"images": ["https://example.com/a.png"]}, None),
    "path": ("/v1/embeddings", {"input": ["/etc/passwd"]}, None),
    "nan-vector": ("/v1/search", NAN_VECTOR, JSON),
    "wrong-dim": ("/v1/search", {"index": "items", "vector": [1.0] * 7}, None),
    "unknown-index": ("/v1/search", {"index": "../../etc", "vector": [1.0] * 32}, None),
    "huge-id": ("/v1/indexes/items/items/99999999999999999999999", None, "DELETE"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_inputs_are_4xx_and_server_stays_healthy(http, fmnist_images, case):
    path, body, content_type = HOSTILE[case]
    if content_type == "DELETE":
        response = http.delete(path)
    elif isinstance(body, bytes):
        response = http.post(path, content=body, headers={"content-type": content_type or "application/json"})
    else:
        response = http.post(path, json=body)
    assert 400 <= response.status_code < 500, (case, response.status_code, response.text[:300])
    assert response.json()["error"]["message"]
    assert http.get("/health").json() == {"status": "ok"}
    assert embed(http, [b64(png_bytes(fmnist_images[0]))]).status_code == 200


# ---------------------------------------------------------------------------------------------- indexes
def test_index_add_search_delete(http, model, fmnist_images):
    images = [png_bytes(a) for a in fmnist_images[10:16]]
    meta = [{"n": i} for i in range(len(images))]
    added = http.post("/v1/indexes/items/items", json={"images": [b64(p) for p in images], "metadata": meta})
    assert added.status_code == 200, added.text
    ids = added.json()["ids"]
    assert len(set(ids)) == len(images)
    reference = model.encode(images, convert_to_numpy=True)
    # search by image: the image's own item first, scores = cosine similarities of encode() embeddings
    hits = http.post("/v1/search", json={"index": "items", "image": b64(images[2]), "k": 3}).json()["hits"]
    assert hits[0]["id"] == ids[2] and hits[0]["metadata"] == {"n": 2}
    expected = sorted(
        ((float(reference[2] @ reference[j]), ids[j]) for j in range(len(images))), reverse=True
    )
    assert [h["id"] for h in hits] == [i for _, i in expected[:3]]
    np.testing.assert_allclose([h["score"] for h in hits], [s for s, _ in expected[:3]], rtol=1e-5, atol=1e-6)
    by_vector = http.post("/v1/search", json={"index": "items", "vector": reference[4].tolist(), "k": 1})
    assert by_vector.json()["hits"][0]["id"] == ids[4]
    info = http.get("/v1/indexes/items").json()
    assert info["dim"] == 32 and info["model"] == "tiny" and info["count"] >= len(images)
    assert http.get("/v1/indexes").json() == {"object": "list", "data": [info]}  # each as its own route says
    for position, item_id in enumerate(ids):  # each item's metadata, as a hit carries it
        item = http.get(f"/v1/indexes/items/items/{item_id}")
        assert item.json() == {"index": "items", "id": item_id, "metadata": {"n": position}}, item.text
    for loose in (f"+{ids[4]}", f"0{ids[4]}", f"{ids[4]}.0", f"%20{ids[4]}"):  # not the id, spelt otherwise
        assert http.delete(f"/v1/indexes/items/items/{loose}").status_code == 422, loose
        assert http.get(f"/v1/indexes/items/items/{loose}").status_code == 422, loose
    assert http.delete(f"/v1/indexes/items/items/{ids[4]}").status_code == 200
    assert http.delete(f"/v1/indexes/items/items/{ids[4]}").status_code == 404
    gone = http.get(f"/v1/indexes/items/items/{ids[4]}")
    assert gone.status_code == 404 and "has no item" in gone.json()["error"]["message"]
    assert http.head("/health").status_code == 200 and http.head("/ready").status_code == 200
    after = http.post("/v1/search", json={"index": "items", "vector": reference[4].tolist(), "k": 50})
    assert ids[4] not in [h["id"] for h in after.json()["hits"]]
    assert http.get("/v1/indexes/items").json()["count"] == info["count"] - 1


def test_a_search_that_races_the_delete_of_the_last_item_finds_no_hits(
    model, tiny_model_dir, tmp_path, monkeypatch
):
    """Probe 20: the route checked that the index was not empty before taking the store's lock, so a search
    racing the delete of the last item got 422 "query vector: the index is empty" (a quarter of the
    searches of a client deleting and re-adding one item). The size a check outside the lock sees is
    simulated by a stale ``len``: only the store, under its lock, may decide."""
    from visreg_hub.serving.app import create_app
    from visreg_hub.serving.runtime import runtime_from_model
    from visreg_hub.serving.store import DurableIndex

    config = ServeConfig(models=(ModelSpec("tiny", str(tiny_model_dir)),),
                         indexes=(IndexSpec("race", tmp_path / "race"),), limits=LIMITS)  # fmt: skip
    app = create_app(config, runtimes={"tiny": runtime_from_model("tiny", model, str(tiny_model_dir))})
    with ThreadServer(app) as running, httpx.Client(base_url=running.url, timeout=60) as client:
        vector = np.eye(32, dtype=np.float32)[0].tolist()
        added = client.post("/v1/indexes/race/items", json={"vectors": [vector]})
        assert added.status_code == 200, added.text
        assert client.delete(f"/v1/indexes/race/items/{added.json()['ids'][0]}").status_code == 200
        monkeypatch.setattr(DurableIndex, "__len__", lambda self: 1)  # what a check before the delete saw
        found = client.post("/v1/search", json={"index": "race", "vector": vector, "k": 3})
        assert found.status_code == 200 and found.json()["hits"] == [], found.text


def test_a_full_disk_is_a_507_naming_the_storage_and_changes_nothing(
    model, tiny_model_dir, tmp_path, monkeypatch
):
    """Probe 20: an add or delete whose log record could not be written (a full disk) answered 500
    "internal error"; the cause is known and the change was not made, so the client hears so (507, as
    WebDAV's Insufficient Storage) and may retry."""
    import errno

    from visreg_hub.serving import wal
    from visreg_hub.serving.app import create_app
    from visreg_hub.serving.runtime import runtime_from_model

    config = ServeConfig(models=(ModelSpec("tiny", str(tiny_model_dir)),),
                         indexes=(IndexSpec("full", tmp_path / "full"),), limits=LIMITS)  # fmt: skip
    app = create_app(config, runtimes={"tiny": runtime_from_model("tiny", model, str(tiny_model_dir))})
    with ThreadServer(app) as running, httpx.Client(base_url=running.url, timeout=60) as client:
        vector = np.eye(32, dtype=np.float32)[0].tolist()
        kept = client.post("/v1/indexes/full/items", json={"vectors": [vector]}).json()["ids"][0]

        def no_space(self, record):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(wal.LogWriter, "append", no_space)
        for answer in (client.post("/v1/indexes/full/items", json={"vectors": [vector]}),
                       client.delete(f"/v1/indexes/full/items/{kept}")):  # fmt: skip
            assert answer.status_code == 507, answer.text
            error = answer.json()["error"]
            assert error["code"] == "storage_full" and "No space left on device" in error["message"]
            assert "nothing was changed" in error["message"]
        # an operator sees it while it lasts; reads go on (ready stays up: searches still work)
        info = client.get("/v1/indexes/full").json()
        assert info["write_error"] == "OSError: No space left on device" and info["count"] == 1
        assert client.get("/ready").status_code == 200
        assert client.post("/v1/search", json={"index": "full", "vector": vector, "k": 1}).status_code == 200
        monkeypatch.undo()
        assert client.get("/v1/indexes/full").json()["count"] == 1
        assert client.delete(f"/v1/indexes/full/items/{kept}").status_code == 200
        assert client.get("/v1/indexes").json()["data"][0]["write_error"] is None  # cleared by a write


def test_add_refuses_bad_images_and_duplicate_ids(http, fmnist_images):
    good = b64(png_bytes(fmnist_images[20]))
    response = http.post("/v1/indexes/items/items", json={"images": [good, "@@"]})
    assert response.status_code == 422 and "nothing was added" in response.json()["error"]["message"]
    first = http.post("/v1/indexes/items/items", json={"vectors": [[0.5] * 32], "ids": [10_000]})
    assert first.status_code == 200 and first.json()["ids"] == [10_000]
    again = http.post("/v1/indexes/items/items", json={"vectors": [[0.5] * 32], "ids": [10_000]})
    assert again.status_code == 409


# ---------------------------------------------------------------------------------------------- service
def test_models_health_ready_metrics(http, model):
    models = http.get("/v1/models").json()
    assert models["data"][0]["id"] == "tiny" and models["data"][0]["embedding_dim"] == 32
    assert models["data"][0]["backend"] == model.backend  # what encode() of the same model runs on
    # OpenAI's model object has an integer "created"; a server folder is named, never its path
    assert abs(models["data"][0]["created"] - time.time()) < 3600 and models["data"][0]["source"] == "tiny"
    assert http.get("/ready").json()["models"] == ["tiny"]
    text = http.get("/metrics").text
    assert metric_value(text, "visreg_requests_total", route="/v1/models", method="GET", status="200") >= 1
    for family in ("visreg_request_seconds_bucket", "visreg_batch_size_bucket", "visreg_queue_depth",
                   "visreg_items_embedded_total", "visreg_decode_failures_total"):  # fmt: skip
        assert family in text


def test_openapi_schema_is_valid(http):
    from openapi_spec_validator import validate

    spec = http.get("/openapi.json").json()
    validate(spec)
    paths = ["/v1/embeddings", "/v1/search", "/v1/indexes/{name}/items", "/v1/indexes/{name}/items/{item_id}"]
    paths += ["/v1/indexes/{name}", "/v1/models", "/health", "/ready", "/metrics"]
    for path in paths:
        assert path in spec["paths"], path
    content = spec["paths"]["/v1/embeddings"]["post"]["requestBody"]["content"]
    assert set(content) == {"application/json", "multipart/form-data"}
    paths += ["/v1/indexes"]
    for path in paths:  # every error the routes answer is documented, 503 (stopping) included
        for operation in spec["paths"][path].values():
            documented = set(operation["responses"])
            if path not in ("/health", "/ready", "/metrics"):
                assert {"400", "422", "503"} <= documented, (path, documented)


def test_cors_is_off_by_default(http):
    response = http.options(
        "/v1/models", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"}
    )
    assert "access-control-allow-origin" not in response.headers
    assert (
        "access-control-allow-origin" not in http.get("/v1/models", headers={"Origin": "https://x"}).headers
    )


def test_errors_do_not_echo_inputs(http):
    secret = "QUJD" * 200  # valid base64, not an image
    response = http.post("/v1/search", json={"index": "items", "image": 12345, "k": 1})
    assert response.status_code == 422
    response = embed(http, [secret])
    assert secret not in response.text and json.loads(response.text)["error"]


def test_dimensions_truncate_and_renormalise_like_encode(http, model, fmnist_images, photo_bytes):
    """OpenAI's ``dimensions`` = ``encode(truncate_dim=N)``: the first N values, L2-normalised again."""
    payloads = [png_bytes(a) for a in fmnist_images[:3]] + photo_bytes[:1]
    width = model.embedding_dim()
    dims = width // 4
    response = embed(http, [b64(p) for p in payloads], dimensions=dims)
    assert response.status_code == 200, response.text
    got = as_matrix(response)
    assert got.shape == (len(payloads), dims)
    # reference: float64 truncation of the raw (unnormalised) outputs, then normalisation
    raw = model.encode(payloads, normalize=False, convert_to_numpy=True).astype(np.float64)[:, :dims]
    expected = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6)
    library = model.encode(payloads, truncate_dim=dims, convert_to_numpy=True)
    np.testing.assert_allclose(got, library, rtol=0, atol=2e-6)
    full = embed(http, [b64(p) for p in payloads], dimensions=width)
    np.testing.assert_array_equal(as_matrix(full), as_matrix(embed(http, [b64(p) for p in payloads])))
    files = [("input", (f"{i}.img", p, "application/octet-stream")) for i, p in enumerate(payloads)]
    multipart = http.post("/v1/embeddings", files=files, data={"dimensions": str(dims)})
    assert multipart.status_code == 200, multipart.text
    np.testing.assert_array_equal(as_matrix(multipart), got)
    for bad in ("0", "-1", "1.5", "²", "9" * 5000, str(width + 1)):
        refused = http.post("/v1/embeddings", files=files[:1], data={"dimensions": bad})
        assert refused.status_code == 422 and "dimensions" in refused.json()["error"]["message"], bad


@pytest.mark.parametrize("dimensions", [0, -3, 1.5, True, "8", 10**6])
def test_bad_dimensions_are_422_naming_the_range(http, fmnist_images, dimensions):
    response = embed(http, [b64(png_bytes(fmnist_images[0]))], dimensions=dimensions)
    assert response.status_code == 422, response.text
    assert "dimensions" in response.json()["error"]["message"]


# ---------------------------------------------------------------------------------------------- probe fixes
def test_zero_query_vector_is_a_422_not_a_500(http):
    added = http.post("/v1/indexes/items/items", json={"vectors": [[0.5] * 32]})
    assert added.status_code == 200, added.text
    response = http.post("/v1/search", json={"index": "items", "vector": [0.0] * 32, "k": 3})
    assert response.status_code == 422 and "zero vector" in response.json()["error"]["message"]
    refused = http.post("/v1/indexes/items/items", json={"vectors": [[0.0] * 32]})
    assert refused.status_code == 422 and "zero vector" in refused.json()["error"]["message"]


@pytest.mark.parametrize(
    "body",
    [
        {"vectors": [[1.0] * 32], "ids": [True]},
        {"vectors": [[1.0] * 32], "ids": ["6"]},
        {"vectors": [[1.0] * 32], "ids": [5.0]},
        {"vectors": [[1.0] * 32], "ids": [2**63 - 1]},  # next_id would leave int64
        {"vectors": [[1.0] * 32], "ids": [2**64]},
        {"vectors": [["0.3"] * 32]},
    ],
)
def test_add_items_types_are_strict(http, body):
    response = http.post("/v1/indexes/items/items", json=body)
    assert response.status_code == 422, response.text


def test_search_k_must_be_an_integer(http):
    response = http.post("/v1/search", json={"index": "items", "vector": [1.0] * 32, "k": "3"})
    assert response.status_code == 422 and "k" in response.json()["error"]["message"]


@pytest.mark.parametrize("path", ["/v1/search", "/v1/indexes/items/items", "/v1/embeddings"])
def test_every_json_route_answers_the_same_to_a_wrong_body(http, path):
    """415 for another Content-Type (or none), 400 for malformed JSON, 415 for a compressed body."""
    for headers in ({"content-type": "text/plain"}, {}):
        response = http.post(path, content=b'{"index": "items"}', headers=headers)
        assert response.status_code == 415, (headers, response.text)
    response = http.post(path, content=b'{"index": ', headers={"content-type": "application/json"})
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    latin1 = '{"index": "caf\u00e9"}'.encode("latin-1")
    response = http.post(path, content=latin1, headers={"content-type": "application/json; charset=latin-1"})
    assert response.status_code == 400 and "not UTF-8" in response.json()["error"]["message"]
    gz = http.post(
        path, content=b"\x1f\x8b\x08\x00", headers={"content-type": JSON, "content-encoding": "gzip"}
    )
    assert gz.status_code == 415 and "Content-Encoding" in gz.json()["error"]["message"]


def test_metadata_limit_counts_utf8_bytes(http):
    """max_metadata_bytes is the UTF-8 size of the compact JSON, not of its \\uXXXX-escaped form."""
    fits = {"t": "é" * 400}  # 800 bytes of UTF-8 (2,400 characters when ASCII-escaped)
    too_big = {"t": "é" * 600}
    size = len(json.dumps(too_big, ensure_ascii=False, separators=(",", ":")).encode())
    ok = http.post("/v1/indexes/items/items", json={"vectors": [[0.3] * 32], "metadata": [fits]})
    assert ok.status_code == 200, ok.text
    refused = http.post("/v1/indexes/items/items", json={"vectors": [[0.3] * 32], "metadata": [too_big]})
    assert refused.status_code == 413 and f"is {size:,} bytes" in refused.json()["error"]["message"]


def test_data_url_scheme_is_case_insensitive_and_paths_are_named(http, model, fmnist_images):
    png = png_bytes(fmnist_images[3])
    upper = embed(http, ["DATA:IMAGE/PNG;BASE64," + b64(png)])
    assert upper.status_code == 200, upper.text
    np.testing.assert_array_equal(as_matrix(upper), model.encode([png], convert_to_numpy=True))
    path = embed(http, ["/etc/passwd", b64(png)]).json()["errors"][0]["message"]
    assert "file paths and URLs are never opened" in path


def test_all_failed_answer_lists_each_input(http):
    response = embed(http, ["@@@", b64(b"GIF89a broken")], on_error="skip")
    body = response.json()
    assert response.status_code == 422 and body["error"]["code"] == "no_input_embedded"
    assert [e["index"] for e in body["errors"]] == [0, 1]
    assert "base64" in body["errors"][0]["message"] and "base64" not in body["errors"][1]["message"]


def test_models_retrieve(http):
    """OpenAI's models.retrieve: GET /v1/models/{id} is the list's entry; an unknown id is a 404."""
    listed = http.get("/v1/models").json()["data"][0]
    assert http.get(f"/v1/models/{listed['id']}").json() == listed
    missing = http.get("/v1/models/nope")
    assert missing.status_code == 404 and "unknown model 'nope'" in missing.json()["error"]["message"]
    # OpenAI's shape: invalid_request_error with code model_not_found, and a "param" key (null)
    assert missing.json()["error"] | {"message": ""} == {
        "message": "", "type": "invalid_request_error", "param": None, "code": "model_not_found",
        "limit": None,
    }  # fmt: skip
    # an empty model name is not "the default": it names no served model
    image = b64(png_bytes(np.zeros((8, 8), np.uint8)))
    empty = http.post("/v1/embeddings", json={"model": "", "input": [image]})
    assert empty.status_code == 404 and empty.json()["error"]["code"] == "model_not_found"


def test_errors_never_echo_what_a_client_sent_at_length(http):
    """A 100 kB model name or Content-Type, a 500-character form field name come back cut short."""
    image = b64(png_bytes(np.zeros((8, 8), np.uint8)))
    long = "m" * 100_000
    answers = [
        http.post("/v1/embeddings", json={"model": long, "input": [image]}),
        http.get(f"/v1/models/{'n' * 4000}"),
        http.post("/v1/embeddings", content=b"{}", headers={"content-type": "text/" + long}),
        http.post("/v1/embeddings", files=[("input", ("a.png", b"x"))], data={long[:500]: "1"}),
        http.post("/v1/embeddings", files=[("input", ("a.png", b"x"))], data={"dimensions": "9" * 50_000}),
    ]
    for number, response in enumerate(answers):
        assert 400 <= response.status_code < 500, response.text[:200]
        assert len(response.text) < 2000, response.text[:200]  # nothing sent comes back at length
        if number == 2 and not response.headers.get("content-type", "").startswith("application/json"):
            # a 100 kB header line can also be refused by the HTTP parser itself (h11 stops buffering an
            # incomplete head at 16 kB, so it depends on how the bytes arrive): a plain 400, no echo either
            assert response.status_code == 400 and response.text == "Invalid HTTP request received."
            continue
        message = response.json()["error"]["message"]
        assert len(message) < 400 and "characters)" in message, message


def test_a_base64_text_part_in_a_form_is_refused_by_name(http, fmnist_images):
    image = b64(png_bytes(fmnist_images[0]))
    response = http.post("/v1/embeddings", files=[("model", (None, "tiny"))], data={"input": image})
    assert response.status_code == 422, response.text
    assert "form field 'input' holds text, not a file" in response.json()["error"]["message"]
    assert response.json()["error"]["param"] == "input"
    png = ("a.png", png_bytes(fmnist_images[0]), "image/png")
    unknown = http.post("/v1/embeddings", files=[("input", png)], data={"modle": "tiny"})
    assert unknown.status_code == 422 and unknown.json()["error"]["param"] == "modle", unknown.text


def test_text_and_deeply_nested_json_get_their_own_messages(http):
    text = embed(http, ["a photo of a cat."])  # "." is not base64 (without it the words decode as bytes)
    assert text.status_code == 422 and "embeds images, not text" in text.json()["errors"][0]["message"]
    deep = http.post("/v1/embeddings", content=b"[" * 100_000 + b"]" * 100_000,
                     headers={"content-type": "application/json"})  # fmt: skip
    assert deep.status_code == 400 and "nested too deeply" in deep.json()["error"]["message"]


def test_multipart_user_field_and_too_many_files(http, model, fmnist_images):
    png = png_bytes(fmnist_images[4])
    response = http.post("/v1/embeddings", files=[("input", ("a.png", png))], data={"user": "bob"})
    assert response.status_code == 200, response.text
    np.testing.assert_array_equal(as_matrix(response), model.encode([png], convert_to_numpy=True))
    for extra in (1, 2):  # one over max_items is counted by us, two over by Starlette's parser
        files = [("input", (f"{i}.png", png)) for i in range(LIMITS.max_items + extra)]
        response = http.post("/v1/embeddings", files=files)
        assert response.status_code == 413, response.text
        assert "max_items=16" in response.json()["error"]["message"]


def test_openapi_refs_all_resolve_and_bodies_are_described(http):
    spec = http.get("/openapi.json").json()
    text = json.dumps(spec)
    refs = set(re.findall(r'"#/components/schemas/([^"]+)"', text))
    assert refs and refs <= set(spec["components"]["schemas"]), refs - set(spec["components"]["schemas"])
    for path, fields in (
        ("/v1/embeddings", {"input", "dimensions"}),
        ("/v1/search", {"index", "vector", "k"}),
        ("/v1/indexes/{name}/items", {"vectors", "ids", "metadata"}),
    ):
        schema = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert fields <= set(schema["properties"]), path


def test_body_limit_refusals_are_counted(http):
    before = http.get("/metrics").text
    big = "A" * (LIMITS.max_body_bytes + 10)
    assert http.post("/v1/embeddings", json={"input": [big]}).status_code == 413
    after = http.get("/metrics").text
    for name, labels in (
        ("visreg_rejected_total", {"limit": "max_body_bytes"}),
        # probe 20: under its route (it was "unmatched", the label of unknown paths: answered before routing)
        ("visreg_requests_total", {"route": "/v1/embeddings", "method": "POST", "status": "413"}),
    ):
        assert metric_value(after, name, **labels) == metric_value(before, name, **labels) + 1, name


def test_unknown_http_methods_share_one_metrics_label(server, http):
    """Any token is a method to uvicorn; as a label each one was a new series kept until restart (a client
    without an API key could grow /metrics by megabytes)."""
    host, port = server.url.removeprefix("http://").split(":")
    for method in ("FOO123", "X" * 2000):
        with socket.create_connection((host, int(port)), timeout=10) as raw:
            raw.sendall(f"{method} /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            assert raw.recv(100).startswith(b"HTTP/1.1 405")
    text = http.get("/metrics").text
    assert "FOO123" not in text and "XXXX" not in text
    assert metric_value(text, "visreg_requests_total", route="/health", method="other", status="405") >= 2


def test_head_answers_every_get_route_like_get_with_headers_only(server, http):
    """HEAD /v1/models was a 405 while GET worked (FastAPI answers only declared methods; /health and /ready
    had hand-written HEAD routes), and a HEAD on an unknown path was 405, not GET's 404 (RFC 9110 9.3.2:
    HEAD is GET without the body)."""
    for path in ("/health", "/ready", "/v1/models", "/v1/models/tiny", "/v1/indexes", "/v1/indexes/items",
                 "/openapi.json", "/docs", "/metrics", "/nope", "/v1/models/nope"):  # fmt: skip
        got, head = http.get(path), http.head(path)
        assert head.status_code == got.status_code, path
        assert head.content == b"" and got.content, path
        assert head.headers["content-type"] == got.headers["content-type"], path
        if path != "/metrics":  # /metrics changes between the two requests (it counts them)
            assert int(head.headers["content-length"]) == len(got.content), path
    # POST-only routes keep their 405 and say what is allowed; the connection survives a bodiless answer
    refused = http.head("/v1/embeddings")
    assert refused.status_code == 405 and refused.headers["allow"] == "POST"
    assert http.get("/health").json() == {"status": "ok"}
    text = http.get("/metrics").text  # counted as HEAD, under the route's label
    assert metric_value(text, "visreg_requests_total", route="/v1/models", method="HEAD", status="200") >= 1


@pytest.fixture(scope="module")
def strict_server(model, tiny_model_dir):
    """A second server: a queue smaller than max_items, a 1 s request timeout, "skip" as its default."""
    from visreg_hub.serving.app import create_app
    from visreg_hub.serving.runtime import runtime_from_model

    limits = Limits(max_items=16, max_queue=4, request_timeout_s=1.0)
    config = ServeConfig(models=(ModelSpec("tiny", str(tiny_model_dir)),), limits=limits, on_error="skip")
    app = create_app(config, runtimes={"tiny": runtime_from_model("tiny", model, str(tiny_model_dir))})
    with ThreadServer(app) as running:
        yield running


def test_a_request_larger_than_the_queue_is_413_not_a_retry_forever(strict_server, fmnist_images):
    with httpx.Client(base_url=strict_server.url, timeout=30) as client:
        inputs = [b64(png_bytes(fmnist_images[0]))] * 5
        response = client.post("/v1/embeddings", json={"input": inputs})
        assert response.status_code == 413 and "max_queue=4" in response.json()["error"]["message"]
        assert "Retry-After" not in response.headers
        assert client.post("/v1/embeddings", json={"input": inputs[:4]}).status_code == 200


def test_the_server_default_for_bad_inputs_is_a_setting(strict_server, fmnist_images):
    """`visreg-hub serve --on-error skip`: requests that do not say get the per-item errors."""
    good = b64(png_bytes(fmnist_images[0]))
    with httpx.Client(base_url=strict_server.url, timeout=30) as client:
        response = client.post("/v1/embeddings", json={"input": [good, "@@@"]})
        assert response.status_code == 200 and [e["index"] for e in response.json()["errors"]] == [1]
        raised = client.post("/v1/embeddings", json={"input": [good, "@@@"], "on_error": "raise"})
        assert raised.status_code == 422 and raised.json()["error"]["code"] == "input_not_embedded"


def _partial_request(url: str, sent: bytes, declared: int) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    head = (
        f"POST /v1/embeddings HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {declared}\r\n\r\n"
    ).encode()
    sock.sendall(head + sent)
    return sock


def test_a_stalled_body_times_out_and_a_vanished_client_is_no_server_error(strict_server):
    """A body that stops arriving gets a 408 after request_timeout_s (no coroutine held forever); a
    client that disconnects mid-body is not counted or logged as a 500."""
    sock = _partial_request(strict_server.url, b'{"input": ["', 100)
    start = time.monotonic()
    answer = b""
    while chunk := sock.recv(4096):  # until the server closes or the whole answer is in
        answer += chunk
        if b"\r\n\r\n" in answer and b"}" in answer.split(b"\r\n\r\n", 1)[1]:
            break
    answer = answer.decode()
    sock.close()
    assert answer.startswith("HTTP/1.1 408") and "request_timeout_s" in answer
    assert time.monotonic() - start < 10
    sock = _partial_request(strict_server.url, b'{"input": ["', 100)
    time.sleep(0.2)
    sock.close()
    time.sleep(0.5)
    with httpx.Client(base_url=strict_server.url, timeout=30) as client:
        text = client.get("/metrics").text
    labels = {"route": "/v1/embeddings", "method": "POST", "status": "500"}
    assert metric_value(text, "visreg_requests_total", **labels) == 0


def test_docs_page_loads_only_shipped_files(http):
    """/docs names no other host; each file it loads is the package's own copy of Swagger UI."""
    from visreg_hub.serving.docs_ui import ASSETS

    page = http.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    urls = re.findall(r"""(?:src|href|url)\s*[:=]\s*['"]([^'"]+)['"]""", page.text)
    assert "/openapi.json" in urls and not [u for u in urls if "//" in u], urls
    assets = [u for u in urls if u.startswith("/docs/assets/")]
    assert {u.rsplit("/", 1)[1] for u in assets} == {
        "swagger-ui-bundle.js",
        "swagger-ui.css",
        "favicon-32x32.png",
    }
    for url in assets:
        response = http.get(url)
        assert (
            response.status_code == 200 and response.content == (ASSETS / url.rsplit("/", 1)[1]).read_bytes()
        )
    assert http.get("/docs/assets/../app.py").status_code == 404  # no reach outside the shipped folder
    assert http.get("/redoc").status_code == 404  # its page would load from a CDN


def test_metadata_json_cannot_give_back_is_a_422_and_search_keeps_working(http):
    """Metadata 300 levels deep was acknowledged, then every search returning it failed with a 500
    (pydantic's serialiser stops at depth 255), across restarts; an unpaired surrogate gave a 500."""
    vector = np.random.default_rng(77).standard_normal(32).tolist()  # no other test's direction
    deep: dict = {"leaf": 1}
    for _ in range(300):
        deep = {"a": deep}
    for meta, needle in ((deep, "nested deeper than 64 levels"), ({"s": "\ud800"}, "unpaired surrogate"),
                         ({"\udc80": 1}, "unpaired surrogate")):  # fmt: skip
        body = json.dumps({"vectors": [vector], "metadata": [meta]})  # ensure_ascii: valid JSON text
        response = http.post(
            "/v1/indexes/items/items", content=body, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 422 and needle in response.json()["error"]["message"], response.text
    ok: dict = {"leaf": 1}
    for _ in range(63):
        ok = {"a": ok}
    added = http.post("/v1/indexes/items/items", json={"vectors": [vector], "metadata": [ok]})
    assert added.status_code == 200, added.text
    hits = http.post("/v1/search", json={"index": "items", "vector": vector, "k": 1}).json()["hits"]
    assert hits[0]["id"] == added.json()["ids"][0] and hits[0]["metadata"] == ok


def test_vectors_added_to_a_built_index_of_unit_vectors_are_normalised(model, tmp_path, photo_bytes):
    """An index from `visreg-hub index build` holds unit vectors but records normalize=False: a raw vector
    added through the API (here 3x an embedding) outranked everything with a "cosine" of 3."""
    from visreg_hub.retrieval import EmbeddingIndex
    from visreg_hub.serving.app import create_app
    from visreg_hub.serving.runtime import runtime_from_model

    embeddings = model.encode(photo_bytes, convert_to_numpy=True)  # L2-normalised
    built = EmbeddingIndex(embeddings.shape[1], metric="ip", model_name="tiny")
    built.add(embeddings)
    built.save(tmp_path / "built")
    assert built.normalized and not built.normalize
    config = ServeConfig(
        models=(ModelSpec("tiny", "tiny"),), indexes=(IndexSpec("built", tmp_path / "built"),)
    )
    with ThreadServer(create_app(config, runtimes={"tiny": runtime_from_model("tiny", model)})) as server:
        client = httpx.Client(base_url=server.url, timeout=60)
        assert client.get("/v1/indexes/built").json()["normalize"] is True
        added = client.post("/v1/indexes/built/items", json={"vectors": [(3 * embeddings[1]).tolist()]})
        assert added.status_code == 200
        hits = client.post("/v1/search", json={"index": "built", "vector": embeddings[0].tolist(), "k": 5})
        scores = {h["id"]: h["score"] for h in hits.json()["hits"]}
        assert max(scores.values()) == pytest.approx(1.0, abs=1e-5)  # the query's own item, a cosine
        assert scores[added.json()["ids"][0]] == pytest.approx(scores[1], abs=1e-5)  # 3x = the same direction
        shutil.copytree(tmp_path / "built", tmp_path / "crashed")  # a kill -9 now: the add is only in the log
    # after the crash, the add comes back from the log replay: normalised as when it was acknowledged
    config = ServeConfig(
        models=(ModelSpec("tiny", "tiny"),), indexes=(IndexSpec("built", tmp_path / "crashed"),)
    )
    with ThreadServer(create_app(config, runtimes={"tiny": runtime_from_model("tiny", model)})) as server:
        hits = httpx.post(server.url + "/v1/search", json={"index": "built", "vector": embeddings[0].tolist(),
                                                           "k": 5}, timeout=60)  # fmt: skip
        replayed = {h["id"]: h["score"] for h in hits.json()["hits"]}
        assert replayed == pytest.approx(scores, abs=1e-5)


def test_draft_decoding_server_equals_encode_with_draft_decode(model, photo_bytes):
    """`serve --draft-decode` and `encode(draft_decode=True)` share one decode path: equal embeddings."""
    from visreg_hub.serving.app import create_app
    from visreg_hub.serving.runtime import runtime_from_model

    with Image.open(io.BytesIO(photo_bytes[0])) as photo:
        buffer = io.BytesIO()
        photo.convert("RGB").resize((1280, 960), Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=92)
    big = buffer.getvalue()
    config = ServeConfig(models=(ModelSpec("tiny", "tiny"),), draft_decode=True)
    with ThreadServer(create_app(config, runtimes={"tiny": runtime_from_model("tiny", model)})) as server:
        response = httpx.post(server.url + "/v1/embeddings", json={"input": [b64(big)]}, timeout=60)
    got = np.asarray(response.json()["data"][0]["embedding"], np.float32)
    drafted = model.encode([big], draft_decode=True, convert_to_numpy=True)[0]
    np.testing.assert_allclose(got, drafted, rtol=0, atol=1e-6)
    assert not np.allclose(got, model.encode([big], convert_to_numpy=True)[0], rtol=0, atol=1e-6)


def test_an_index_of_another_pooling_takes_vector_queries_only(model, tmp_path, photo_bytes):
    """Same width, another space: images embedded with the served model's pooling found their own stored
    item first 0 times in 20 in a probe. Image queries and adds are refused with the reason instead."""
    from visreg_hub.retrieval import EmbeddingIndex
    from visreg_hub.serving.app import create_app
    from visreg_hub.serving.runtime import runtime_from_model

    assert model.config.pooling == "cls" and model.embedding_dim("mean_patch") == model.embedding_dim("cls")
    stored = model.encode(photo_bytes, pooling="mean_patch", convert_to_numpy=True)
    built = EmbeddingIndex(stored.shape[1], metric="ip", model_name="tiny", pooling="mean_patch")
    built.add(stored)
    built.save(tmp_path / "patches")
    config = ServeConfig(
        models=(ModelSpec("tiny", "tiny"),), indexes=(IndexSpec("patches", tmp_path / "patches"),)
    )
    with ThreadServer(create_app(config, runtimes={"tiny": runtime_from_model("tiny", model)})) as server:
        client = httpx.Client(base_url=server.url, timeout=60)
        assert client.get("/v1/indexes/patches").json()["model"] is None
        by_image = client.post("/v1/search", json={"index": "patches", "image": b64(photo_bytes[0]), "k": 1})
        assert by_image.status_code == 422
        assert "pooling 'mean_patch'" in by_image.json()["error"]["message"]
        added = client.post("/v1/indexes/patches/items", json={"images": [b64(photo_bytes[0])]})
        assert added.status_code == 422 and "embeds with 'cls'" in added.json()["error"]["message"]
        by_vector = client.post("/v1/search", json={"index": "patches", "vector": stored[2].tolist(), "k": 1})
        assert by_vector.json()["hits"][0]["id"] == 2


def test_an_attached_index_needs_its_own_name_and_a_served_model(model, tmp_path):
    """``Service.attach_index`` (the demo's galleries) refuses what would shadow a served index or embed
    queries with a model the server does not hold."""
    from visreg_hub.serving.app import create_app
    from visreg_hub.serving.runtime import runtime_from_model

    config = ServeConfig(
        models=(ModelSpec("tiny", "tiny"),), indexes=(IndexSpec("items", tmp_path / "items"),)
    )
    service = create_app(config, runtimes={"tiny": runtime_from_model("tiny", model)}).state.service
    try:
        store = service.indexes["items"]
        with pytest.raises(ConfigError, match="'items' is served twice"):
            service.attach_index("items", store, "tiny")
        with pytest.raises(ConfigError, match="model 'other' is not served"):
            service.attach_index("copy", store, "other")
        assert list(service.indexes) == ["items"] and service.writable_index("items") is store
    finally:
        service.close()


def test_the_work_of_a_client_that_disconnected_is_dropped(tiny_model_dir, fmnist_images):
    """uvicorn does not cancel a handler whose client has gone: without a watch on the connection a
    client that timed out (and retried, as the OpenAI SDK does) had every abandoned image embedded, and
    live clients got 429 meanwhile. Now the request's queued images are dropped and its room released."""
    from visreg_hub import from_pretrained
    from visreg_hub.serving.app import create_app
    from visreg_hub.serving.runtime import runtime_from_model

    model = from_pretrained(str(tiny_model_dir))
    runtime = runtime_from_model("tiny", model, str(tiny_model_dir))
    forward = runtime.pipeline.embed_pixels

    calls = []

    def slow_forward(pixels):  # the first batch takes 2 s: the client is gone long before it ends
        calls.append(len(pixels))
        time.sleep(2.0 if len(calls) == 1 else 0.05)
        return forward(pixels)

    runtime.pipeline.embed_pixels = slow_forward
    limits = Limits(max_items=16, max_queue=16, request_timeout_s=30.0)  # room for one request at a time
    config = ServeConfig(
        models=(ModelSpec("tiny", str(tiny_model_dir)),), max_batch_size=1, max_wait_ms=0.0, limits=limits
    )
    inputs = [b64(png_bytes(image)) for image in fmnist_images[:16]]
    with ThreadServer(create_app(config, runtimes={"tiny": runtime})) as server:
        body = json.dumps({"input": inputs}).encode()
        sock = _partial_request(server.url, body, len(body))  # the whole request, then gone
        time.sleep(0.5)
        sock.close()
        time.sleep(0.5)  # the disconnect is seen, the queued images are dropped
        assert server.service.admitted["tiny"] == 0
        with httpx.Client(base_url=server.url, timeout=30) as client:
            # at once a full queue's worth: admission and the batcher's queue both have the room back (the
            # batcher kept counting the dropped images until its next batch, and this got a 500)
            live = client.post("/v1/embeddings", json={"input": inputs})
            assert live.status_code == 200, live.text
            np.testing.assert_array_equal(
                as_matrix(live),
                model.encode([png_bytes(image) for image in fmnist_images[:16]], convert_to_numpy=True),
            )
            text = client.get("/metrics").text
            assert metric_value(text, "visreg_rejected_total", limit="client_disconnected") == 1
            assert sum(calls) == 1 + 16  # of the gone client's 16 images only the one in the forward pass


def test_an_add_whose_snapshot_fails_is_answered_200_and_the_failure_is_shown(model, tmp_path):
    """Probe 19: with a full disk the snapshot after a committed add raised, and the server answered 500 for
    an item it had stored (a client retrying made a duplicate); every later add did the same. The add is
    answered 200, GET /v1/indexes/NAME shows why the snapshot failed, and the items survive a restart."""
    from visreg_hub.serving.app import create_app
    from visreg_hub.serving.runtime import runtime_from_model

    folder = tmp_path / "shop"
    config = ServeConfig(
        models=(ModelSpec("tiny", "tiny"),),
        indexes=(IndexSpec("shop", folder, model="tiny"),),
        snapshot_every=2,
    )
    vectors = np.eye(model.embedding_dim(), dtype=np.float32)[:3]
    with ThreadServer(create_app(config, runtimes={"tiny": runtime_from_model("tiny", model)})) as server:
        client = httpx.Client(base_url=server.url, timeout=60)
        assert (
            client.post("/v1/indexes/shop/items", json={"vectors": [vectors[0].tolist()]}).status_code == 200
        )
        (folder / ".snapshot-000001.tmp").write_text("in the way")  # the snapshot's staging cannot be made
        for vector in vectors[1:]:
            assert (
                client.post("/v1/indexes/shop/items", json={"vectors": [vector.tolist()]}).status_code == 200
            )
        info = client.get("/v1/indexes/shop").json()
        assert info["count"] == 3 and "exists and is not a folder" in (info["snapshot_error"] or "")
    (folder / ".snapshot-000001.tmp").unlink()
    with ThreadServer(create_app(config, runtimes={"tiny": runtime_from_model("tiny", model)})) as server:
        info = httpx.get(server.url + "/v1/indexes/shop", timeout=60).json()
        assert info["count"] == 3 and info["snapshot_error"] is None
