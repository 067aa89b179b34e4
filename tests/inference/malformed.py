"""Builders of malformed and unusual image files, made at test time from the real fixture photos."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def photo_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def png_bytes(image: Image.Image, **save_kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **save_kwargs)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` RGB pixels in a valid IHDR but carries no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def tiff_with_samples_per_pixel(samples: int) -> bytes:
    """A small RGB TIFF whose SamplesPerPixel tag (277) claims ``samples`` (Pillow logs an ERROR line)."""
    buffer = io.BytesIO()
    Image.new("RGB", (48, 64)).save(buffer, "TIFF")
    data = bytearray(buffer.getvalue())
    ifd = struct.unpack_from("<I", data, 4)[0]
    for entry in range(struct.unpack_from("<H", data, ifd)[0]):
        offset = ifd + 2 + 12 * entry
        if struct.unpack_from("<H", data, offset)[0] == 277:
            struct.pack_into("<H", data, offset + 8, samples)
    return bytes(data)


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def sixteen_bit_png(values: np.ndarray) -> bytes:
    """16-bit grayscale PNG of a (H, W) uint16 array."""
    image = Image.fromarray(values.astype(np.uint16))
    assert image.mode == "I;16"  # test-setup sanity: Pillow must write a real 16-bit PNG
    return png_bytes(image)


def palette_png_with_transparency() -> bytes:
    """2x2 palette image: index 0 (red) is fully transparent, index 1 is opaque blue."""
    image = Image.new("P", (2, 2))
    image.putpalette([255, 0, 0, 0, 0, 255] + [0, 0, 0] * 254)
    image.putdata([0, 1, 1, 0])
    return png_bytes(image, transparency=0)


def animated_gif(colours: list[tuple[int, int, int]]) -> bytes:
    frames = [Image.new("RGB", (8, 6), colour) for colour in colours]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buffer.getvalue()


def jpeg_with_orientation(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


def float_tiff(values: np.ndarray) -> bytes:
    image = Image.fromarray(values.astype(np.float32))
    assert image.mode == "F"
    buffer = io.BytesIO()
    image.save(buffer, "TIFF")
    return buffer.getvalue()
