"""Upload checks for the demo: an uploaded or picked file becomes a decoded RGB image or a message a user
can act on (:class:`UserInputError`), never a traceback or a server path.

The library's decoder does the decoding (:func:`visreg_hub.inference.images.decode_image`: pixel cap,
truncated data, EXIF, alpha, 16-bit), so the demo's images are the library's images; this module adds
what a web upload needs on top: the extension check, the decoder allow-list by content, and messages that
name the file, not where the server keeps it.
"""

from __future__ import annotations

import re
from pathlib import Path

from PIL import Image

from visreg_hub.errors import ImageDecodeError, UserInputError
from visreg_hub.inference import IMAGE_EXTENSIONS
from visreg_hub.inference.images import DEFAULT_FORMATS, PIXEL_CAP_HINT, ImageSource, decode_image

# 2048 x 2048 decoded pixels: an RGBA upload then needs ~16 MB per copy while it is decoded. Large JPEGs
# (camera photos) are decoded at a reduced scale first (decode_image's draft_to), so they pass.
DEMO_MAX_PIXELS = 2048 * 2048
# Pillow decoders an upload may use (by content, whatever its name): the library's, so every extension the
# file picker offers decodes; the rest (EPS, PSD, ...) are refused. JPEG covers camera MPO files too.
ALLOWED_FORMATS = DEFAULT_FORMATS
ACCEPTED_TYPES = ", ".join(IMAGE_EXTENSIONS)
NO_IMAGE = "No image yet: upload one or pick an example first."


def check_upload(path: str | Path | None, *, max_pixels: int, draft_to: int) -> Image.Image:
    """Validate an uploaded or picked image and decode it (RGB).

    Checks the extension, then decodes with the library's rules, parsing the content only as one of
    :data:`ALLOWED_FORMATS`. A JPEG over twice ``draft_to`` pixels on its shorter side is decoded at a
    reduced scale (a memory bound; see ``decode_image``'s ``draft_to``), and ``max_pixels`` applies to
    that size: a 200 Mpx phone photo passes.

    Raises:
        UserInputError: the message names the file (not its server path) and what is wrong.
    """
    if path is None or str(path) == "":
        raise UserInputError(NO_IMAGE)
    path = Path(path)
    name = path.name
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise UserInputError(
            f"{name}: file type {path.suffix or '(none)'!r} is not accepted; upload one of {ACCEPTED_TYPES}"
        )
    if not path.is_file():
        raise UserInputError(f"{name}: the uploaded file is gone; upload it again")
    try:
        return decode_image(
            ImageSource(path, name), max_pixels=max_pixels, formats=ALLOWED_FORMATS, draft_to=draft_to
        )
    except ImageDecodeError as exc:
        raise UserInputError(shown_message(str(exc), path, max_pixels)) from None


# the library's pixel-cap message: "image is W x H = N pixels," or "image is N pixels," or "image is"
_OVER_CAP = re.compile(
    r"image is (?:(?P<w>\d+)x(?P<h>\d+) = )?(?:(?P<n>[\d,]+) pixels, )?above the cap max_pixels=[\d,]+ "
    rf"\(decompression-bomb guard\); {re.escape(PIXEL_CAP_HINT)}"
)


def _size_of(match: re.Match) -> str | None:
    return f"{match['w']} x {match['h']} = {match['n']}" if match["w"] else match["n"]


def too_many_pixels(max_pixels: int, size: str | None = None) -> str:
    """The one message for an upload over ``max_pixels`` (``size``: "W x H = N" when known)."""
    found = f"{size} pixels, " if size else ""
    return (
        f"the image has too many pixels ({found}limit {max_pixels:,}); upload a smaller one "
        "(a large JPEG passes: it is decoded at a reduced size)"
    )


def shown_message(message: str, path: Path, max_pixels: int) -> str:
    """A library message as a demo user should see it: the server path replaced by the file's name, and
    the hints meant for library callers (``max_pixels=``, ``on_error=``) replaced or dropped."""
    message = message.replace(str(path), path.name)
    message = _OVER_CAP.sub(lambda m: too_many_pixels(max_pixels, _size_of(m)), message)
    message = message.replace(f"; {PIXEL_CAP_HINT}", "")
    message = re.sub(r"not an image in an accepted format \(([^)]*)\) or a corrupt header",
                     r"not a readable image; the content is not \1 or is corrupt", message)  # fmt: skip
    return re.sub(r" \(input index \d+; pass on_error='skip' to embed the others\)", "", message)
