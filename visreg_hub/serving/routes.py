"""HTTP routes and error handlers of the inference API (see :mod:`visreg_hub.serving.app`).

Request bodies are read by :mod:`visreg_hub.serving.request_body`; middleware lives in
:mod:`visreg_hub.serving.middleware`.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import json
import logging
from pathlib import Path as FilePath
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from visreg_hub.retrieval.records import (
    MAX_ID,
    IdConflictError,
    IdsExhaustedError,
    ids_exhausted,
    metadata_problem,
)
from visreg_hub.serving import schemas
from visreg_hub.serving.middleware import install_middleware
from visreg_hub.serving.request_body import (
    JSON_CONTENT,
    MULTIPART,
    check_count,
    decode_strings,
    json_request,
    parse_embeddings_request,
)
from visreg_hub.serving.security import key_matches
from visreg_hub.serving.service import ApiError, Service

logger = logging.getLogger(__name__)

# every JSON error a route can answer (503: the server is stopping; a forced stop cuts requests off with it)
_ERRORS = {
    status: {"model": schemas.ErrorResponse} for status in (400, 401, 404, 408, 413, 415, 422, 429, 503)
}
_STORE_ERRORS = {**_ERRORS, **{status: {"model": schemas.ErrorResponse} for status in (403, 507)}}


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
        body = schemas.error_body(exc.message, exc.status, exc.limit, exc.code, exc.items, exc.param)
        return JSONResponse(body, exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError):
        body = schemas.error_body(_validation_message(exc), 422, param=_error_param(exc))
        return JSONResponse(body, 422)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException):
        limit = "max_body_bytes" if exc.status_code == 413 else None
        body = schemas.error_body(str(exc.detail), exc.status_code, limit)
        return JSONResponse(body, exc.status_code, headers=exc.headers)


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
        backend=runtime.backend.name,
    )


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
        param="input",
        limit=schemas.first_limit(errors),
    )


def _vector_array(rows: list[list[float]], dim: int, field: str) -> np.ndarray:
    """The request's ``field`` (``vectors``, or the search's ``vector`` as one row) -> (N, dim) float32."""
    try:
        array = np.asarray(rows, dtype=np.float32)
    except (ValueError, OverflowError, TypeError):
        raise ApiError(422, f"vectors must be lists of {dim} numbers each", param=field) from None
    if array.ndim != 2 or array.shape[1] != dim:
        raise ApiError(
            422,
            f"vectors must have {dim} numbers each (the index's dim), got shape {array.shape}",
            param=field,
        )
    if not np.isfinite(array).all():
        raise ApiError(422, "vectors contain NaN or infinite values (or numbers beyond float32)", param=field)
    return array


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI ``requestBody`` of a route that reads ``model`` from the raw request itself."""
    return {
        "requestBody": {"required": True, "content": {JSON_CONTENT: {"schema": model.model_json_schema()}}}
    }


def install(app: FastAPI, service: Service) -> None:
    """Add every route, handler and middleware of the API to ``app``."""
    _install_errors(app)
    install_middleware(app, service)
    auth = [Depends(_auth_dependency(service))]
    _install_service_routes(app, service, auth)
    _install_model_routes(app, service, auth)
    _install_index_routes(app, service, auth)


def _install_service_routes(app: FastAPI, service: Service, auth: list) -> None:
    """``/health``, ``/ready`` (GET and HEAD, for load balancers) and ``/metrics``."""

    @app.get("/health", tags=["service"], summary="liveness: the process answers")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    # HEAD (load balancers' probes) is answered as GET by middleware.HeadAsGetMiddleware

    @app.get(
        "/ready",
        tags=["service"],
        summary="readiness: models loaded, indexes open, not stopping",
        responses={503: {"model": schemas.ErrorResponse}},
    )
    async def ready():
        if not service.ready:
            body = schemas.error_body("not ready (starting or shutting down)", 503, code="not_ready")
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
                JSON_CONTENT: {"schema": schemas.EmbeddingsRequest.model_json_schema()},
                MULTIPART: {
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
        job = await parse_embeddings_request(request, service)
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
                param="input",
                limit=schemas.first_limit(errors),
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
            errors=[
                schemas.ItemError(index=i, message=m, limit=getattr(m, "limit", None))
                for i, m in sorted(errors.items())
            ],
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
        body = await json_request(request, service, schemas.SearchRequest)
        store = service.index(body.index)
        if not 1 <= body.k <= limits.max_k:
            service.metrics.rejected.labels("max_k").inc()
            message = f"k must be between 1 and max_k={limits.max_k}, got {body.k}"
            raise ApiError(422, message, limit="max_k", param="k")
        if (body.image is None) == (body.vector is None):
            raise ApiError(422, "send exactly one of 'image' (base64) or 'vector'", param="image")
        model = service.index_models[body.index]
        if body.vector is not None:
            query = await asyncio.to_thread(_vector_array, [body.vector], store.dim, "vector")
        else:
            if model is None:
                raise ApiError(422, service.index_problems.get(
                    body.index, f"index {body.index!r} matches no served model; query it with 'vector'"
                ), param="image")  # fmt: skip
            payloads, errors = decode_strings([body.image])
            vectors = await _embed(request, service, model, payloads, errors)
            if not vectors:
                raise ApiError(
                    422,
                    f"the query image could not be embedded: {errors.get(0, 'unknown error')}",
                    param="image",
                    limit=schemas.first_limit(errors),
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
        body = await json_request(request, service, schemas.AddItemsRequest)
        store = service.writable_index(name)
        if (body.images is None) == (body.vectors is None):
            raise ApiError(422, "send exactly one of 'images' (base64 list) or 'vectors'", param="images")
        count = len(body.images if body.images is not None else body.vectors)
        check_count(service, count, "items", "images" if body.images is not None else "vectors")
        exhausted = None if body.ids is not None else ids_exhausted(store.index.next_id, count)
        if exhausted is not None:  # before any image is embedded (the add checks again, under its lock)
            raise ApiError(409, str(exhausted), code="ids_exhausted", param="ids")
        for what, values in (("metadata", body.metadata), ("ids", body.ids)):
            if values is not None and len(values) != count:
                message = f"{what} has {len(values)} entries for {count} items; send one per item"
                raise ApiError(422, message, param=what)
        for i, meta in enumerate(body.metadata or []):
            # first what JSON cannot give back (deep nesting broke every later search with a 500; an unpaired
            # surrogate cannot even be measured in UTF-8), then the size
            problem = None if meta is None else metadata_problem(meta)
            if problem is not None:
                raise ApiError(422, f"metadata[{i}] {problem}", param="metadata")
            size = len(json.dumps(meta, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
            if meta is not None and size > limits.max_metadata_bytes:
                raise ApiError(
                    413,
                    f"metadata[{i}] is {size:,} bytes of JSON, above max_metadata_bytes="
                    f"{limits.max_metadata_bytes:,}; store large data elsewhere and keep a key here",
                    limit="max_metadata_bytes",
                    param="metadata",
                )
        if body.vectors is not None:
            vectors = await asyncio.to_thread(_vector_array, body.vectors, store.dim, "vectors")
        else:
            model = service.index_models[name]
            if model is None:
                raise ApiError(422, service.index_problems.get(
                    name, f"index {name!r} matches no served model; add 'vectors' instead"
                ), param="images")  # fmt: skip
            payloads, errors = decode_strings(body.images)
            embedded = await _embed(request, service, model, payloads, errors)
            if errors:
                listed = "; ".join(errors[i] for i in sorted(errors)[:3])
                raise ApiError(
                    422,
                    f"{len(errors)} of {count} images could not be embedded, nothing was added: {listed}",
                    param="images",
                    limit=schemas.first_limit(errors),
                )
            vectors = np.stack([embedded[i] for i in range(count)])
        try:
            ids = await asyncio.to_thread(store.add, vectors, body.metadata, body.ids)
        except IdConflictError as exc:
            raise ApiError(409, str(exc), code="id_conflict", param="ids") from None
        except IdsExhaustedError as exc:  # another add took the last ids since the check above
            raise ApiError(409, str(exc), code="ids_exhausted", param="ids") from None
        except ValueError as exc:
            raise ApiError(422, str(exc)) from None
        except OSError as exc:
            raise _storage_error(name, exc) from None
        return schemas.AddItemsResponse(index=name, ids=[int(i) for i in ids], count=len(store))

    def checked_id(item_id: str) -> int:
        # why a string: an int path parameter also took "+1", "01", "1.0" and " 1" as item 1
        if int(item_id) > MAX_ID:
            raise ApiError(422, f"item id {item_id} is above the largest id {MAX_ID}", param="item_id")
        return int(item_id)

    decimal_id = Path(pattern=r"^(0|[1-9][0-9]{0,18})$", description="a decimal id")

    @app.get(
        "/v1/indexes/{name}/items/{item_id}",
        tags=["indexes"],
        dependencies=auth,
        response_model=schemas.ItemResponse,
        responses=_ERRORS,
        summary="one item's metadata, as search hits carry it",
    )
    async def get_item(name: str, item_id: str = decimal_id) -> schemas.ItemResponse:
        item_id = checked_id(item_id)
        # in a thread: the store's lock can be held through an add's fsync or a snapshot (seconds)
        present, metadata = await asyncio.to_thread(service.index(name).metadata_of, item_id)
        if not present:
            raise ApiError(404, f"index {name!r} has no item {item_id}", code="item_not_found")
        return schemas.ItemResponse(index=name, id=item_id, metadata=metadata)

    @app.delete(
        "/v1/indexes/{name}/items/{item_id}",
        tags=["indexes"],
        dependencies=auth,
        response_model=schemas.DeleteItemResponse,
        responses=_STORE_ERRORS,
        summary="remove one item; acknowledged once durable",
    )
    async def delete_item(name: str, item_id: str = decimal_id) -> schemas.DeleteItemResponse:
        item_id = checked_id(item_id)
        store = service.writable_index(name)
        try:
            removed = await asyncio.to_thread(store.remove, [item_id])
        except OSError as exc:
            raise _storage_error(name, exc) from None
        if not removed:
            raise ApiError(404, f"index {name!r} has no item {item_id}", code="item_not_found")
        return schemas.DeleteItemResponse(index=name, id=item_id, deleted=True, count=len(store))

    def describe(name: str) -> schemas.IndexInfo:
        """Blocking for some stores (a demo gallery is listed, loaded or built first): call it in a worker
        thread."""
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
            write_error=store.write_error,
        )

    @app.get(
        "/v1/indexes",
        tags=["indexes"],
        response_model=schemas.IndexList,
        dependencies=auth,
        responses=_ERRORS,
        summary="the served indexes, as GET /v1/indexes/{name} describes each",
    )
    async def list_indexes() -> schemas.IndexList:
        names = list(service.indexes)
        return schemas.IndexList(data=await asyncio.to_thread(lambda: [listed(name) for name in names]))

    def listed(name: str) -> schemas.IndexInfo:
        """``describe``, or for an index that cannot answer now (a demo gallery building or emptied) an
        entry that says so: one such index must not hide the others (a 503 for the whole list did)."""
        try:
            return describe(name)
        except ApiError as exc:
            if exc.status != 503:
                raise
            store = service.index(name)
            status = "building" if exc.code == "index_building" else "unavailable"
            return schemas.IndexInfo(
                name=name, status=status, problem=exc.message, count=None, dim=store.dim,
                model=service.index_models[name], metric=None, kind=None, normalize=None,
            )  # fmt: skip

    @app.get(
        "/v1/indexes/{name}",
        tags=["indexes"],
        response_model=schemas.IndexInfo,
        dependencies=auth,
        responses=_ERRORS,
        summary="count, dim and model of an index",
    )
    async def index_info(name: str) -> schemas.IndexInfo:
        service.index(name)  # the 404 of an unknown name, without a thread
        return await asyncio.to_thread(describe, name)
