"""demo.service and demo.cache in-process: the index cache, upload checks, results against the library,
and the bundled assets."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from demo import cache as demo_cache
from demo import make_gallery, menus, service
from demo.service import BundledAssetMissingError, DemoService, UserInputError
from tests.demo.conftest import BUNDLED_GALLERY, EXAMPLES, REPO, copy_gallery, hold_builds
from tests.fixtures_models import tiny_encoder
from visreg_hub.inference import list_image_files
from visreg_hub.retrieval import EmbeddingIndex

PHOTO = REPO / "tests" / "fixtures" / "photos" / "coffee.jpg"


def save_model(folder, seed: int):
    tiny_encoder(seed=seed, in_chans=1, mean=(0.2860,), std=(0.3530,)).save_pretrained(folder)
    return folder


def make_service(model_dir, gallery, tmp_path, **kwargs) -> DemoService:
    return DemoService(
        [str(model_dir)],
        [gallery],
        cache_dir=tmp_path / "cache",
        download_dir=tmp_path / "downloads",
        **kwargs,
    )


@pytest.fixture
def gallery(tmp_path):
    return copy_gallery(tmp_path / "gallery", per_class=2)


# -------------------------------------------------------------------------------------- index cache
def test_index_is_built_once_then_loaded_from_disk(demo_model_dir, demo_model, gallery, tmp_path):
    first = make_service(demo_model_dir, gallery, tmp_path).get_index()
    assert first.built and len(first.index) == 20
    assert [path for path, _ in first.failures] == ["broken/truncated.png"]
    assert "truncated.png" in first.failures[0][1] and str(gallery) not in first.failures[0][1]
    info = json.loads((first.folder / demo_cache.INFO_NAME).read_text())
    assert info["model"]["weights_sha256"] == demo_cache.sha256_file(demo_model_dir / "model.safetensors")

    second = make_service(demo_model_dir, gallery, tmp_path).get_index()  # a new process would do the same
    assert not second.built and second.folder == first.folder and second.failures == first.failures
    np.testing.assert_array_equal(second.index.ids, first.index.ids)
    query = demo_model.encode(EXAMPLES / "Bag_320.png")
    a, b = first.index.search(query, 5), second.index.search(query, 5)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.scores, b.scores)


def test_changed_gallery_or_model_rebuilds(demo_model_dir, gallery, tmp_path):
    model_dir = save_model(tmp_path / "model", seed=1)
    base = make_service(model_dir, gallery, tmp_path).get_index()

    image = next(gallery.glob("Bag/*.png"))
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))  # touched
    touched = make_service(model_dir, gallery, tmp_path).get_index()
    assert touched.built and touched.key != base.key

    shutil.copy(EXAMPLES / "Bag_320.png", gallery / "Bag" / "320.png")  # added
    added = make_service(model_dir, gallery, tmp_path).get_index()
    assert added.built and len(added.index) == len(base.index) + 1

    save_model(model_dir, seed=2)  # new weights in the same folder
    retrained = make_service(model_dir, gallery, tmp_path).get_index()
    assert retrained.built and retrained.key != added.key

    assert not make_service(model_dir, gallery, tmp_path).get_index().built  # and now it is cached


def test_a_running_service_follows_its_gallery_folder(demo_model_dir, gallery, tmp_path, monkeypatch):
    monkeypatch.setattr(service, "RESCAN_S", 0.0)  # list the folder on every request
    demo = make_service(demo_model_dir, gallery, tmp_path)
    query = EXAMPLES / "Bag_320.png"
    before = demo.search(None, None, query, 3)
    assert before.hits[0].score < 0.9999  # the example is not in the gallery
    added = gallery / "Bag" / "example.png"
    shutil.copy(query, added)
    after = demo.search(None, None, query, 3)
    assert after.hits[0].path == added and after.hits[0].score == pytest.approx(1.0, abs=1e-5)
    added.unlink()
    removed = demo.search(None, None, query, 3)
    assert [h.path for h in removed.hits] == [h.path for h in before.hits]
    assert demo.get_index() is demo.get_index()  # an unchanged folder keeps the index in memory


def test_building_one_gallery_does_not_hold_up_another(demo_model_dir, gallery, tmp_path, monkeypatch):
    import threading
    import time

    other = copy_gallery(tmp_path / "other", per_class=1)
    demo = DemoService([str(demo_model_dir)], [gallery, other], cache_dir=tmp_path / "cache",
                       download_dir=tmp_path / "downloads")  # fmt: skip
    demo.get_index()  # the first gallery, in memory
    started, release = hold_builds(monkeypatch)
    builder = threading.Thread(target=demo.get_index, args=(None, demo.gallery_choices[1].key))
    builder.start()
    assert started.wait(30)
    begin = time.perf_counter()
    hits = demo.search(None, None, EXAMPLES / "Bag_320.png", 3).hits  # the first gallery, meanwhile
    assert len(hits) == 3 and time.perf_counter() - begin < 10
    release.set()
    builder.join(30)
    assert not builder.is_alive()


def test_an_empty_or_unreadable_gallery_is_a_message_for_the_user(demo_model_dir, gallery, tmp_path):
    empty, broken = tmp_path / "empty", tmp_path / "broken"
    empty.mkdir()
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not a png")
    demo = DemoService([str(demo_model_dir)], [gallery, empty, broken], cache_dir=tmp_path / "cache",
                       download_dir=tmp_path / "downloads")  # fmt: skip
    with pytest.raises(UserInputError, match="contains no image files"):
        demo.get_index(None, demo.gallery_choices[1].key)
    with pytest.raises(UserInputError, match=r"no gallery image in .* could be decoded"):
        demo.get_index(None, demo.gallery_choices[2].key)


def test_switching_to_a_gallery_that_cannot_be_used_clears_the_results_and_says_why(
    demo_model_dir, gallery, tmp_path
):
    """Probe 20: the page's gallery switch raised when the gallery failed to load, which left every output
    as it was: the previous gallery's results stayed under the failed one's name. The page's own event
    functions now clear them and put the reason in the status line (two steps since a later probe: the
    clearing first, then the status line, which may wait for a build)."""
    from demo.app import build_app

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not a png")
    demo = DemoService([str(demo_model_dir)], [gallery, broken], cache_dir=tmp_path / "cache",
                       download_dir=tmp_path / "downloads")  # fmt: skip
    page = build_app(demo)
    clear = next(f.fn for f in page.fns.values() if f.name == "clear_retrieval")
    status = next(f.fn for f in page.fns.values() if f.name == "status")
    assert list(clear()) == [None, None, []]  # results, scores, hit paths
    info = status(demo.default_model, demo.gallery_choices[1].key)
    assert info.startswith("**Cannot search this gallery:**") and "could be decoded" in info
    assert "broken" in info and str(broken) not in info  # the folder's name, never its server path
    assert "Cannot" not in status(demo.default_model, demo.gallery_choices[0].key)


def test_an_example_of_another_bundled_set_than_the_gallery_shown_gets_a_note(tmp_path):
    """Probe 20: the examples of both bundled sets share one list, and a click searched the gallery shown
    (a garment among photos finds clipart at 0.98) without a word."""
    import warnings

    import gradio as gr

    from demo.app import build_app

    demo = DemoService(cache_dir=tmp_path / "cache", download_dir=tmp_path / "downloads")  # both bundled sets
    switch = next(f.fn for f in build_app(demo).fns.values() if f.name == "pick_example")
    photos, garments = (b.key for b in menus.BUNDLED_SETS)
    examples = demo.examples()
    garment = next(i for i, p in enumerate(examples) if menus.example_set(p).key == garments)
    photo = next(i for i, p in enumerate(examples) if menus.example_set(p).key == photos)

    def click(gallery_key, index):
        return switch(gallery_key, gr.SelectData(None, {"index": index, "value": None}))

    with pytest.warns(UserWarning, match=r"This example comes with the .*Fashion-MNIST.* set"):
        assert click(photos, garment) == str(examples[garment])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # its own set: no note
        assert click(photos, photo) == str(examples[photo])
        assert click(garments, garment) == str(examples[garment])


def test_corrupt_cache_entry_is_rebuilt(demo_model_dir, gallery, tmp_path, caplog):
    built = make_service(demo_model_dir, gallery, tmp_path).get_index()
    (built.folder / "ids.npy").write_bytes(b"tampered")
    again = make_service(demo_model_dir, gallery, tmp_path).get_index()
    assert again.built and "unusable" in caplog.text
    assert EmbeddingIndex.load(again.folder).count == built.index.count


def test_cache_key_covers_model_name_revision_and_gallery(demo_model, tmp_path):
    files = [demo_cache.GalleryFile("a/1.png", 10, 1)]
    by_name = demo_cache.model_identity("org/some-model", demo_model, revision="abc123")
    assert by_name["kind"] == "name" and by_name["revision"] == "abc123"
    assert by_name["weights_sha256"] == demo_cache.weights_digest(demo_model)
    keys = {
        demo_cache.cache_key(by_name, tmp_path, files),
        demo_cache.cache_key({**by_name, "revision": "def456"}, tmp_path, files),
        demo_cache.cache_key(by_name, tmp_path / "other", files),
        demo_cache.cache_key(by_name, tmp_path, [demo_cache.GalleryFile("a/1.png", 11, 1)]),
    }
    assert len(keys) == 4


# ------------------------------------------------------------------------ results against the library
def test_search_and_extract_equal_the_library(demo_model_dir, demo_model, gallery, tmp_path):
    demo = make_service(demo_model_dir, gallery, tmp_path)
    files = list_image_files(gallery)
    good = [i for i, f in enumerate(files) if f.parent.name != "broken"]
    embeddings = demo_model.encode([files[i] for i in good], convert_to_numpy=True)
    for query in (EXAMPLES / "Sandal_384.png", PHOTO):  # a colour JPEG goes to a 1-channel model as grey
        outcome = demo.search(None, None, query, 5)
        scores = embeddings @ demo_model.encode(query, convert_to_numpy=True)
        by_id = dict(zip(good, scores.tolist()))
        np.testing.assert_allclose([h.score for h in outcome.hits], np.sort(scores)[::-1][:5], atol=1e-5)
        np.testing.assert_allclose(
            [by_id[h.id] for h in outcome.hits], [h.score for h in outcome.hits], atol=1e-5
        )
        assert all(h.path == files[h.id] for h in outcome.hits)

        extraction = demo.extract(None, query)
        np.testing.assert_array_equal(extraction.embedding, demo_model.encode(query, convert_to_numpy=True))
        np.testing.assert_array_equal(np.load(extraction.npy_path), extraction.embedding)
        assert extraction.grid == (7, 7) and extraction.pca.size == extraction.overlay.size == (224, 224)


def test_bad_choices_and_k_are_refused(demo_model_dir, gallery, tmp_path):
    demo = make_service(demo_model_dir, gallery, tmp_path)
    with pytest.raises(UserInputError, match="unknown model '/etc'"):
        demo.search("/etc", None, EXAMPLES / "Bag_320.png", 3)
    with pytest.raises(UserInputError, match="unknown gallery"):
        demo.search(None, "/", EXAMPLES / "Bag_320.png", 3)
    for k in (0, 2.5, float("nan"), float("inf"), True, "3"):
        with pytest.raises(UserInputError, match="k must be a whole number from 1 to 50"):
            demo.search(None, None, EXAMPLES / "Bag_320.png", k)
    assert len(demo.search(None, None, EXAMPLES / "Bag_320.png", 3.0).hits) == 3  # a slider's float
    with pytest.raises(UserInputError, match="needs at least 4 blocks"):
        demo.extract(None, EXAMPLES / "Bag_320.png", pooling="cls_last4")
    with pytest.raises(UserInputError, match="upload one or pick an example"):
        demo.extract(None, None)


# ------------------------------------------------------------------------------------ upload checks
def _png_header(width: int, height: int) -> bytes:
    """A 1-bit PNG that declares ``width`` x ``height`` but holds almost no pixel data (Pillow's open reads
    the header and stops at the first IDAT chunk)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    pixels = chunk(b"IDAT", zlib.compress(b"\0"))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + pixels + chunk(b"IEND", b"")


def _png(size, mode="L", noise: bool = False) -> bytes:
    buffer = io.BytesIO()
    if noise:
        pixels = np.random.default_rng(0).integers(0, 256, size[::-1], dtype=np.uint8)
        Image.fromarray(pixels).save(buffer, format="PNG")
    else:
        Image.new(mode, size).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("name", "payload", "message"),
    [
        ("notes.txt", b"hello", "file type '.txt' is not accepted"),
        ("noext", b"hello", "file type '(none)' is not accepted"),
        ("empty.png", b"", "empty.png: empty file (0 bytes)"),
        ("text.png", b"hello world, not pixels", "not a readable image"),
        ("eps.png", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "not a readable image"),
        ("truncated.png", _png((64, 64), noise=True)[:2000], "truncated or corrupt"),
        (
            "big.png",
            _png((3000, 2000), "1"),
            "big.png: the image has too many pixels (3000 x 2000 = 6,000,000 pixels, limit 1,000,000); "
            "upload a smaller one (a large JPEG passes: it is decoded at a reduced size)",
        ),
        (  # over Pillow's own guard (2 x 89.5 Mpx), which answers before the header's size is read
            "huge.png",
            _png_header(14000, 13000),
            "huge.png: the image has too many pixels (182,000,000 pixels, limit 1,000,000); upload a smaller",
        ),
    ],
)
def test_check_query_refuses_bad_uploads(demo_model_dir, gallery, tmp_path, name, payload, message):
    demo = make_service(demo_model_dir, gallery, tmp_path, max_pixels=1_000_000)
    path = tmp_path / name
    path.write_bytes(payload)
    with pytest.raises(UserInputError) as info:
        demo.check_query(path)
    assert message in str(info.value)
    assert str(tmp_path) not in str(info.value) and "max_pixels" not in str(info.value)


def test_a_camera_jpeg_over_pillows_guard_is_decoded_reduced(demo_model_dir, gallery, tmp_path, monkeypatch):
    """A 200 Mpx phone photo was refused ("too many pixels"): the upload check opened it in full with Pillow,
    whose own guard (179 Mpx) fires before the reduced-size decode could apply. The guard is scaled down here
    (0.5 Mpx) so that a 1.9 Mpx photo stands for the 200 Mpx one."""
    demo = make_service(demo_model_dir, gallery, tmp_path)
    path = tmp_path / "camera.jpg"
    Image.open(PHOTO).convert("RGB").resize((1600, 1200)).save(path, quality=90)
    expected = demo.check_query(path)  # under the real guard
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 250_000)
    image = demo.check_query(path)
    assert image.size == expected.size == (800, 600)  # 1/2: the largest reduction keeping 448 px
    np.testing.assert_array_equal(np.asarray(image), np.asarray(expected))
    path.write_bytes(_png_header(1600, 1200))  # not a JPEG: nothing reduces it, the guard stands
    with pytest.raises(UserInputError, match="pixels"):
        demo.check_query(path.rename(tmp_path / "camera.png"))


def test_check_query_accepts_real_images(demo_model_dir, gallery, tmp_path):
    """Every file type the picker offers decodes (an .ico and a .dib were offered, then refused)."""
    demo = make_service(demo_model_dir, gallery, tmp_path)
    rgba, icon, dib = tmp_path / "rgba.webp", tmp_path / "icon.ico", tmp_path / "bitmap.dib"
    Image.new("RGBA", (40, 30), (255, 0, 0, 128)).save(rgba)
    Image.open(PHOTO).convert("RGB").resize((32, 32)).save(icon)
    Image.open(PHOTO).convert("RGB").resize((24, 16)).save(dib, format="DIB")
    for path in (PHOTO, EXAMPLES / "Bag_320.png", rgba, icon, dib):
        image = demo.check_query(path)
        assert image.mode == "RGB" and image.size[0] > 0


# ------------------------------------------------------------------------------------ missing assets
def test_missing_bundled_model_gives_a_clear_message(monkeypatch, tmp_path):
    monkeypatch.setattr(menus, "MODEL_ASSETS", tmp_path / "no-models")
    with pytest.raises(BundledAssetMissingError, match=r"bundled model is missing.*Pass --model"):
        DemoService(cache_dir=tmp_path / "c", download_dir=tmp_path / "d")


def test_app_exits_with_a_message_when_the_bundled_model_is_missing(monkeypatch, tmp_path, capsys):
    import signal

    from demo import app

    monkeypatch.setattr(menus, "MODEL_ASSETS", tmp_path / "no-models")
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    handler = signal.getsignal(signal.SIGTERM)
    try:
        assert app.main(["--cache-dir", str(tmp_path / "cache")]) == 2
    finally:
        signal.signal(signal.SIGTERM, handler)
    assert "error: the bundled model is missing" in capsys.readouterr().err


def test_app_exits_with_one_line_for_a_bad_device(monkeypatch, tmp_path, capsys):
    """The demo parsed --device itself: `--device bogus` was a torch traceback (review 15)."""
    import signal

    from demo import app

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    handler = signal.getsignal(signal.SIGTERM)
    try:
        for device in ("bogus", "cuda:99"):
            assert app.main(["--device", device, "--port", "0", "--cache-dir", str(tmp_path / "c")]) == 2
            err = capsys.readouterr().err
            assert f"error: device '{device}'" in err and "Traceback" not in err
    finally:
        signal.signal(signal.SIGTERM, handler)


# ------------------------------------------------------------------------------------ bundled assets
def test_bundled_gallery_and_examples_are_small_real_and_disjoint():
    images = list_image_files(BUNDLED_GALLERY)
    assert len(images) == 300
    assert {p.parent.name for p in images} == set(make_gallery.CLASS_NAMES)
    total = sum(p.stat().st_size for p in BUNDLED_GALLERY.rglob("*") if p.is_file())
    total += sum(p.stat().st_size for p in EXAMPLES.rglob("*") if p.is_file())
    assert total < 1_000_000
    assert "MIT License" in (BUNDLED_GALLERY / "LICENSE.md").read_text()
    assert "MIT License" in (EXAMPLES / "LICENSE.md").read_text()
    gallery_pixels = {np.asarray(Image.open(p)).tobytes() for p in images}
    examples = [p for p in DemoService.examples() if p.parent == EXAMPLES]
    assert len(examples) == 6
    for example in examples:
        with Image.open(example) as image:
            assert image.size == (28, 28) and image.mode == "L"
            assert np.asarray(image).tobytes() not in gallery_pixels


def test_make_gallery_builds_from_real_images(tmp_path):
    gallery, examples = make_gallery.build(tmp_path, per_class=3)
    images = list_image_files(gallery)
    assert len(images) == 30 and len(list_image_files(examples)) == 6
    source_images, labels, _ = make_gallery.load_test_images()
    for path in images[:5]:  # file name = index in the source, folder = its class
        index = int(path.stem)
        assert make_gallery.CLASS_NAMES[labels[index]] == path.parent.name
        np.testing.assert_array_equal(np.asarray(Image.open(path)), source_images[index])


def test_a_gallery_file_named_in_latin1_is_indexed_found_and_servable(demo_model_dir, gallery, tmp_path):
    source = next(gallery.glob("Bag/*.png"))
    odd = os.fsdecode(os.fsencode(gallery / "Bag") + b"/caf\xe9.png")  # a Latin-1 name
    try:
        shutil.copy(source, odd)
    except OSError as exc:  # e.g. macOS file systems insist on UTF-8 names
        pytest.skip(f"this file system refuses non-UTF-8 names: {exc}")
    demo = make_service(demo_model_dir, gallery, tmp_path)
    outcome = demo.search(None, None, odd, 2)
    assert [hit.score for hit in outcome.hits] == pytest.approx([1.0, 1.0], abs=1e-5)  # the file, its twin
    by_name = {hit.relpath: hit for hit in outcome.hits}
    hit = by_name["Bag/caf\\xe9.png"]  # shown readable; the stored bytes name the file exactly
    meta = outcome.index.index.get_metadata([hit.id])[0]
    assert bytes.fromhex(meta["path_bytes_hex"]) == b"Bag/caf\xe9.png"
    # Gradio serves UTF-8 paths only: the result is a same-content copy with a UTF-8 name
    assert str(hit.path).encode("utf-8") and hit.path.read_bytes() == source.read_bytes()
