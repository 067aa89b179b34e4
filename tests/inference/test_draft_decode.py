"""Reduced-size JPEG decoding (the demo's memory guard) against the library's full decode."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from visreg_hub.errors import ImageDecodeError
from visreg_hub.inference.images import ImageSource, decode_image
from visreg_hub.serving.runtime import DRAFT_MARGIN, decode_reduced


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, quality=95) if fmt == "JPEG" else image.save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def big_photo(photo_bytes) -> Image.Image:
    """A real photo upscaled to 1600 x 1200 (camera-like size)."""
    with Image.open(io.BytesIO(photo_bytes[0])) as photo:
        return photo.convert("RGB").resize((1600, 1200), Image.Resampling.BICUBIC)


def test_large_jpeg_is_decoded_at_reduced_scale(big_photo):
    payload = _encoded(big_photo, "JPEG")
    needed = 28
    reduced = decode_reduced(payload, "x", max_pixels=10**8, needed=needed)
    full = decode_image(ImageSource(payload, "x"), max_pixels=10**8)
    assert full.size == (1600, 1200)
    # libjpeg scales by 1/8 here: the largest reduction keeping both sides >= DRAFT_MARGIN * needed
    assert reduced.size == (200, 150) and min(reduced.size) >= DRAFT_MARGIN * needed
    # the same picture: the reduced decode matches a box-downscale of the full decode closely
    reference = np.asarray(full.resize(reduced.size, Image.Resampling.BOX), dtype=np.float64)
    assert np.abs(np.asarray(reduced, dtype=np.float64) - reference).mean() < 4.0
    # max_pixels bounds the decoded size: the reduced decode passes where the full one is refused
    decode_reduced(payload, "x", max_pixels=200 * 150, needed=needed)
    with pytest.raises(ImageDecodeError, match="max_pixels"):
        decode_image(ImageSource(payload, "x"), max_pixels=200 * 150)


@pytest.mark.parametrize(("fmt", "size"), [("PNG", (1600, 1200)), ("JPEG", (200, 150))])
def test_other_formats_and_small_jpegs_decode_exactly_as_encode(big_photo, fmt, size):
    payload = _encoded(big_photo.resize(size), fmt)
    reduced = decode_reduced(payload, "x", max_pixels=10**8, needed=28)
    full = decode_image(ImageSource(payload, "x"), max_pixels=10**8)
    assert reduced.size == full.size
    np.testing.assert_array_equal(np.asarray(reduced), np.asarray(full))


def test_bad_bytes_give_the_library_error():
    with pytest.raises(ImageDecodeError, match=r"^x: "):
        decode_reduced(b"\xff\xd8\xff garbage", "x", max_pixels=10**6, needed=28)
