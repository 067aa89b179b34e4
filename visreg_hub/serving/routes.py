"""HTTP routes, error handlers and middleware of the inference API (see :mod:`visreg_hub.serving.app`)."""

from __future__ import annotations

import asyncio
import base64
import errno
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path as FilePath
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from visreg_hub.errors import shown
from visreg_hub.retrieval.records import MAX_ID, IdConflictError, metadata_problem
from visreg_hub.serving import schemas
from visreg_hub.serving.inputs import InputError, image_bytes
from visreg_hub.serving.security import BodyLimitMiddleware, key_matches
from visreg_hub.serving.service import ApiError, Service

logger = logging.getLogger(__name__)

_ERRORS = {status: {"model": schemas.ErrorResponse} for status in (400, 401, 404, 408, 413, 415, 422, 429)}
_STORE_ERRORS = {**_ERRORS, 507: {"model": schemas.ErrorResponse}}
_JSON_CONTENT = "application/json"
_MULTIPART = "multipart/form-data"
_FORM_FILE_FIELDS = ("input", "file", "image")
_FORM_FIELDS = (*_FORM_FILE_FIELDS, "model", "encoding_format", "dimensions", "user", "on_error")
_MAX_FORM_FIELDS = 16
# JSON bodies from this size on are parsed in a worker thread, off the event loop (about 1 ms of parsing)
_INLINE_PARSE_BYTES = 256 * 1024


def _storage_error(name: str, exc: OSError) -> ApiError:
    """507 for a change the index could not make durable (a full disk, a quota, a read-only folder).

    why not 500: the cause is known and lies with the server's storage, not with the request; the log
    is cut back to before the change (``LogWriter.append``), so the client may retry once space is freed.
    """
    logger.error("index %s: a change could not be written to its log (%s); nothing was changed", name, exc)
    return ApiError(
        507,
        f"index {name!r} could not store the change ({exc.strerror or type(exc).__name__}); nothing was "
        "changed: retry once the server's index storage has room",
        kind="server_error",
        code="storage_full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "storage_error",
    )


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors()[:5]:  # the input itself is never echoed (it can be megabytes of base64)
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body")[:80] or "body"  # names too
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


def _error_param(exc: RequestValidationError) -> str | None:
    """The request field of the first error (OpenAI's ``param``: ``"dimensions"``, ``"input"``, a path
    parameter's name), cut to 80 characters."""
    for error in exc.errors()[:1]:
        fields = [str(p) for p in error.get("loc", ()) if p not in ("body", "path", "query")]
        return fields[0][:80] if fields else None
    return None


def _install_errors(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError):
        body = schemas.error_body(exc.message, exc.kind, exc.limit, exc.code, exc.items, exc.param)
        return JSONResponse(body, exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError):
        body = schemas.error_body(_validation_message(exc), "invalid_request_error", param=_error_param(exc))
        return JSONResponse(body, 422)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException):
        limit = "max_body_bytes" if exc.status_code == 413 else None
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        body = schemas.error_body(str(exc.detail), kind, limit)
        return JSONResponse(body, exc.status_code, headers=exc.headers)


class InternalErrorMiddleware:
    """ASGI middleware: an unexpected exception becomes the JSON 500 here, inside the other middlewares.

    why not ``app.exception_handler(Exception)``: Starlette answers those from its outermost middleware, so
    the 500 carried no CORS headers (a browser saw an opaque CORS failure, not the error) and bypassed the
    request metrics. The traceback is logged; the client gets no detail.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        except ClientDisconnect:  # the client left mid-body (or its body timed out): nothing went wrong here
            logger.debug("%s %s: the client disconnected mid-body", scope.get("method"), scope.get("path"))
        except Exception:
            logger.exception("unexpected error")
            if started:  # too late for a clean answer: let the server close the connection
                raise
            body = schemas.error_body("internal error; it was logged on the server", "server_error")
            await JSONResponse(body, 500)(scope, receive, send)


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _route_of(scope) -> Any:
    """The route a request is for when a middleware answered it before routing (the body limit's 413),
    so its metrics carry the route's label and not that of unknown paths; None for an unknown path."""
    app = scope.get("app")
    for route in getattr(getattr(app, "router", None), "routes", ()):
        if route.matches(scope)[0] != Match.NONE:
            return route
    return None


class MetricsMiddleware:
    """ASGI middleware: count requests by route template, method and status; observe their latency."""

    def __init__(self, app, metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500

        async def observed_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            path = getattr(scope.get("route") or _route_of(scope), "path", None) or "unmatched"
            # any token is a method to uvicorn: a fixed label set, or clients could grow /metrics at will
            method = scope["method"] if scope["method"] in _METHODS else "other"
            self.metrics.requests.labels(path, method, str(status)).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - started)


def _install_middleware(app: FastAPI, service: Service) -> None:
    # innermost: unexpected errors become a JSON 500 that metrics count and CORS decorates
    app.add_middleware(InternalErrorMiddleware)
    # the body limit holds before anything reads the body; metrics count its refusals too
    app.add_middleware(
        BodyLimitMiddleware,
        limit=service.limits.max_body_bytes,
        on_refuse=service.metrics.rejected.labels("max_body_bytes").inc,
        drain_timeout_s=service.limits.request_timeout_s,
    )
    app.add_middleware(MetricsMiddleware, metrics=service.metrics)
    if service.config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(service.config.cors_origins),
            allow_methods=["GET", "POST", "DELETE"],
            # any request header: the OpenAI JS SDK sends x-stainless-* on every call, and the origin list
            # (never "*" with credentials) is what guards the API
            allow_headers=["*"],
            expose_headers=["Retry-After"],  # so browser code can honour a 429's back-off
        )


def _auth_dependency(service: Service):
    bearer = HTTPBearer(auto_error=False, description="API key (only when the server has --api-keys)")

    async def require_key(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
        digests = service.config.api_key_hashes
        if not digests:
            return
        if credentials is None or not key_matches(credentials.credentials, digests):
            raise ApiError(
                401,
                "missing or invalid API key; send 'Authorization: Bearer <key>'",
                kind="authentication_error",
                code="invalid_api_key",  # OpenAI's code for the same answer
                headers={"WWW-Authenticate": "Bearer"},
            )

    return require_key


def _truncated(vector: np.ndarray, dimensions: int | None) -> np.ndarray:
    """The first ``dimensions`` values of an L2-normalised embedding, L2-normalised again.

    Equals ``encode(truncate_dim=dimensions)``, which truncates the raw output and then normalises:
    normalising is scale-invariant, so truncating the normalised vector gives the same direction.
    """
    if dimensions is None or dimensions >= vector.shape[0]:
        return vector  # already normalised: normalising again would only move the last bits
    head = vector[:dimensions].astype(np.float32)
    return head / max(float(np.linalg.norm(head)), 1e-12)  # F.normalize's eps, as encode()


def _public_source(source: str) -> str:
    """What clients see of a model's source: a registry name or ``org/repo`` as is, a server folder by its
    name only (clients never learn server paths)."""
    return FilePath(source).name if FilePath(source).expanduser().exists() else source


def _model_info(runtime) -> schemas.ModelInfo:
    return schemas.ModelInfo(
        id=runtime.name,
        created=int(runtime.loaded_at),
        source=_public_source(runtime.spec.source),
        embedding_dim=runtime.embedding_dim,
        input_size=list(runtime.input_shape),
    )


def _check_count(service: Service, count: int, what: str) -> None:
    if count > service.limits.max_items:
        service.metrics.rejected.labels("max_items").inc()
        raise ApiError(
            413,
            f"{count} {what} in one request, above max_items={service.limits.max_items}; split the request",
            limit="max_items",
        )
    if count == 0:
        raise ApiError(400, f"no {what} in the request; send at least one")


def _decode_strings(strings: list[Any]) -> tuple[list[bytes | None], dict[int, str]]:
    payloads: list[bytes | None] = []
    errors: dict[int, str] = {}
    for i, text in enumerate(strings):
        try:
            payloads.append(image_bytes(text))
        except InputError as exc:
            payloads.append(None)
            errors[i] = f"input {i}: {exc}"
    return payloads, errors


async def _embed(
    request: Request, service: Service, model: str, payloads: list[bytes | None], errors: dict[int, str]
) -> dict[int, np.ndarray]:
    """Embed ``payloads`` within ``request_timeout_s`` and while ``request``'s client is connected (its
    body already read); failures go into ``errors``. Returns index -> (E,) float32 embedding."""
    labels = [f"input {i}" for i in range(len(payloads))]
    work = service.embed_payloads(model, payloads, labels, errors)
    return await service.within_limits(work, request.receive)


def _failed_inputs(errors: dict[int, str], count: int) -> ApiError:
    """The 422 of ``on_error="raise"``: every failed input, by index, and nothing embedded returned."""
    return ApiError(
        422,
        f"{len(errors)} of {count} inputs could not be embedded, so none is returned (on_error='raise'); "
        f"first: {errors[min(errors)]}",
        code="input_not_embedded",
        items=errors,
    )


def _vector_array(service: Service, rows: list[list[float]], dim: int) -> np.ndarray:
    try:
        array = np.asarray(rows, dtype=np.float32)
    except (ValueError, OverflowError, TypeError):
        raise ApiError(422, f"vectors must be lists of {dim} numbers each") from None
    if array.ndim != 2 or array.shape[1] != dim:
        raise ApiError(
            422, f"vectors must have {dim} numbers each (the index's dim), got shape {array.shape}"
        )
    if not np.isfinite(array).all():
        raise ApiError(422, "vectors contain NaN or infinite values (or numbers beyond float32)")
    return array


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


async def _json_request(request: Request, service: Service, model: type[BaseModel]):
    """The JSON body of a request as ``model`` (415 for any other Content-Type)."""
    content_type = _content_type(request)
    if content_type != _JSON_CONTENT:
        raise _refuse_content_type(content_type, "application/json")
    return await _validated_off_loop(model, await _receive(request, service, request.body))


@dataclass
class _EmbedJob:
    """An embeddings request, from a JSON body or a multipart form.

    ``payloads``: the encoded images by input index (None where the input was refused already, with its
    message in ``errors``)."""

    model: str | None
    encoding_format: str
    dimensions: int | None
    on_error: str
    payloads: list[bytes | None]
    errors: dict[int, str]


async def _parse_embeddings_request(request: Request, service: Service) -> _EmbedJob:
    """The request's images and options, from a JSON body or ``multipart/form-data`` uploads."""
    content_type = _content_type(request)
    if content_type == _JSON_CONTENT:
        body = await _receive(request, service, request.body)
        parsed = await _validated_off_loop(schemas.EmbeddingsRequest, body)
        inputs = [parsed.input] if isinstance(parsed.input, str) else parsed.input
        _check_count(service, len(inputs), "inputs")
        payloads, errors = _decode_strings(inputs)
        on_error = parsed.on_error or service.config.on_error
        encoding = parsed.encoding_format or "float"
        return _EmbedJob(parsed.model, encoding, parsed.dimensions, on_error, payloads, errors)
    if content_type != _MULTIPART:
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
            _check_count(service, limits.max_items + 1, "images")
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
            f"(curl -F {texts[0]}=@photo.jpg), or base64 strings in a JSON body"
        )  # fmt: skip
    unknown = sorted({key for key in form if key not in _FORM_FIELDS})
    if unknown:
        raise ApiError(422, f"unknown form fields {shown(unknown)}; send images as 'input' file fields")
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
    _check_count(service, len(files), "images")
    return _EmbedJob(model, encoding, dimensions, on_error, [await f.read() for f in files], {})


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI ``requestBody`` of a route that reads ``model`` from the raw request itself."""
    return {
        "requestBody": {"required": True, "content": {_JSON_CONTENT: {"schema": model.model_json_schema()}}}
    }


def install(app: FastAPI, service: Service) -> None:
    """Add every route, handler and middleware of the API to ``app``."""
    _install_errors(app)
    _install_middleware(app, service)
    auth = [Depends(_auth_dependency(service))]
    _install_service_routes(app, service, auth)
    _install_model_routes(app, service, auth)
    _install_index_routes(app, service, auth)


def _install_service_routes(app: FastAPI, service: Service, auth: list) -> None:
    """``/health``, ``/ready`` (GET and HEAD, for load balancers) and ``/metrics``."""

    @app.get("/health", tags=["service"], summary="liveness: the process answers")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    # load balancers probe with HEAD; separate routes keep one OpenAPI operation per path
    @app.head("/health", include_in_schema=False)
    async def health_head() -> Response:
        return Response(status_code=200)

    @app.head("/ready", include_in_schema=False)
    async def ready_head() -> Response:
        return Response(status_code=200 if service.ready else 503)

    @app.get(
        "/ready",
        tags=["service"],
        summary="readiness: models loaded, indexes open, not stopping",
        responses={503: {"model": schemas.ErrorResponse}},
    )
    async def ready():
        if not service.ready:
            body = schemas.error_body("not ready (starting or shutting down)", "unavailable")
            return JSONResponse(body, 503)
        if service.config.api_key_hashes:  # open to probes without a key: what is served stays behind the key
            return {"status": "ready"}
        return {"status": "ready", "models": sorted(service.runtimes), "indexes": sorted(service.indexes)}

    @app.get(
        "/metrics", tags=["service"], summary="Prometheus metrics", dependencies=auth, response_class=Response
    )
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type=service.metrics.content_type)


def _install_model_routes(app: FastAPI, service: Service, auth: list) -> None:
    """``/v1/models``, ``/v1/models/{id}`` and ``/v1/embeddings`` (OpenAI's shapes)."""

    @app.get(
        "/v1/models", tags=["models"], response_model=schemas.ModelList, dependencies=auth, responses=_ERRORS
    )
    async def list_models() -> schemas.ModelList:
        return schemas.ModelList(data=[_model_info(r) for r in service.runtimes.values()])

    @app.get(
        "/v1/models/{model_id:path}",
        tags=["models"],
        response_model=schemas.ModelInfo,
        dependencies=auth,
        responses=_ERRORS,
        summary="one served model (OpenAI's models.retrieve)",
    )
    async def retrieve_model(model_id: str) -> schemas.ModelInfo:
        return _model_info(service.runtime(model_id))

    embeddings_body = {
        "requestBody": {
            "required": True,
            "content": {
                _JSON_CONTENT: {"schema": schemas.EmbeddingsRequest.model_json_schema()},
                _MULTIPART: {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "input": {"type": "array", "items": {"type": "string", "format": "binary"}},
                            "model": {"type": "string"},
                            "encoding_format": {"type": "string", "enum": ["float", "base64"]},
                            "dimensions": {"type": "integer", "minimum": 1},
                            "user": {"type": "string"},
                            "on_error": {"type": "string", "enum": ["skip", "raise"]},
                        },
                        "required": ["input"],
                    }
                },
            },
        }
    }

    @app.post(
        "/v1/embeddings",
        tags=["embeddings"],
        response_model=schemas.EmbeddingsResponse,
        dependencies=auth,
        responses=_ERRORS,
        openapi_extra=embeddings_body,
        summary="embed images (OpenAI-embeddings shaped; JSON base64 or multipart uploads)",
    )
    async def embeddings(request: Request) -> schemas.EmbeddingsResponse:
        job = await _parse_embeddings_request(request, service)
        runtime = service.runtime(job.model)
        dimensions, errors = job.dimensions, job.errors
        if dimensions is not None and dimensions > runtime.embedding_dim:
            raise ApiError(
                422,
                f"dimensions {dimensions} exceeds the {runtime.embedding_dim} of model {runtime.name!r}; "
                f"send 1..{runtime.embedding_dim} or leave it out",
                param="dimensions",
            )
        # with on_error="raise" the images are still decoded after an input refused early (bad base64),
        # so that the 422 lists every failure at once, not one stage's
        vectors = await _embed(request, service, runtime.name, job.payloads, errors)
        if job.on_error == "raise" and errors:
            raise _failed_inputs(errors, len(job.payloads))
        if not vectors:
            first = errors[min(errors)] if errors else "no input"
            raise ApiError(
                422,
                f"no input could be embedded ({len(errors)} failed; first: {first})",
                code="no_input_embedded",
                items=errors,
            )
        data = []
        for i in sorted(vectors):
            values = _truncated(vectors[i], dimensions).astype("<f4")
            embedding = (
                base64.b64encode(values.tobytes()).decode()
                if job.encoding_format == "base64"
                else values.tolist()
            )
            data.append(schemas.Embedding(index=i, embedding=embedding))
        return schemas.EmbeddingsResponse(
            model=runtime.name,
            data=data,
            errors=[schemas.ItemError(index=i, message=m) for i, m in sorted(errors.items())],
            usage=schemas.Usage(images=len(data)),
        )


def _install_index_routes(app: FastAPI, service: Service, auth: list) -> None:
    """``/v1/search`` and the durable indexes' items and info."""
    limits = service.limits

    @app.post(
        "/v1/search",
        tags=["indexes"],
        response_model=schemas.SearchResponse,
        dependencies=auth,
        responses=_ERRORS,
        summary="nearest items of an index to an image or a vector",
        openapi_extra=_json_body(schemas.SearchRequest),
    )
    async def search(request: Request) -> schemas.SearchResponse:
        body = await _json_request(request, service, schemas.SearchRequest)
        store = service.index(body.index)
        if not 1 <= body.k <= limits.max_k:
            service.metrics.rejected.labels("max_k").inc()
            message = f"k must be between 1 and max_k={limits.max_k}, got {body.k}"
            raise ApiError(422, message, limit="max_k", param="k")
        if (body.image is None) == (body.vector is None):
            raise ApiError(422, "send exactly one of 'image' (base64) or 'vector'", param="image")
        model = service.index_models[body.index]
        if body.vector is not None:
            query = await asyncio.to_thread(_vector_array, service, [body.vector], store.index.dim)
        else:
            if model is None:
                raise ApiError(422, service.index_problems.get(
                    body.index, f"index {body.index!r} matches no served model; query it with 'vector'"
                ))  # fmt: skip
            payloads, errors = _decode_strings([body.image])
            vectors = await _embed(request, service, model, payloads, errors)
            if not vectors:
                raise ApiError(
                    422, f"the query image could not be embedded: {errors.get(0, 'unknown error')}"
                )
            query = vectors[0][None, :]
        try:
            result = await asyncio.to_thread(store.search, query, body.k)
        except ValueError as exc:  # e.g. an all-zero query vector for a normalising index
            raise ApiError(422, f"query vector: {exc}", param="vector") from None
        if result is None:  # the index is empty
            return schemas.SearchResponse(index=body.index, model=model, hits=[])
        hits = [
            schemas.Hit(id=int(i), score=float(s), metadata=m)
            for i, s, m in zip(result.ids[0].tolist(), result.scores[0].tolist(), result.metadata[0])
            if i >= 0
        ]
        return schemas.SearchResponse(index=body.index, model=model, hits=hits)

    @app.post(
        "/v1/indexes/{name}/items",
        tags=["indexes"],
        response_model=schemas.AddItemsResponse,
        dependencies=auth,
        responses={**_STORE_ERRORS, 409: {"model": schemas.ErrorResponse}},
        summary="add images or vectors (with metadata); acknowledged once durable",
        openapi_extra=_json_body(schemas.AddItemsRequest),
    )
    async def add_items(name: str, request: Request) -> schemas.AddItemsResponse:
        body = await _json_request(request, service, schemas.AddItemsRequest)
        store = service.index(name)
        if (body.images is None) == (body.vectors is None):
            raise ApiError(422, "send exactly one of 'images' (base64 list) or 'vectors'")
        count = len(body.images if body.images is not None else body.vectors)
        _check_count(service, count, "items")
        for what, values in (("metadata", body.metadata), ("ids", body.ids)):
            if values is not None and len(values) != count:
                raise ApiError(422, f"{what} has {len(values)} entries for {count} items; send one per item")
        for i, meta in enumerate(body.metadata or []):
            # first what JSON cannot give back (deep nesting broke every later search with a 500; an unpaired
            # surrogate cannot even be measured in UTF-8), then the size
            problem = None if meta is None else metadata_problem(meta)
            if problem is not None:
                raise ApiError(422, f"metadata[{i}] {problem}")
            size = len(json.dumps(meta, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
            if meta is not None and size > limits.max_metadata_bytes:
                raise ApiError(
                    413,
                    f"metadata[{i}] is {size:,} bytes of JSON, above max_metadata_bytes="
                    f"{limits.max_metadata_bytes:,}; store large data elsewhere and keep a key here",
                    limit="max_metadata_bytes",
                )
        if body.vectors is not None:
            vectors = await asyncio.to_thread(_vector_array, service, body.vectors, store.index.dim)
        else:
            model = service.index_models[name]
            if model is None:
                raise ApiError(422, service.index_problems.get(
                    name, f"index {name!r} matches no served model; add 'vectors' instead"
                ))  # fmt: skip
            payloads, errors = _decode_strings(body.images)
            embedded = await _embed(request, service, model, payloads, errors)
            if errors:
                listed = "; ".join(errors[i] for i in sorted(errors)[:3])
                raise ApiError(
                    422, f"{len(errors)} of {count} images could not be embedded, nothing was added: {listed}"
                )
            vectors = np.stack([embedded[i] for i in range(count)])
        try:
            ids = await asyncio.to_thread(store.add, vectors, body.metadata, body.ids)
        except IdConflictError as exc:
            raise ApiError(409, str(exc), kind="conflict") from None
        except ValueError as exc:
            raise ApiError(422, str(exc)) from None
        except OSError as exc:
            raise _storage_error(name, exc) from None
        return schemas.AddItemsResponse(index=name, ids=[int(i) for i in ids], count=len(store))

    @app.delete(
        "/v1/indexes/{name}/items/{item_id}",
        tags=["indexes"],
        dependencies=auth,
        response_model=schemas.DeleteItemResponse,
        responses=_STORE_ERRORS,
        summary="remove one item; acknowledged once durable",
    )
    async def delete_item(
        name: str, item_id: str = Path(pattern=r"^(0|[1-9][0-9]{0,18})$", description="a decimal id")
    ) -> schemas.DeleteItemResponse:
        # why a string: an int path parameter also took "+1", "01", "1.0" and " 1" as item 1
        if int(item_id) > MAX_ID:
            raise ApiError(422, f"item id {item_id} is above the largest id {MAX_ID}", param="item_id")
        item_id = int(item_id)
        store = service.index(name)
        try:
            removed = await asyncio.to_thread(store.remove, [item_id])
        except OSError as exc:
            raise _storage_error(name, exc) from None
        if not removed:
            raise ApiError(404, f"index {name!r} has no item {item_id}", kind="not_found")
        return schemas.DeleteItemResponse(index=name, id=item_id, deleted=True, count=len(store))

    @app.get(
        "/v1/indexes/{name}",
        tags=["indexes"],
        response_model=schemas.IndexInfo,
        dependencies=auth,
        responses=_ERRORS,
        summary="count, dim and model of an index",
    )
    async def index_info(name: str) -> schemas.IndexInfo:
        store = service.index(name)
        index = store.index
        return schemas.IndexInfo(
            name=name,
            count=len(store),
            dim=index.dim,
            model=service.index_models[name],
            metric=index.metric,
            kind=index.kind,
            normalize=index.normalize,
            snapshot_error=store.snapshot_error,
        )
