"""``visreg_hub.Client`` against a real server: the same results as the local API it mirrors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import visreg_hub
from tests.serving.helpers import ThreadServer, png_bytes
from visreg_hub.errors import ImageDecodeError
from visreg_hub.serving.client import ServerError
from visreg_hub.serving.config import IndexSpec, ModelSpec, ServeConfig


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    from visreg_hub.serving.app import create_app
    from visreg_hub.serving.runtime import runtime_from_model

    model = visreg_hub.from_pretrained(str(tiny_model_dir))
    config = ServeConfig(
        models=(ModelSpec("tiny", str(tiny_model_dir)),),
        indexes=(IndexSpec("gallery", tmp_path_factory.mktemp("client") / "gallery"),),
    )
    app = create_app(config, runtimes={"tiny": runtime_from_model("tiny", model)})
    with ThreadServer(app) as server:
        yield model, server


def test_encode_is_a_one_line_switch(setup, fmnist_images, photo_bytes, tmp_path):
    model, server = setup
    path = tmp_path / "photo.jpg"
    path.write_bytes(photo_bytes[1])
    folder = tmp_path / "folder"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(fmnist_images[i]).save(folder / f"{i}.png")
    batch = np.stack([fmnist_images[8], fmnist_images[9]])[..., None]  # (N, H, W, C)
    inputs = [
        str(path), folder, photo_bytes[0], Image.fromarray(fmnist_images[5]), fmnist_images[6],
        torch.from_numpy(fmnist_images[7]).float() / 255, batch,
    ]  # fmt: skip
    local = model.encode(inputs)
    remote = visreg_hub.Client(server.url).encode(inputs, batch_size=4)
    assert isinstance(remote, torch.Tensor) and remote.dtype == torch.float32
    torch.testing.assert_close(remote, local, rtol=0, atol=0)
    as_numpy = visreg_hub.Client(server.url, model="tiny").encode(inputs[:2], convert_to_numpy=True)
    np.testing.assert_array_equal(as_numpy, local[:4].numpy())  # the folder holds 3 images
    dims = model.embedding_dim() // 2
    truncated = visreg_hub.Client(server.url).encode(inputs[:2], truncate_dim=dims)
    assert truncated.shape == (4, dims)
    torch.testing.assert_close(truncated, model.encode(inputs[:2], truncate_dim=dims), rtol=0, atol=2e-6)


def test_encode_errors_mirror_encode(setup, fmnist_images, tmp_path):
    model, server = setup
    good = png_bytes(fmnist_images[0])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    client = visreg_hub.Client(server.url)
    with pytest.raises(ImageDecodeError, match="input index 1"):
        client.encode([good, str(bad)])
    result = client.encode([good, str(bad), good], on_error="skip")
    local = model.encode([good, str(bad), good], on_error="skip")
    assert [f.index for f in result.failures] == [f.index for f in local.failures] == [1]
    torch.testing.assert_close(result.embeddings, local.embeddings, rtol=0, atol=0)


def test_search_add_remove_mirror_the_index(setup, fmnist_images):
    model, server = setup
    client = visreg_hub.Client(server.url)
    images = [png_bytes(a) for a in fmnist_images[20:30]]
    ids = client.add("gallery", images, metadata=[{"n": i} for i in range(10)])
    assert ids.dtype == np.int64 and len(set(ids.tolist())) == 10
    local = visreg_hub.EmbeddingIndex(32, metric="ip", normalize=True)
    local.add(model.encode(images, convert_to_numpy=True), ids=ids, metadata=[{"n": i} for i in range(10)])
    queries = model.encode(images[:3], convert_to_numpy=True)
    expected = local.search(queries, k=4)
    by_vector = client.search(queries, k=4, index="gallery")
    by_image = client.search(images[:3], k=4, index="gallery")
    for got in (by_vector, by_image):
        np.testing.assert_array_equal(got.ids, expected.ids)
        np.testing.assert_allclose(got.scores, expected.scores, rtol=1e-5, atol=1e-6)
        assert got.metadata == expected.metadata
    assert [client.metadata("gallery", i) for i in ids.tolist()] == [{"n": i} for i in range(10)]
    assert client.remove("gallery", int(ids[0])) is True
    assert client.remove("gallery", int(ids[0])) is False
    assert client.index_info("gallery")["count"] == 9
    assert client.indexes() == [client.index_info("gallery")]  # GET /v1/indexes lists each as its own route
    assert client.models()[0]["id"] == "tiny"


def test_client_errors(setup):
    _, server = setup
    with pytest.raises(ValueError, match="http"):
        visreg_hub.Client("ftp://x")
    with pytest.raises(visreg_hub.serving.client.ServerError, match="404"):
        visreg_hub.Client(server.url).search(np.ones(32, np.float32), index="missing")
    with pytest.raises(ConnectionError):
        visreg_hub.Client("http://127.0.0.1:9", timeout=2).models()


def test_request_errors_are_not_blamed_on_the_images(setup, fmnist_images, tmp_path):
    """A 422 about the request (here a too-wide truncate_dim) raises ServerError, even with
    on_error='skip'; only "no input could be embedded" becomes per-image failures, with each image's
    own message from the server."""
    model, server = setup
    client = visreg_hub.Client(server.url)
    good = png_bytes(fmnist_images[0])
    too_wide = model.embedding_dim() + 1
    for on_error in ("raise", "skip"):
        with pytest.raises(visreg_hub.serving.client.ServerError, match=f"dimensions {too_wide}"):
            client.encode([good], truncate_dim=too_wide, on_error=on_error)
    bad_png, bad_gif = tmp_path / "a.png", tmp_path / "b.gif"
    bad_png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 30)
    bad_gif.write_bytes(b"GIF89a broken")
    result = client.encode([str(bad_png), str(bad_gif)], on_error="skip")
    local = model.encode([str(bad_png), str(bad_gif)], on_error="skip")
    assert [f.index for f in result.failures] == [0, 1] and result.embeddings.shape == (0, 32)
    for remote, here in zip(result.failures, local.failures, strict=True):
        label = str(bad_png) if remote.index == 0 else str(bad_gif)
        assert remote.index == here.index and remote.reason.startswith(label)
        # the server's reason for this very image (decoded with the same rules), not one shared message
        assert remote.reason.split(": ", 1)[1].endswith(here.reason.split(": ", 1)[1]), (remote, here)


def test_numpy_ids_and_sizes_go_through_like_the_local_api(setup, fmnist_images):
    """Ids from an array and np.int64 sizes are what the local API takes; json.dumps refused them."""
    model, server = setup
    client = visreg_hub.Client(server.url)
    images = [png_bytes(a) for a in fmnist_images[:2]]
    ids = client.add("gallery", images, ids=np.array([9001, 9002]))
    assert ids.tolist() == [9001, 9002]
    assert client.add("gallery", images[:1], ids=[np.int64(9003)]).tolist() == [9003]
    by_ints = client.search([1] + [0] * 31, k=2, index="gallery")  # a vector of ints, not 32 images
    by_floats = client.search([1.0] + [0.0] * 31, k=2, index="gallery")
    np.testing.assert_array_equal(by_ints.ids, by_floats.ids)
    truncated = client.encode(images, truncate_dim=np.int64(8), convert_to_numpy=True)
    expected = model.encode(images, truncate_dim=8, convert_to_numpy=True)
    np.testing.assert_allclose(truncated, expected, atol=1e-6)


def test_a_server_that_stops_answering_is_a_connection_error_naming_it():
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    accepted = []
    threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    with pytest.raises(ConnectionError, match=r"127\.0\.0\.1.*/v1/models: the server timed out"):
        visreg_hub.Client(url, timeout=1).models()  # accepts, never answers
    listener.close()


@pytest.fixture(scope="module")
def small_server(tiny_model_dir, tmp_path_factory):
    """A server that takes at most 4 items per request, with an index whose name is not ASCII."""
    from visreg_hub.serving.app import create_app
    from visreg_hub.serving.config import Limits
    from visreg_hub.serving.runtime import runtime_from_model

    model = visreg_hub.from_pretrained(str(tiny_model_dir))
    folder = tmp_path_factory.mktemp("small")
    config = ServeConfig(
        models=(ModelSpec("tiny", str(tiny_model_dir)),),
        indexes=(IndexSpec("café", folder / "cafe"), IndexSpec("top", folder / "top")),
        limits=Limits(max_items=4),
    )
    app = create_app(config, runtimes={"tiny": runtime_from_model("tiny", model)})
    with ThreadServer(app) as server:
        yield model, server


def test_add_splits_what_one_request_cannot_carry(small_server, fmnist_images):
    """Probe: Client.add sent a whole folder in one request (a 413 over max_items) where encode() split it;
    it sends batch_size items per request now, and a refusal says which items were added before it."""
    model, server = small_server
    client = visreg_hub.Client(server.url)
    images = [png_bytes(a) for a in fmnist_images[:10]]
    before = client.index_info("café")["count"]
    ids = client.add("café", images, metadata=[{"n": i} for i in range(10)], batch_size=4)  # 4 + 4 + 2
    assert ids.shape == (10,) and len(set(ids.tolist())) == 10
    assert client.index_info("café")["count"] == before + 10  # the name travels percent-encoded
    assert [client.metadata("café", i) for i in ids.tolist()] == [{"n": i} for i in range(10)]
    hits = client.search(model.encode(images[7], convert_to_numpy=True), k=1, index="café")
    assert hits.ids[0, 0] == ids[7]
    # the third request is refused (an id already live): the first 8 stay added, and the error says so
    taken = ids[:1].tolist()
    with pytest.raises(ServerError) as refused:
        client.add("café", vectors=np.eye(9, 32, dtype=np.float32), ids=[900 + i for i in range(8)] + taken,
                   batch_size=4)  # fmt: skip
    assert refused.value.status == 409 and refused.value.code == "id_conflict"
    assert refused.value.added_ids.tolist() == list(range(900, 908))
    assert client.remove("café", 907) and not client.remove("café", 907)  # item_not_found by its code
    with pytest.raises(visreg_hub.errors.UserInputError, match="metadata has 2 entries for 3 items"):
        client.add("café", images[:3], metadata=[{}, {}])


def test_encode_takes_sentence_transformers_arguments(small_server, fmnist_images):
    """Probe: Client.encode refused normalize_embeddings, convert_to_tensor, show_progress_bar and precision,
    which model.encode takes; the same call now gives the same answer on both."""
    model, server = small_server
    client = visreg_hub.Client(server.url)
    images = [png_bytes(a) for a in fmnist_images[:6]]
    local = model.encode(images, normalize_embeddings=True, convert_to_numpy=True)
    remote = client.encode(images, normalize_embeddings=True, convert_to_numpy=True, convert_to_tensor=True,
                           show_progress_bar=False, batch_size=4)  # fmt: skip
    assert isinstance(remote, torch.Tensor)  # convert_to_tensor wins, as in sentence-transformers
    np.testing.assert_array_equal(remote.numpy(), local)
    for precision in ("int8", "uint8", "binary", "ubinary"):
        want = model.encode(images, precision=precision, calibration_embeddings=local, convert_to_numpy=True)
        got = client.encode(
            images, precision=precision, calibration_embeddings=local, convert_to_numpy=True, batch_size=4
        )
        assert got.dtype == want.dtype and got.shape == want.shape, precision
        np.testing.assert_array_equal(got, want)
    with pytest.raises(visreg_hub.errors.UserInputError, match="returns L2-normalised embeddings only"):
        client.encode(images[:1], normalize_embeddings=False)


def test_one_id_at_the_top_leaves_no_automatic_ids_and_says_so_before_embedding(small_server, fmnist_images):
    """Probe: after an explicit id at MAX_ID, an add without ids was a 422 'invalid_request_error' blaming
    the request, after embedding every image. It is a 409 'ids_exhausted' now, before any image is decoded;
    explicit ids still work."""
    import httpx

    from visreg_hub.retrieval.records import MAX_ID

    _, server = small_server
    client = visreg_hub.Client(server.url)
    client.add("top", vectors=np.eye(1, 32, dtype=np.float32), ids=[MAX_ID])
    metrics = lambda: httpx.get(f"{server.url}/metrics").text  # noqa: E731
    decoded = [line for line in metrics().splitlines() if line.startswith("visreg_decode_failures_total")]
    answer = httpx.post(f"{server.url}/v1/indexes/top/items", json={"images": ["bm90IGFuIGltYWdl"]})
    assert answer.status_code == 409, answer.text
    error = answer.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "ids_exhausted", "ids")
    assert "automatic ids are used up" in error["message"] and "pass explicit ids" in error["message"]
    assert [
        line for line in metrics().splitlines() if line.startswith("visreg_decode_failures_total")
    ] == decoded
    assert client.add("top", vectors=np.eye(1, 32, dtype=np.float32), ids=[3]).tolist() == [3]


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "type_", "code"),
    [
        ("GET", "/v1/models/nope", None, 404, "invalid_request_error", "model_not_found"),
        ("GET", "/v1/indexes/nope", None, 404, "invalid_request_error", "index_not_found"),
        ("GET", "/v1/indexes/top/items/123456", None, 404, "invalid_request_error", "item_not_found"),
        ("DELETE", "/v1/indexes/top/items/123456", None, 404, "invalid_request_error", "item_not_found"),
        ("POST", "/v1/embeddings", {"input": ["bm90IGFuIGltYWdl"]}, 422, "invalid_request_error",
         "input_not_embedded"),
        ("POST", "/v1/embeddings", {"input": ["x"] * 5}, 413, "invalid_request_error", None),
        ("GET", "/no/such/route", None, 404, "invalid_request_error", None),
    ],
)  # fmt: skip
def test_error_type_is_one_of_openais_by_status_and_code_says_what(
    small_server, method, path, body, status, type_, code
):
    """Probe: 404s came as type 'invalid_request_error' (models) or 'not_found' (indexes, items), and other
    answers as 'unavailable', 'timeout_error', 'conflict': a client switching on type saw several values
    for one kind of failure. type is OpenAI's, from the status; code says what went wrong."""
    import httpx

    _, server = small_server
    answer = httpx.request(method, f"{server.url}{path}", json=body)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert (error["type"], error["code"]) == (type_, code), error
    if path == "/v1/embeddings":
        assert error["param"] == "input"  # the field at fault, as the README promises
