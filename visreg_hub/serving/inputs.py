"""Client inputs -> image bytes: base64 strings and data: URLs only, never URLs or file paths.

The server opens nothing a client names: a string with a URL scheme (``http://``, ``file://``, ...) is
refused before any decoding, and everything else must be valid base64 of the image's bytes.
"""

from __future__ import annotations

import base64
import binascii
import re

# scheme and the base64 token are case-insensitive (RFC 2397, RFC 3986): DATA:...;BASE64, is valid
_DATA_URL = re.compile(
    r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?:;[\w.+-]+=[\w.+-]+)*;base64,", re.ASCII | re.IGNORECASE
)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:", re.ASCII)
_WHITESPACE = re.compile(rb"\s+")


class InputError(ValueError):
    """One input cannot be used; the message says why (without echoing the input)."""


def image_bytes(text: object) -> bytes:
    """A base64 string or ``data:<mime>;base64,<data>`` URL -> the encoded image bytes.

    Raises:
        InputError: not a string, a URL or path-like string, or invalid base64.
    """
    if not isinstance(text, str):
        raise InputError(f"expected a base64 string, got {type(text).__name__}")
    if not text:
        raise InputError("empty string; send the image's bytes base64-encoded")
    match = _DATA_URL.match(text)
    if match:
        text = text[match.end() :]
    elif text[:5].lower() == "data:":
        raise InputError("data: URLs must be base64 (data:image/png;base64,...)")
    elif _SCHEME.match(text) or text.startswith(("~", "./", "../")):
        raise InputError(
            "URLs and file paths are not accepted (the server never fetches or opens them); "
            "send the image's bytes base64-encoded"
        )
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError:
        raise InputError(
            "invalid base64: non-ASCII characters; this API embeds images, not text: send an image's "
            "bytes base64-encoded"
        ) from None
    try:
        payload = base64.b64decode(_WHITESPACE.sub(b"", raw), validate=True)
    except (binascii.Error, ValueError) as exc:
        # a bare absolute path ("/home/...") is also valid-looking base64 up to here ("/" is a base64
        # character), so the hint covers paths too
        raise InputError(
            f"invalid base64 ({exc}); this API embeds images, not text: send an image's bytes "
            "base64-encoded or as data:image/...;base64,... (file paths and URLs are never opened)"
        ) from None
    if not payload:
        raise InputError("empty image after base64 decoding")
    return payload
