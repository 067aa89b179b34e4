"""Reading an API request's body: JSON or multipart, within the service's time and size limits.

The routes of :mod:`visreg_hub.serving.routes` read their bodies themselves (not through FastAPI's body
parameters) so that a slow or oversized body is refused with the API's own errors (408, 413, 415), large
JSON is parsed off the event loop, and ``/v1/embeddings`` takes both a JSON body and multipart uploads.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from visreg_hub.errors import shown
from visreg_hub.serving import schemas
from visreg_hub.serving.inputs import InputError, image_bytes
from visreg_hub.serving.service import ApiError, Service

JSON_CONTENT = "application/json"
MULTIPART = "multipart/form-data"
_FORM_FILE_FIELDS = ("input", "file", "image")
_FORM_FIELDS = (*_FORM_FILE_FIELDS, "model", "encoding_format", "dimensions", "user", "on_error")
_MAX_FORM_FIELDS = 16
# JSON bodies from this size on are parsed in a worker thread, off the event loop (about 1 ms of parsing)
_INLINE_PARSE_BYTES = 256 * 1024


def check_count(service: Service, count: int, what: str, param: str) -> None:
    """413 (``max_items``) for more than the service's limit of items in one request, 400 for none;
    ``param`` is the request field that holds them."""
    if count > service.limits.max_items:
        service.metrics.rejected.labels("max_items").inc()
        raise ApiError(
            413,
            f"{count} {what} in one request, above max_items={service.limits.max_items}; split the request",
            limit="max_items",
            param=param,
        )
    if count == 0:
        raise ApiError(400, f"no {what} in the request; send at least one", param=param)


def decode_strings(strings: list[Any]) -> tuple[list[bytes | None], dict[int, str]]:
    """Base64 / data-URI strings -> image bytes by input index; None and a message in ``errors`` for
    each string that is not an accepted encoding (the others are still decoded)."""
    payloads: list[bytes | None] = []
    errors: dict[int, str] = {}
    for i, text in enumerate(strings):
        try:
            payloads.append(image_bytes(text))
        except InputError as exc:
            payloads.append(None)
            errors[i] = f"input {i}: {exc}"
    return payloads, errors


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _refuse_content_type(content_type: str, accepted: str) -> ApiError:
    return ApiError(415, f"Content-Type {shown(content_type or '(none)')} is not accepted; send {accepted}")


async def _receive(request: Request, service: Service, read):
    """``await read()`` (the body or the form) within ``request_timeout_s``.

    A client that stops sending mid-body gets a 408 instead of holding a connection and a coroutine
    forever; one that disconnects gets a 400 that nobody reads (counted, not logged as a server error).
    """
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise ApiError(
            415, f"Content-Encoding {shown(encoding)} is not supported; send the body uncompressed"
        )
    timeout = service.limits.request_timeout_s
    try:
        return await asyncio.wait_for(read(), timeout)
    except TimeoutError:
        service.metrics.rejected.labels("request_timeout_s").inc()
        raise ApiError(
            408,
            f"the request body did not arrive within request_timeout_s={timeout:g}",
            limit="request_timeout_s",
        ) from None
    except ClientDisconnect:
        raise ApiError(400, "the client disconnected before the request body arrived") from None


async def _validated_off_loop(model: type[BaseModel], body: bytes):
    """:func:`_validated`, in a worker thread when the body is large.

    why: parsing tens of MB of JSON numbers takes seconds; on the event loop it stalls every other request,
    ``/health`` included (a liveness probe would restart the server).
    """
    if len(body) < _INLINE_PARSE_BYTES:
        return _validated(model, body)
    return await asyncio.to_thread(_validated, model, body)


def _validated(model: type[BaseModel], body: bytes):
    """JSON bytes -> a ``model`` instance: 400 for bad JSON, 422 (field by field) for a wrong shape."""
    try:
        data = json.loads(body)
    except UnicodeDecodeError:
        raise ApiError(400, "request body is not UTF-8; JSON is sent as UTF-8 (RFC 8259)") from None
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply to parse as JSON; flatten it") from None
    except ValueError as exc:
        raise ApiError(400, f"request body is not valid JSON ({type(exc).__name__})") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply") from None


async def json_request(request: Request, service: Service, model: type[BaseModel]):
    """The JSON body of a request as ``model`` (415 for any other Content-Type)."""
    content_type = _content_type(request)
    if content_type != JSON_CONTENT:
        raise _refuse_content_type(content_type, "application/json")
    return await _validated_off_loop(model, await _receive(request, service, request.body))


@dataclass
class EmbedJob:
    """An embeddings request, from a JSON body or a multipart form.

    ``payloads``: the encoded images by input index (None where the input was refused already, with its
    message in ``errors``)."""

    model: str | None
    encoding_format: str
    dimensions: int | None
    on_error: str
    payloads: list[bytes | None]
    errors: dict[int, str]


async def parse_embeddings_request(request: Request, service: Service) -> EmbedJob:
    """The request's images and options, from a JSON body or ``multipart/form-data`` uploads."""
    content_type = _content_type(request)
    if content_type == JSON_CONTENT:
        body = await _receive(request, service, request.body)
        parsed = await _validated_off_loop(schemas.EmbeddingsRequest, body)
        if parsed.input == "":  # OpenAI's 400 for an empty input (an empty string in a list is an item's)
            raise ApiError(
                400, "input is an empty string; send an image as base64 or a data: URL", param="input"
            )
        inputs = [parsed.input] if isinstance(parsed.input, str) else parsed.input
        check_count(service, len(inputs), "inputs", "input")
        payloads, errors = decode_strings(inputs)
        on_error = parsed.on_error or service.config.on_error
        encoding = parsed.encoding_format or "float"
        return EmbedJob(parsed.model, encoding, parsed.dimensions, on_error, payloads, errors)
    if content_type != MULTIPART:
        raise _refuse_content_type(content_type, "application/json or multipart/form-data")
    limits = service.limits

    async def read_form():
        # one file over max_items lets the count below answer with max_items' own 413
        return await request.form(
            max_files=limits.max_items + 1, max_fields=_MAX_FORM_FIELDS, max_part_size=limits.max_body_bytes
        )

    try:
        form = await _receive(request, service, read_form)
    except HTTPException as exc:  # Starlette's 400 for a form over max_files / max_fields
        if "Too many files" in str(exc.detail):
            check_count(service, limits.max_items + 1, "images", "input")
        if "Too many fields" in str(exc.detail):
            raise ApiError(
                422, f"more than {_MAX_FORM_FIELDS} form fields; send {list(_FORM_FIELDS)}"
            ) from None
        raise
    pairs = form.multi_items()
    files = [value for key, value in pairs if key in _FORM_FILE_FIELDS and hasattr(value, "read")]
    texts = sorted({key for key, value in pairs if key in _FORM_FILE_FIELDS and isinstance(value, str)})
    if texts:
        raise ApiError(
            422, f"form field {texts[0]!r} holds text, not a file: send each image as a file part "
            f"(curl -F {texts[0]}=@photo.jpg), or base64 strings in a JSON body", param=texts[0]
        )  # fmt: skip
    unknown = sorted({key for key in form if key not in _FORM_FIELDS})
    if unknown:
        message = f"unknown form fields {shown(unknown)}; send images as 'input' file fields"
        raise ApiError(422, message, param=unknown[0][:80])  # a client's name, cut as JSON fields' are
    model = form.get("model")
    encoding = form.get("encoding_format") or "float"
    on_error = form.get("on_error") or service.config.on_error
    if encoding not in ("float", "base64") or (model is not None and not isinstance(model, str)):
        field = "encoding_format" if encoding not in ("float", "base64") else "model"
        raise ApiError(422, "encoding_format must be 'float' or 'base64' and model a name", param=field)
    if on_error not in ("skip", "raise"):
        raise ApiError(422, f"on_error must be 'skip' or 'raise', got {shown(on_error)}", param="on_error")
    dimensions = form.get("dimensions")
    if dimensions is not None:
        # ASCII digits only and a bounded length: str.isdigit() admits "²", which int() refuses
        digits = isinstance(dimensions, str) and re.fullmatch(r"[0-9]{1,9}", dimensions)
        if not (digits and int(dimensions) >= 1):
            raise ApiError(
                422, f"dimensions must be a positive integer, got {shown(dimensions)}", param="dimensions"
            )
        dimensions = int(dimensions)
    check_count(service, len(files), "images", "input")
    return EmbedJob(model, encoding, dimensions, on_error, [await f.read() for f in files], {})
