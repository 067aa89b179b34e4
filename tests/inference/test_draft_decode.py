"""Draft (reduced-scale) JPEG decoding against the library's full decode: pixels, embeddings, plumbing."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.fixtures_models import tiny_encoder
from visreg_hub.errors import ImageDecodeError
from visreg_hub.inference import Preprocessor, encode
from visreg_hub.inference.images import ImageSource, decode_image
from visreg_hub.inference.preprocess import DRAFT_MARGIN, draft_size


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    if fmt == "MPO":  # phones' multi-picture JPEG: the photo plus a second frame
        image.save(buffer, fmt, save_all=True, append_images=[image.rotate(90)], quality=95)
    else:
        image.save(buffer, fmt, quality=95) if fmt == "JPEG" else image.save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def big_photo(photo_paths) -> Image.Image:
    """A real photo upscaled to 1600 x 1200 (camera-like size)."""
    with Image.open(photo_paths[0]) as photo:
        return photo.convert("RGB").resize((1600, 1200), Image.Resampling.BICUBIC)


def _decode(payload, max_pixels=10**8, draft_to=None):
    return decode_image(ImageSource(payload, "x"), max_pixels=max_pixels, draft_to=draft_to)


@pytest.mark.parametrize("fmt", ["JPEG", "MPO"])
def test_large_jpeg_is_decoded_at_reduced_scale(big_photo, fmt):
    payload = _encoded(big_photo, fmt)
    full = _decode(payload)
    reduced = _decode(payload, draft_to=112)
    assert full.size == (1600, 1200)
    # libjpeg scales by 1/8 here: the largest reduction keeping both sides >= draft_to
    assert reduced.size == (200, 150) and reduced.mode == "RGB"
    # the same picture: the reduced decode matches a box-downscale of the full decode closely
    reference = np.asarray(full.resize(reduced.size, Image.Resampling.BOX), dtype=np.float64)
    assert np.abs(np.asarray(reduced, dtype=np.float64) - reference).mean() < 4.0
    # 1/4 when 1/8 would go under draft_to on the shorter side (1200 / 8 = 150 < 160)
    assert _decode(payload, draft_to=160).size == (400, 300)
    # max_pixels bounds the decoded size: the reduced decode passes where the full one is refused
    _decode(payload, max_pixels=200 * 150, draft_to=112)
    with pytest.raises(ImageDecodeError, match="max_pixels"):
        _decode(payload, max_pixels=200 * 150)


@pytest.mark.parametrize(
    ("fmt", "size"), [("PNG", (1600, 1200)), ("JPEG", (200, 150)), ("JPEG", (223, 1600))]
)
def test_other_formats_and_small_jpegs_decode_exactly_as_without(big_photo, fmt, size):
    """PNG never; a JPEG under twice draft_to on its shorter side (here 223 < 224) is decoded in full."""
    payload = _encoded(big_photo.resize(size), fmt)
    reduced, full = _decode(payload, draft_to=112), _decode(payload)
    assert reduced.size == full.size
    np.testing.assert_array_equal(np.asarray(reduced), np.asarray(full))


@pytest.mark.parametrize("fmt", ["JPEG", "MPO"])
def test_a_jpeg_over_pillows_own_guard_decodes_reduced(big_photo, fmt, monkeypatch, tmp_path):
    """Pillow refuses an image over 2 x MAX_IMAGE_PIXELS (179 Mpx) inside Image.open, before a draft could
    scale it: a 200 Mpx phone photo was refused even with draft decoding on. Pillow's guard is scaled down
    here (0.5 Mpx: the 1.92 Mpx photo is over it) instead of encoding 200 Mpx."""
    payload = _encoded(big_photo, fmt)
    path = tmp_path / "photo.jpg"
    path.write_bytes(payload)
    expected = np.asarray(_decode(payload, draft_to=112))  # under the default guard
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 250_000)
    for source in (payload, path):
        reduced = decode_image(source, max_pixels=None, draft_to=112)
        np.testing.assert_array_equal(np.asarray(reduced), expected)  # 1/8: 200 x 150, the same pixels
        # without draft decoding, or when the reduced size is still over the guard, Pillow's refusal stands
        with pytest.raises(ImageDecodeError, match="pixels"):
            decode_image(source, max_pixels=None)
        with pytest.raises(ImageDecodeError, match="pixels"):
            decode_image(source, max_pixels=None, draft_to=1000)  # not draftable: 1200 < 2 x 1000
    # max_pixels still applies to the reduced size; a PNG over the guard is still refused
    with pytest.raises(ImageDecodeError, match="max_pixels"):
        decode_image(payload, max_pixels=200 * 150 - 1, draft_to=112)
    with pytest.raises(ImageDecodeError, match="pixels"):
        decode_image(_encoded(big_photo, "PNG"), max_pixels=None, draft_to=112)


def test_bad_bytes_give_the_library_error():
    with pytest.raises(ImageDecodeError, match=r"^x: "):
        _decode(b"\xff\xd8\xff garbage", max_pixels=10**6, draft_to=28)


def test_draft_size_keeps_the_margin_above_timms_resize():
    """timm resizes the shorter side to floor(size / crop_pct): 224 / 0.875 = 256; the draft keeps 2x."""
    config = {"input_size": (3, 224, 224), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bicubic",
              "crop_pct": 0.875}  # fmt: skip
    assert draft_size(Preprocessor(config)) == DRAFT_MARGIN * 256 == 512
    assert draft_size(Preprocessor({**config, "crop_pct": 1.0})) == DRAFT_MARGIN * 224


def test_encode_with_draft_decode_stays_close_to_a_full_decode(tmp_path, big_photo, photo_paths):
    model = tiny_encoder(img_size=32, patch_size=8).eval()
    big, small = [], []  # the draft target is 2 x 32 px here: small JPEGs (< 128 px) are never drafted
    for i, path in enumerate(photo_paths):
        with Image.open(path) as photo:
            photo = photo.convert("RGB")
            photo.resize((1280, 960), Image.Resampling.BICUBIC).save(tmp_path / f"big{i}.jpg", quality=92)
            photo.resize((150, 120), Image.Resampling.BICUBIC).save(tmp_path / f"small{i}.jpg", quality=92)
        big.append(tmp_path / f"big{i}.jpg")
        small.append(tmp_path / f"small{i}.jpg")
    with torch.no_grad():
        full = encode(model, big + small, convert_to_numpy=True)
        drafted = encode(model, big + small, convert_to_numpy=True, draft_decode=True)
        workers = encode(model, big, convert_to_numpy=True, draft_decode=True, num_workers=1, batch_size=2)
    n = len(big)
    np.testing.assert_array_equal(drafted[n:], full[n:])
    cosine = (drafted[:n] * full[:n]).sum(axis=1)  # both L2-normalised
    assert cosine.min() > 0.99, cosine
    assert not np.array_equal(drafted[:n], full[:n])  # the option did act on the large ones
    np.testing.assert_allclose(workers, drafted[:n], rtol=0, atol=1e-6)  # the same in DataLoader workers


def test_embed_records_draft_decode_and_refuses_to_mix_it_on_resume(tmp_path, photo_paths):
    pytest.importorskip("pyarrow")
    from visreg_hub.bulk import embed_dataset
    from visreg_hub.bulk.output import OutputMismatchError

    model = tiny_encoder(img_size=32, patch_size=8)
    out = embed_dataset(photo_paths, tmp_path / "emb", model=model, shard_size=2, draft_decode=True)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["draft_decode"] is True
    with pytest.raises(OutputMismatchError, match="draft_decode: True -> False"):  # not mixed into one job
        embed_dataset(photo_paths, tmp_path / "emb", model=model, shard_size=2)
    plain = embed_dataset(photo_paths, tmp_path / "plain", model=model, shard_size=2)
    assert "draft_decode" not in json.loads((plain / "manifest.json").read_text())["model"]


def test_cli_embed_draft_decode_flag(tmp_path, big_photo):
    from visreg_hub.cli import main

    model = tiny_encoder(img_size=32, patch_size=8)
    folder = model.save_pretrained(tmp_path / "m")
    photo = tmp_path / "big.jpg"
    big_photo.save(photo, quality=92)
    for flags, name in (([], "full.npy"), (["--draft-decode"], "draft.npy")):
        assert main(["embed", str(photo), "-o", str(tmp_path / name), "--model", str(folder), *flags]) == 0
    with torch.no_grad():
        expected = encode(model, [photo], draft_decode=True, convert_to_numpy=True)
    np.testing.assert_allclose(np.load(tmp_path / "draft.npy"), expected, rtol=0, atol=1e-6)
    assert not np.array_equal(np.load(tmp_path / "full.npy"), np.load(tmp_path / "draft.npy"))
