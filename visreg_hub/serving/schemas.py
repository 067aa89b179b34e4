"""Request and response bodies of the HTTP API (pydantic models; they also make /openapi.json)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from visreg_hub.retrieval.records import MAX_ID

# The largest id a client may give: one below int64's maximum, so the index's next id still fits.
ItemId = Annotated[int, Field(ge=0, le=MAX_ID)]


def _json_type(value: Any) -> str:
    """How a parsed JSON value is named in an error: "a number", "null", "an object", ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, dict):
        return "an object"
    return "an array" if isinstance(value, list) else f"a {type(value).__name__}"


class _Strict(BaseModel):
    """Request bodies: unknown fields and loose types are refused (``"3"`` is not a k, ``true`` not an id;
    integers are accepted where floats are expected, as JSON does not tell 1 from 1.0)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class EmbeddingsRequest(_Strict):
    """OpenAI-embeddings shaped. ``input``: base64 images or ``data:image/...;base64,`` URLs.

    URLs and file paths are refused: the server never fetches or opens anything a client names.
    """

    input: str | list[str] = Field(description="one image or a list; base64 or data: URL")
    model: str | None = Field(None, description="a name from GET /v1/models; default: the first")
    encoding_format: Literal["float", "base64"] | None = Field(
        "float", description="'base64': each embedding as base64 of little-endian float32 (null: 'float')"
    )
    dimensions: int | None = Field(
        None,
        ge=1,
        description="keep the first N dimensions, then L2-normalise (OpenAI's `dimensions`; "
        "model.encode(truncate_dim=N)); at most the model's embedding_dim",
    )
    user: str | None = Field(None, description="accepted for OpenAI compatibility, ignored")
    on_error: Literal["skip", "raise"] | None = Field(
        None,
        description="'raise': any input that cannot be embedded fails the whole request with a 422 listing "
        "every failure, as OpenAI's API does; 'skip': such inputs are listed in `errors` by index and the "
        "others embedded (`data` is then shorter than `input`: pair by `index`); null: the server's "
        "default (`visreg-hub serve --on-error`, 'raise' unless set)",
    )

    @field_validator("input", mode="before")
    @classmethod
    def _images_are_strings(cls, value: Any) -> Any:
        """One error naming the bad input and the fix.

        why: pydantic reports a union field once per branch ("input.str: Input should be a valid string;
        input.list[str].0: Input should be a valid string"), which names neither the item nor what to send.
        """
        if isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise PydanticCustomError(
                "images_as_strings",
                "input is {got}; send an image as a base64 string or data: URL, or a list of them",
                {"got": _json_type(value)},
            )
        for position, item in enumerate(value):
            if not isinstance(item, str):
                raise PydanticCustomError(
                    "images_as_strings",
                    "input[{position}] is {got}, not a string; send each image as base64 or a data: URL",
                    {"position": position, "got": _json_type(item)},
                )
        return value


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class ItemError(BaseModel):
    index: int
    message: str
    limit: str | None = Field(
        None, description="the server limit this input broke (e.g. 'max_pixels'), or null"
    )


class ItemMessage(str):
    """One input's error message, as the routes collect them (input index -> message); ``limit`` names the
    server limit it broke (``max_image_bytes``, ``max_pixels``), None for any other failure."""

    limit: str | None = None

    def __new__(cls, message: str, limit: str | None = None) -> ItemMessage:
        item = super().__new__(cls, message)
        item.limit = limit
        return item


def first_limit(items: dict[int, str]) -> str | None:
    """The limit the first failed input broke (an error's ``limit``), None when it broke none."""
    return getattr(items[min(items)], "limit", None) if items else None


class Usage(BaseModel):
    prompt_tokens: int = 0
    total_tokens: int = 0
    images: int = 0


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    data: list[Embedding]
    errors: list[ItemError] = []
    usage: Usage


class SearchRequest(_Strict):
    """Exactly one of ``image`` (base64 / data: URL, embedded with the index's model) or ``vector``."""

    index: str
    image: str | None = None
    vector: list[float] | None = None
    k: int = Field(10, description="neighbours to return (at most max_k)")


class Hit(BaseModel):
    id: int
    score: float
    metadata: dict[str, Any] | None = None


class SearchResponse(BaseModel):
    index: str
    model: str | None
    hits: list[Hit]


class AddItemsRequest(_Strict):
    """Items as ``images`` (base64 / data: URLs) or ``vectors``; optional per-item metadata and ids."""

    images: list[str] | None = None
    vectors: list[list[float]] | None = None
    metadata: list[dict[str, Any] | None] | None = None
    ids: list[ItemId] | None = Field(
        None,
        description=f"0..{MAX_ID}; default: assigned by the server, counting on from the largest id the "
        "index ever held (so an explicit id near the top leaves no automatic ones: a 409 'ids_exhausted')",
    )


class AddItemsResponse(BaseModel):
    index: str
    ids: list[int]
    count: int


class ItemResponse(BaseModel):
    index: str
    id: int
    metadata: dict[str, Any] | None


class DeleteItemResponse(BaseModel):
    index: str
    id: int
    deleted: bool
    count: int


class IndexInfo(BaseModel):
    name: str
    status: Literal["ready", "building", "unavailable"] = Field(
        "ready",
        description="'building' or 'unavailable' only for an index the server builds itself (a demo "
        "gallery) that cannot be searched now; GET /v1/indexes lists it so, with the reason in 'problem' "
        "and null count, metric, kind and normalize",
    )
    problem: str | None = Field(None, description="why the index cannot be searched now (status)")
    count: int | None
    dim: int
    model: str | None
    metric: str | None
    kind: str | None
    normalize: bool | None = Field(
        description="added vectors and vector queries are L2-normalised (ip scores are then cosines)"
    )
    snapshot_error: str | None = Field(
        None,
        description="why the last snapshot failed (a full disk), until one succeeds; changes are still "
        "committed to the write-ahead log meanwhile",
    )
    write_error: str | None = Field(
        None,
        description="why the last add or delete could not be written to the log (a full disk: it was "
        "refused with a 507 and changed nothing), until one is written; searches still work meanwhile",
    )


class IndexList(BaseModel):
    object: Literal["list"] = "list"
    data: list[IndexInfo]


class ModelInfo(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="Unix time the server loaded the model (OpenAI's model field)")
    owned_by: str = "visreg_hub"
    source: str
    embedding_dim: int
    input_size: list[int]
    backend: str = Field(
        description="what embeds this model's requests: 'onnx' (ONNX Runtime) or 'torch', as model.backend "
        "says for encode(); `visreg-hub serve --backend` chooses"
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelInfo]


_STATUS_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


def error_type(status: int) -> str:
    """OpenAI's error ``type`` of an HTTP status: one of five, so a client that branches on ``type`` sees
    one value per kind of failure; what exactly went wrong is the ``code`` (``index_not_found``, ...)."""
    return _STATUS_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")


def error_body(
    message: str,
    status: int,
    limit: str | None = None,
    code: str | None = None,
    items: dict | None = None,
    param: str | None = None,
) -> dict[str, Any]:
    """The JSON of every error answer (:class:`ErrorResponse`): OpenAI's error object (message, type (from
    the HTTP ``status``), param (the request field at fault, or null), code) plus the server ``limit`` a
    request broke, and per-input ``errors`` when ``items`` (index -> message) is given."""
    body: dict[str, Any] = {
        "error": {
            "message": message,
            "type": error_type(status),
            "param": param,
            "code": code,
            "limit": limit,
        }
    }
    if items is not None:
        body["errors"] = [
            {"index": i, "message": m, "limit": getattr(m, "limit", None)} for i, m in sorted(items.items())
        ]
    return body


class ErrorDetail(BaseModel):
    """OpenAI's error object; ``limit`` names the server limit (and flag) a request broke."""

    message: str
    type: str = Field(
        description="OpenAI's: 'invalid_request_error' (4xx), 'authentication_error' (401), "
        "'permission_error' (403), 'rate_limit_error' (429), 'server_error' (5xx)"
    )
    param: str | None = Field(None, description="the request field at fault (e.g. 'dimensions'), or null")
    code: str | None = Field(
        None,
        description="what went wrong, for clients that branch on it: 'input_not_embedded' (on_error "
        "'raise'), 'no_input_embedded' (every input failed), 'model_not_found', 'index_not_found', "
        "'item_not_found', 'id_conflict', 'ids_exhausted', 'read_only_index', 'invalid_api_key', "
        "'timeout', 'not_ready', 'server_stopping', 'index_building', 'index_unavailable', "
        "'storage_full', 'storage_error'; null where the status and message say it all",
    )
    limit: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
    errors: list[ItemError] | None = Field(None, description="per-input messages when no input was embedded")
