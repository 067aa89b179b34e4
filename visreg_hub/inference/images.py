"""Robust image decoding: any supported input -> an 8-bit RGB ``PIL.Image``, or a per-item error.

Every input of :func:`visreg_hub.inference.encode` goes through
:func:`~visreg_hub.inference.inputs.expand_inputs` (folders are listed, 4-D batches split) and then
:func:`decode_image`, which applies these rules:

* Files (``str``/``Path``) and encoded ``bytes`` are opened with Pillow and fully decoded (``.load()``)
  so truncated and corrupt files fail here, with a reason, instead of later or silently.
  ``ImageFile.LOAD_TRUNCATED_IMAGES`` is never changed. A file whose pixel data is complete but whose
  trailer is missing (e.g. a PNG without its final IEND chunk) decodes normally. A path must name a
  regular file (links followed): a FIFO, socket, device or symlink loop is refused from its status and
  never opened (opening a FIFO blocks until a writer appears).
* Only common raster formats are parsed (:data:`DEFAULT_FORMATS`: JPEG, PNG, GIF, BMP, TIFF, WebP, PPM
  and their close relatives). Pillow can also open EPS (which runs Ghostscript), PSD and dozens of
  rarely used formats; untrusted uploads should not reach those parsers, so they are refused unless the
  caller passes ``formats=None`` to :func:`decode_image`.
* A pixel cap (``max_pixels``, default Pillow's 89,478,485) rejects decompression bombs from the header
  alone, before any pixel data is decoded.
* Opt-in draft decoding (``draft_to``): a JPEG at least twice ``draft_to`` on its shorter side is decoded
  by libjpeg at 1/2, 1/4 or 1/8 scale (Pillow's ``draft``), the largest reduction that keeps both sides
  >= ``draft_to``. A 12 Mpx photo then costs a fraction of its full decode in time and memory; every
  other image decodes exactly as without it. The pixel cap then applies to the reduced size, and so does
  Pillow's own guard (``2 * PIL.Image.MAX_IMAGE_PIXELS``, 179 Mpx): a 200 Mpx phone photo decodes at 1/8.
* EXIF orientation is applied (``ImageOps.exif_transpose``).
* Animated GIF / APNG / WebP / multi-page TIFF: the first frame is used.
* Transparency (RGBA, LA, PA, palette or colour-key transparency) is composited on a white background.
* 16-bit images (``I;16*``, and ``I`` with values in [0, 65535] above 255) are scaled to 8 bit as
  ``round(v / 257)`` (full range kept, never clipped). Float images (``F``) in [0, 1] are scaled by 255.
  Any other ``I`` image with values in [0, 255], or ``F`` image of whole numbers in [0, 255], is 8-bit
  data in a 32-bit container (``L.convert("I")``, ``L.convert("F")``) and is read as it is, as Pillow and
  timm read it. ``I``/``F``
  images outside those ranges are min-max stretched to [0, 255], since such scientific data has no white
  point.
* CMYK, grayscale, 1-bit, YCbCr and the rest are converted to RGB with Pillow's conversions (ICC
  profiles are not applied).
* A binary file object (``open(path, "rb")``, ``io.BytesIO``, a web framework's upload handle: anything
  with ``.read()`` returning bytes) is ONE encoded image: its bytes are read at once and decoded like
  ``bytes``. Iterating it would split it into lines, one bogus image per line. A text-mode file object is
  refused, with what to pass instead.
* numpy arrays are HWC (or HW): ``uint8`` (0-255), ``uint16`` (scaled by 1/257), or float in [0, 1];
  1, 2, 3 or 4 channels (L, LA, RGB, RGBA). A 4-D array is a batch of HWC images.
* torch tensors are CHW (or HW, or a 4-D BCHW batch): ``uint8`` or float in [0, 1]. A float tensor is
  treated as raw pixels, quantised to 8 bit and preprocessed like a file; an already normalised
  batch (values outside [0, 1]) is refused with a pointer to ``model(batch)``.

Errors are :class:`~visreg_hub.errors.ImageDecodeError` whose message starts with the item's label
(the file path, or ``item K`` for in-memory inputs) followed by the reason.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, JpegImagePlugin, UnidentifiedImageError

from visreg_hub.errors import ImageDecodeError
from visreg_hub.inference.image_files import open_regular_file
from visreg_hub.inference.pixel_arrays import array_to_uint8, high_depth_to_uint8, tensor_to_hwc
from visreg_hub.models.limits import DEFAULT_MAX_PIXELS

logger = logging.getLogger(__name__)

# DEFAULT_MAX_PIXELS (Pillow's warning threshold) is a per-call cap: the global stays untouched.
# The fix a pixel-cap message offers: where the cap is raised (a library caller, the CLI, the servers).
PIXEL_CAP_HINT = (
    "raise the cap only for files you trust (encode(max_pixels=...), --max-pixels of visreg-hub embed, "
    "of visreg-hub serve and of the demo)"
)
# Pillow format identifiers accepted by default (see the module docstring for why there is a list).
# Multi-picture JPEGs (MPO, from phones) open through the JPEG plugin.
DEFAULT_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "GIF", "BMP", "DIB", "TIFF", "WEBP", "PPM", "ICO")

# File extensions listed from folders (and offered by the demo's upload): one or more for every format in
# DEFAULT_FORMATS, so a file type that decodes as bytes is also found in a folder and accepted as an upload.
IMAGE_EXTENSIONS = (
    ".bmp", ".dib", ".gif", ".ico", ".jfif", ".jpe", ".jpeg", ".jpg", ".pbm", ".pgm", ".png", ".pnm", ".ppm",
    ".tif", ".tiff", ".webp",
)  # fmt: skip

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_WHITE = (255, 255, 255, 255)


@dataclass(frozen=True)
class ImageSource:
    """One image to decode, after :func:`~visreg_hub.inference.inputs.expand_inputs`.

    Attributes:
        payload: a ``Path``, encoded ``bytes``, ``PIL.Image``, numpy array or torch tensor.
        label: how errors name it: the file path, or ``item K`` / ``item K[J]`` for in-memory inputs.
        error: set when expansion already knows the item is bad (e.g. an empty folder); decoding it
            raises :class:`ImageDecodeError` with this reason.
    """

    payload: Any
    label: str
    error: str | None = None


# The types that are one image each (a file object too, see is_file_like); anything else is iterated.
SINGLE_INPUT_TYPES = (str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray, torch.Tensor)


def is_file_like(obj: Any) -> bool:
    """``obj`` is an open file or file-like stream (``BytesIO``, an upload handle): it has ``.read()``.

    Such objects are also iterable (line by line), so this check must come before any iteration.
    """
    return not isinstance(obj, SINGLE_INPUT_TYPES) and callable(getattr(obj, "read", None))


TEXT_FILE_REASON = (
    "a text-mode file object is not an image; open the image in binary mode (open(path, 'rb')) or pass "
    "its path; for a text file that lists image paths pass [line.strip() for line in f]"
)


def file_object_source(handle: Any, label: str) -> ImageSource:
    """One file object -> one :class:`ImageSource` holding its encoded bytes, or a failing item.

    The bytes are read here, not at decode time: an open handle cannot be sent to DataLoader worker
    processes, and the caller may close it as soon as ``encode()`` has expanded its inputs.
    """
    name = getattr(handle, "name", None)
    label = f"{label} (file {name})" if isinstance(name, str) else f"{label} (file object)"
    if isinstance(handle, io.TextIOBase):  # refused without reading: sys.stdin must not block
        return ImageSource(None, label, TEXT_FILE_REASON)
    try:
        data = handle.read()
    except Exception as exc:  # why: closed (ValueError), write-only (UnsupportedOperation), I/O errors...
        return ImageSource(None, label, f"file object cannot be read ({type(exc).__name__}: {exc})")
    if isinstance(data, str):  # a text stream that is not an io.TextIOBase (e.g. a wrapper)
        return ImageSource(None, label, TEXT_FILE_REASON)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        reason = f"file object's read() returned {type(data).__name__}, not bytes; pass the image's bytes"
        return ImageSource(None, label, reason)
    return ImageSource(bytes(data), label)


def decode_image(
    source: Any,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    formats: tuple[str, ...] | None = DEFAULT_FORMATS,
    draft_to: int | None = None,
) -> Image.Image:
    """Decode one image to an 8-bit RGB ``PIL.Image`` (rules in the module docstring).

    Args:
        source: an :class:`ImageSource`, or any single input accepted by
            :func:`~visreg_hub.inference.inputs.expand_inputs` (path, bytes, binary file object, PIL
            image, HWC array, CHW tensor).
        max_pixels: refuse images with more pixels than this (width * height, read from the header
            before decoding); None disables this cap. Pillow's own hard limit
            (``2 * PIL.Image.MAX_IMAGE_PIXELS``) still applies.
        formats: Pillow format identifiers that encoded files and bytes may be parsed as; None lets
            every installed Pillow plugin try (only for trusted files).
        draft_to: decode large JPEG files and bytes at a reduced scale keeping both sides >= this many
            pixels (see the module docstring); None (default) decodes every image at full size.

    Returns:
        A fully loaded RGB image that holds no open file.

    Raises:
        ImageDecodeError: the message names the item and the reason.
    """
    if isinstance(source, (str, os.PathLike)):
        source = ImageSource(Path(source), str(source))  # errors name the file, as in encode()
    elif is_file_like(source):
        source = file_object_source(source, f"{type(source).__name__} input")
    elif not isinstance(source, ImageSource):
        source = ImageSource(source, f"{type(source).__name__} input")
    if source.error is not None:
        raise ImageDecodeError(f"{source.label}: {source.error}")
    payload = source.payload
    if isinstance(payload, (Path, bytes)):
        return _decode_encoded(payload, source.label, max_pixels, formats, draft_to)
    if isinstance(payload, Image.Image):
        _check_pixels(payload.size, source.label, max_pixels)
        try:
            payload.load()
            # not in place: the caller's image must not change; the copy also detaches it
            return _to_rgb(ImageOps.exif_transpose(payload), source.label)
        except ImageDecodeError:
            raise
        except Exception as exc:  # why: a lazily opened PIL image can still hold a corrupt file
            raise ImageDecodeError(f"{source.label}: PIL image could not be loaded: {exc}") from exc
    if isinstance(payload, torch.Tensor):
        payload = tensor_to_hwc(payload, source.label)
    if isinstance(payload, np.ndarray):
        image = Image.fromarray(array_to_uint8(payload, source.label))
        _check_pixels(image.size, source.label, max_pixels)
        return _to_rgb(image, source.label)
    raise ImageDecodeError(
        f"{source.label}: unsupported input type {type(payload).__name__}; pass a path, bytes, "
        "PIL image, numpy array (H, W, C) or tensor (C, H, W)"
    )


def _check_pixels(size: tuple[int, int], label: str, max_pixels: int | None) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise ImageDecodeError(f"{label}: image has an empty size {width}x{height}")
    if max_pixels is not None and width * height > max_pixels:
        raise _over_cap(label, max_pixels, size)


_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _check_ico_frames(fp: Any, label: str, max_pixels: int | None) -> None:
    """Apply the pixel cap to every frame of an ICO file by the frame's own header, before Pillow opens it.

    why: an ICO directory declares sizes of at most 256 px, but a frame is a PNG or a BMP of any size,
    and Pillow's ICO plugin decodes the largest frame in full inside ``Image.open`` (a 12000x12000 PNG in
    a 0.5 MB ICO: 576 MB) before anyone sees its size. Reading each frame's header costs a few bytes;
    ``fp`` is left at the start. Anything that is not an ICO directory is left to Pillow.
    """
    if max_pixels is None:
        return
    try:
        head = fp.read(6)
        if len(head) < 6 or head[:4] != b"\x00\x00\x01\x00":
            return
        (count,) = struct.unpack("<H", head[4:6])
        offsets = []
        for _ in range(count):
            entry = fp.read(16)
            if len(entry) < 16:
                return  # a truncated directory: Pillow's error says so
            offsets.append(struct.unpack("<I", entry[12:16])[0])
        for offset in offsets:
            fp.seek(offset)
            frame = fp.read(24)
            if frame[:8] == _PNG_MAGIC and len(frame) >= 24:
                width, height = struct.unpack(">II", frame[16:24])  # the IHDR chunk's first fields
            elif len(frame) >= 12:  # a BMP info header; an icon's height counts the XOR and AND masks
                width, height = (abs(v) for v in struct.unpack("<ii", frame[4:12]))
                height //= 2
            else:
                continue
            _check_pixels((max(width, 1), max(height, 1)), label, max_pixels)
    finally:
        fp.seek(0)


def _over_cap(
    label: str, max_pixels: int, size: tuple[int, int] | None = None, pixels: int | None = None
) -> ImageDecodeError:
    """The one message for an image over ``max_pixels``, with its (width, height) ``size`` or its pixel
    count when known."""
    if size is not None:
        what = f"image is {size[0]}x{size[1]} = {size[0] * size[1]:,} pixels,"
    else:
        what = "image is" if pixels is None else f"image is {pixels:,} pixels,"
    return ImageDecodeError(
        f"{label}: {what} above the cap max_pixels={max_pixels:,} (decompression-bomb guard); "
        f"{PIXEL_CAP_HINT}",
        limit="max_pixels",
    )


_BOMB_PIXELS = re.compile(r"Image size \((\d+) pixels\)")  # Pillow's DecompressionBombError text


def _decode_encoded(
    payload: Path | bytes,
    label: str,
    max_pixels: int | None,
    formats: tuple[str, ...] | None,
    draft_to: int | None = None,
) -> Image.Image:
    if isinstance(payload, Path):
        fp: Any = open_regular_file(payload, label)  # closed in the finally below
    else:
        fp = io.BytesIO(payload)
    try:
        # why: our cap decides; Pillow's warning at 1x its limit would only be noise next to it. Its
        # other warnings ("Truncated File Read") describe a file that either decodes or is reported.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.filterwarnings("ignore", module=r"PIL\.")
            if formats is None or "ICO" in formats:
                _check_ico_frames(fp, label, max_pixels)  # Pillow decodes an ICO inside Image.open
            with _open(fp, formats, draft_to) as image:
                if draft_to is not None and _draftable(image, draft_to):
                    image.draft(image.mode, (draft_to, draft_to))  # scale only; the mode stays
                _check_pixels(image.size, label, max_pixels)
                image.seek(0)  # first frame of animated GIF / APNG / WebP / multi-page TIFF
                image.load()  # forces full decode: truncated / corrupt data fails here
                # why suppress: a malformed EXIF block should not lose an otherwise good image;
                # in place: no copy, the image is ours
                with contextlib.suppress(Exception):
                    ImageOps.exif_transpose(image, in_place=True)
                return _to_rgb(image, label)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        if max_pixels is not None and max_pixels < 2 * (Image.MAX_IMAGE_PIXELS or 0):
            # Pillow's own guard fired first, but max_pixels is the cap the caller set: name only it
            found = _BOMB_PIXELS.search(str(exc))
            raise _over_cap(label, max_pixels, pixels=int(found.group(1)) if found else None) from exc
        raise ImageDecodeError(
            f"{label}: {exc} Raise PIL.Image.MAX_IMAGE_PIXELS and max_pixels only for trusted files"
        ) from exc
    except UnidentifiedImageError as exc:
        size = payload.stat().st_size if isinstance(payload, Path) else len(payload)
        if size == 0:
            what = "empty file (0 bytes)"
        elif formats is None:
            what = "not a recognised image format (or corrupt header)"
        else:
            what = f"not an image in an accepted format ({', '.join(formats)}) or a corrupt header"
        raise ImageDecodeError(f"{label}: {what}") from exc
    except OSError as exc:
        raise ImageDecodeError(f"{label}: truncated or corrupt image data ({exc})") from exc
    except Exception as exc:  # why: Pillow plugins raise SyntaxError, ValueError, struct.error, ...
        raise ImageDecodeError(f"{label}: corrupt image data ({type(exc).__name__}: {exc})") from exc
    finally:
        fp.close()


def _open(fp: Any, formats: tuple[str, ...] | None, draft_to: int | None) -> Image.Image:
    """``Image.open``, except for a JPEG over Pillow's own pixel guard that draft decoding will reduce.

    why: Pillow refuses an image over ``2 * MAX_IMAGE_PIXELS`` (179 Mpx) inside ``Image.open``, before a
    draft can scale it; a 200 Mpx phone photo (16320 x 12240) decodes at 1/8 to 3 Mpx. Such a JPEG is
    opened with the JPEG plugin itself (the header only), drafted here and held to the same guard at its
    reduced size; ``max_pixels`` then applies as to any image (:func:`_decode_encoded`).
    """
    try:
        return Image.open(fp, formats=formats)
    except Image.DecompressionBombError:
        if draft_to is None or (formats is not None and "JPEG" not in formats):
            raise
        fp.seek(0)
        if fp.read(3) != b"\xff\xd8\xff":  # not a JPEG: Pillow's refusal stands
            raise
        fp.seek(0)
        image = JpegImagePlugin.JpegImageFile(fp)
        if _draftable(image, draft_to):
            image.draft(image.mode, (draft_to, draft_to))
            width, height = image.size
            if width * height <= 2 * (Image.MAX_IMAGE_PIXELS or 0):
                return image
        image.close()
        raise


def _draftable(image: Image.Image, draft_to: int) -> bool:
    """A JPEG (or MPO, phones' multi-picture JPEG: the same decoder) that libjpeg can scale by at least
    1/2 while keeping both sides >= ``draft_to``."""
    return image.format in ("JPEG", "MPO") and min(image.size) >= 2 * draft_to


def _to_rgb(image: Image.Image, label: str) -> Image.Image:
    """Mode conversion to 8-bit RGB (an RGB input is returned as is)."""
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        return Image.fromarray(high_depth_to_uint8(np.asarray(image), mode, label)).convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in image.info:
        # Pillow converts premultiplied "La" only to "LA" (un-premultiplying); from there to RGBA
        rgba = (image.convert("LA") if mode == "La" else image).convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
    try:
        return image if mode == "RGB" else image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageDecodeError(f"{label}: image mode {mode!r} cannot be converted to RGB ({exc})") from exc
