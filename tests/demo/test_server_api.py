"""The real demo server, driven with gradio_client and plain HTTP.

Numbers are compared with the library computed here, independently of the server: embeddings with
``model.encode`` of the same file, retrieval with an EmbeddingIndex and a numpy brute force over
``model.encode`` of the gallery files.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from tests.demo.conftest import BUNDLED_GALLERY, EXAMPLES, REPO, SERVER_MAX_FILE_SIZE, SERVER_MAX_PIXELS
from visreg_hub.inference import list_image_files
from visreg_hub.retrieval import EmbeddingIndex

PHOTO = REPO / "tests" / "fixtures" / "photos" / "chelsea.jpg"  # colour JPEG for a 1-channel model


@pytest.fixture(scope="module")
def client(demo_server, tmp_path_factory) -> Client:
    downloads = tmp_path_factory.mktemp("client_downloads")
    return Client(demo_server.url, verbose=False, download_files=str(downloads), analytics_enabled=False)


@pytest.fixture(scope="module")
def gallery_reference(demo_model, demo_gallery):
    """(files, embeddings) of the decodable gallery images, by the library; ids = positions in files."""
    files = list_image_files(demo_gallery)
    good = [i for i, f in enumerate(files) if f.parent.name != "broken"]
    embeddings = demo_model.encode([files[i] for i in good], convert_to_numpy=True)
    return files, np.asarray(good), embeddings


def menu_value(client: Client, elem_id: str) -> str:
    """The default value of a menu on the page (what the browser would send)."""
    config = httpx.get(client.src.rstrip("/") + "/config", timeout=10).json()
    for component in config["components"]:
        if component.get("props", {}).get("elem_id") == elem_id:
            return component["props"]["value"]
    raise AssertionError(f"no #{elem_id} on the page")


@pytest.fixture(scope="module")
def menus(client) -> dict[str, str]:
    return {"model": menu_value(client, "model-choice"), "gallery": menu_value(client, "gallery-choice")}


def extract(client: Client, menus, path: Path, pooling: str = "model default", normalize: bool = True):
    return client.predict(menus["model"], handle_file(str(path)), pooling, normalize, api_name="/extract")


def search(client: Client, menus, path: Path, k: int):
    return client.predict(menus["model"], menus["gallery"], handle_file(str(path)), k, api_name="/search")


def test_menus_offer_what_the_operator_named(menus, demo_model_dir, demo_gallery):
    # a model by its name (its id in /v1/models), a gallery by its folder's name (its index name in the
    # API; it was the server path): never a path
    assert menus == {"model": demo_model_dir.name, "gallery": demo_gallery.name}


@pytest.mark.parametrize(
    "query", [EXAMPLES / "Sneaker_309.png", PHOTO], ids=["fmnist-example", "colour-photo"]
)
def test_search_matches_library_brute_force_and_index(
    client, menus, demo_model, demo_gallery, gallery_reference, query
):
    files, ids, embeddings = gallery_reference
    k = 7
    gallery, rows = search(client, menus, query, k)
    assert [row["rank"] for row in rows] == list(range(1, k + 1))
    assert len(gallery) == k

    q = demo_model.encode(query, convert_to_numpy=True)  # (E,): one image in, one vector out
    scores = (embeddings.astype(np.float64) @ q.astype(np.float64)).astype(np.float32)
    order = np.argsort(-scores, kind="stable")[:k]
    server_ids = np.array([row["id"] for row in rows])
    server_scores = np.array([row["score"] for row in rows])
    # scores: the k best, in order; ids: each server hit has the score the server reports (tie-proof)
    np.testing.assert_allclose(server_scores, scores[order], atol=1e-5)
    by_id = dict(zip(ids.tolist(), scores.tolist()))
    np.testing.assert_allclose([by_id[i] for i in server_ids], server_scores, atol=1e-5)
    assert [row["file"] for row in rows] == [
        files[i].relative_to(demo_gallery).as_posix() for i in server_ids
    ]

    index = EmbeddingIndex(embeddings.shape[1])
    index.add(embeddings, ids=ids)
    expected = index.search(q, k)
    np.testing.assert_allclose(server_scores, expected.scores[0], atol=1e-5)
    gaps = np.abs(np.diff(expected.scores[0]))
    if gaps.min(initial=1.0) > 1e-5:  # no near-ties: the order is fully determined
        assert server_ids.tolist() == expected.ids[0].tolist()
    # the captions carry label and score; the images are the gallery files, byte for byte
    for item, row in zip(gallery, rows):
        assert item["caption"] == f"{row['score']:.3f} · {row['label']}"
        assert Path(item["image"]).read_bytes() == files[row["id"]].read_bytes()


def test_search_the_bundled_gallery_chosen_in_the_menu(client, menus, demo_model):
    """The operator's --gallery is the default; the bundled one is offered too and indexed on first use."""
    query, k = EXAMPLES / "Trouser_216.png", 5
    _, rows = client.predict(menus["model"], "bundled", handle_file(str(query)), k, api_name="/search")
    files = list_image_files(BUNDLED_GALLERY)
    scores = demo_model.encode(files, convert_to_numpy=True) @ demo_model.encode(query, convert_to_numpy=True)
    np.testing.assert_allclose([row["score"] for row in rows], np.sort(scores)[::-1][:k], atol=1e-5)
    assert [row["file"] for row in rows] == [
        files[row["id"]].relative_to(BUNDLED_GALLERY).as_posix() for row in rows
    ]


def test_extract_matches_model_encode(client, menus, demo_model):
    stats, plot, npy_path, view, pca, overlay = extract(client, menus, PHOTO)
    embedding = np.load(npy_path, allow_pickle=False)
    expected = demo_model.encode(PHOTO, convert_to_numpy=True)
    assert embedding.dtype == np.float32 and embedding.shape == expected.shape
    np.testing.assert_allclose(embedding, expected, atol=1e-6)
    assert f"| {expected.shape[0]} | 1.0000 | cls | yes |" in stats
    np.testing.assert_allclose([value for _, value in plot["data"]], expected, atol=1e-6)
    for picture in (view, pca, overlay):
        with Image.open(picture) as image:
            assert image.size == (224, 224)  # 28 px model input x 8
    with Image.open(pca) as image:  # 7x7 patch grid upscaled by 32: constant colour inside each patch
        block = np.asarray(image.convert("RGB"))[:32, :32]
        assert (block == block[0, 0]).all()


def test_extract_pooling_and_normalize_options(client, menus, demo_model):
    query = EXAMPLES / "Bag_320.png"
    _, _, npy_path, *_ = extract(client, menus, query, pooling="mean_patch", normalize=False)
    expected = demo_model.encode(query, pooling="mean_patch", normalize=False, convert_to_numpy=True)
    np.testing.assert_allclose(np.load(npy_path), expected, atol=1e-5)
    assert abs(float(np.linalg.norm(expected)) - 1.0) > 1e-3  # really not normalised


def _png_bytes(size: tuple[int, int], mode: str = "1") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def assert_still_serving(client: Client, menus, demo_model) -> None:
    _, _, npy_path, *_ = extract(client, menus, EXAMPLES / "Trouser_216.png")
    expected = demo_model.encode(EXAMPLES / "Trouser_216.png", convert_to_numpy=True)
    np.testing.assert_allclose(np.load(npy_path), expected, atol=1e-6)


def test_oversized_upload_is_refused_and_server_keeps_serving(
    demo_server, client, menus, demo_model, tmp_path
):
    big = tmp_path / "big.png"
    noise = np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8)  # incompressible
    Image.fromarray(noise).save(big)
    assert big.stat().st_size > SERVER_MAX_FILE_SIZE
    # gradio_client reads the limit from the server's config and refuses before sending...
    with pytest.raises(ValueError, match=f"exceeds the maximum file size of {SERVER_MAX_FILE_SIZE} bytes"):
        extract(client, menus, big)
    # ...and the server's upload route refuses it from clients that do not check
    with big.open("rb") as handle:
        upload = demo_server.url.rstrip("/") + "/gradio_api/upload"
        response = httpx.post(upload, files={"files": ("big.png", handle)}, timeout=30)
    assert response.status_code == 413
    assert f"maximum allowed size of {SERVER_MAX_FILE_SIZE} bytes" in response.text
    assert_still_serving(client, menus, demo_model)


def test_too_many_pixels_gives_a_clear_message(client, menus, demo_model, tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_bytes((2000, 1000)))  # 2 MP of 1-bit zeros: a few KB on disk
    assert bomb.stat().st_size < SERVER_MAX_FILE_SIZE
    with pytest.raises(AppError) as info:
        search(client, menus, bomb, 3)
    message = str(info.value)
    assert "bomb.png" in message and f"{SERVER_MAX_PIXELS:,}" in message
    assert "2000 x 1000 = 2,000,000 pixels" in message
    assert "Traceback" not in message and str(tmp_path) not in message
    assert_still_serving(client, menus, demo_model)


@pytest.mark.parametrize(
    ("name", "payload", "expected"),
    [
        ("garbage.png", b"this is not an image at all" * 10, "not a readable image"),
        ("empty.jpg", b"", "empty.jpg: empty file (0 bytes)"),
        ("truncated.png", (EXAMPLES / "Bag_320.png").read_bytes()[:300], "truncated or corrupt"),
        ("cut.jpg", (REPO / "tests" / "fixtures" / "photos" / "coffee.jpg").read_bytes()[:2000], "truncated"),
        ("fake.png", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "not a readable image"),
        ("notes.txt", b"hello", "Invalid file type"),
        ("<b>x<i>.png", b"junk", "not a readable image"),
    ],
)
def test_malformed_uploads_get_a_clear_message(client, menus, demo_model, tmp_path, name, payload, expected):
    path = tmp_path / name
    path.write_bytes(payload)
    with pytest.raises(AppError) as info:
        extract(client, menus, path)
    message = str(info.value)
    assert expected in message
    assert "Traceback" not in message and "<b>" not in message and str(tmp_path) not in message
    assert_still_serving(client, menus, demo_model)


def test_files_outside_the_gallery_are_refused(demo_server, demo_gallery, demo_model_dir):
    base = demo_server.url.rstrip("/") + "/gradio_api/file="
    refused = [
        "/etc/passwd",
        str(REPO / "pyproject.toml"),
        str(demo_model_dir / "model.safetensors"),
        str(demo_gallery / ".." / ".." / "demo_model0" / "config.json"),
        str(demo_gallery) + "/../../../../../../etc/passwd",
        str(demo_server.root / "cache"),
        str(demo_server.log_path),
    ]
    for path in refused:
        response = httpx.get(base + path, timeout=10)
        assert response.status_code in (403, 404), (path, response.status_code)
        assert "root:" not in response.text
    served = next(demo_gallery.glob("Bag/*.png"))
    response = httpx.get(base + str(served), timeout=10)
    assert response.status_code == 200 and response.content == served.read_bytes()


def test_forged_server_path_in_an_api_call_is_refused(demo_server, menus):
    """A client cannot make the server read its own files by naming them instead of uploading."""
    call = demo_server.url.rstrip("/") + "/gradio_api/call/extract"
    forged = {"path": "/etc/passwd", "orig_name": "passwd.png", "meta": {"_type": "gradio.FileData"}}
    response = httpx.post(call, json={"data": [menus["model"], forged, "model default", True]}, timeout=10)
    assert response.status_code == 200
    event_id = response.json()["event_id"]
    with httpx.stream("GET", f"{call}/{event_id}", timeout=30) as stream:
        body = "".join(stream.iter_text())
    assert "event: error" in body and "root:" not in body
    assert not any("passwd" in json.dumps(line) for line in body.splitlines() if line.startswith("data: [{"))
