"""Settings of the HTTP inference service: what to serve and the limits every request is held to.

Every limit has one name used in three places: the ``ServeConfig`` field, the ``visreg-hub serve`` flag
(``max_body_bytes`` -> ``--max-body-bytes``) and the 4xx message of a request that breaks it, so an
operator reading a client's error knows which flag to change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from visreg_hub.errors import ConfigError

# The API refuses anything bigger before decoding: 16 Mpx is a 4096 x 4096 photo.
DEFAULT_MAX_PIXELS = 4096 * 4096


@dataclass(frozen=True)
class ModelSpec:
    """One model to serve: ``source`` is a registry name, ``org/repo`` or folder; ``name`` is what
    clients send as ``"model"`` (the registry name, or the folder's name)."""

    name: str
    source: str


@dataclass(frozen=True)
class IndexSpec:
    """One durable index: clients call it ``name``; its snapshot and log live in ``folder``."""

    name: str
    folder: Path
    model: str | None = None  # served model that embeds image queries; None: the index's own or the first


@dataclass(frozen=True)
class Limits:
    """Per-request and per-process limits (each violation is a 4xx naming the field).

    Attributes:
        max_body_bytes: request body size (JSON or multipart), checked while it streams in.
        max_pixels: width * height of one image, read from its header before any pixel is decoded.
        max_image_bytes: encoded size of one image (after base64 decoding); a larger one is that item's
            error, the request's other images are embedded.
        max_items: images or vectors in one request.
        max_k: neighbours per search.
        request_timeout_s: wall time for one request; a request still queued after it is dropped (408).
        max_queue: images waiting for a model batch, per model; beyond it requests get 429 + Retry-After.
        decode_workers: threads that decode and preprocess images (bounds decode memory at
            ``decode_workers`` images at a time).
        max_metadata_bytes: JSON size of one item's metadata.
    """

    max_body_bytes: int = 32 * 2**20
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_image_bytes: int = 32 * 2**20
    max_items: int = 256
    max_k: int = 1000
    request_timeout_s: float = 30.0
    max_queue: int = 1024
    decode_workers: int = 2
    max_metadata_bytes: int = 16 * 1024

    def __post_init__(self) -> None:
        positive = ("max_body_bytes", "max_pixels", "max_image_bytes", "max_items", "max_k", "max_queue")
        for name in (*positive, "decode_workers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not self.request_timeout_s > 0:
            raise ConfigError(f"request_timeout_s must be > 0, got {self.request_timeout_s!r}")


@dataclass(frozen=True)
class ServeConfig:
    """Everything :func:`visreg_hub.serving.create_app` needs.

    Attributes:
        models: models to serve; the first is the default for requests that name none.
        indexes: durable indexes (see :mod:`visreg_hub.serving.store`).
        backend: ``"torch"``, ``"onnx"`` (ONNX Runtime, ``pip install 'visreg_hub[onnx-cpu]'``) or
            ``"auto"``; None: ``from_pretrained``'s default (``$VISREG_HUB_BACKEND`` or ``"auto"``).
        device: ``"cpu"``, ``"cuda"``, ... (None: CUDA when available).
        max_batch_size: images per model forward pass; concurrent requests are coalesced up to it.
        max_wait_ms: how long the first image of a batch waits for others to join it.
        api_key_hashes: sha256 hex digests of accepted API keys; empty: no authentication.
        cors_origins: origins allowed by CORS; empty (default): no CORS headers at all.
        limits: see :class:`Limits`.
        snapshot_every: log records after which an index is snapshotted and its log compacted.
        draft_decode: decode JPEGs at a reduced size when the model needs far fewer pixels (the
            demo's memory guard; ``visreg-hub serve --draft-decode``), as ``encode(draft_decode=True)``.
            Off by default: embeddings then equal ``encode()`` exactly.
        on_error: what ``/v1/embeddings`` does with an input it cannot embed when the request does not
            say: ``"raise"`` (default, OpenAI's behaviour: the request fails with a 422 listing every
            failure, so ``data`` always pairs with ``input`` by position) or ``"skip"`` (the others are
            embedded and the failures listed in ``errors``).
        without_indexes: how an unknown index's 404 explains a server that serves none (the demo says
            where its galleries are searched instead).
    """

    models: tuple[ModelSpec, ...]
    indexes: tuple[IndexSpec, ...] = ()
    backend: str | None = None
    device: str | None = None
    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    api_key_hashes: frozenset[str] = frozenset()
    cors_origins: tuple[str, ...] = ()
    limits: Limits = field(default_factory=Limits)
    snapshot_every: int = 10_000
    draft_decode: bool = False
    on_error: str = "raise"
    without_indexes: str = (
        "none (this server was started without indexes; `visreg-hub serve --index NAME=FOLDER` serves one)"
    )

    def __post_init__(self) -> None:
        if not self.models:
            raise ConfigError("serve needs at least one model; pass --model NAME_OR_PATH")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ConfigError(f"model names must be unique, got {names}; rename a folder or pass NAME=PATH")
        index_names = [i.name for i in self.indexes]
        if len(set(index_names)) != len(index_names):
            raise ConfigError(f"index names must be unique, got {index_names}")
        if self.backend not in (None, "auto", "torch", "onnx"):
            raise ConfigError(f"backend must be 'auto', 'torch' or 'onnx', got {self.backend!r}")
        if isinstance(self.max_batch_size, bool) or not isinstance(self.max_batch_size, int):
            raise ConfigError(f"max_batch_size must be a positive integer, got {self.max_batch_size!r}")
        if self.max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be a positive integer, got {self.max_batch_size!r}")
        # NaN fails both comparisons; an endless wait would stall every batch
        if not 0 <= self.max_wait_ms < float("inf"):
            raise ConfigError(f"max_wait_ms must be a finite number >= 0, got {self.max_wait_ms!r}")
        if self.on_error not in ("raise", "skip"):
            raise ConfigError(f"on_error must be 'raise' or 'skip', got {self.on_error!r}")
        if not isinstance(self.snapshot_every, int) or self.snapshot_every < 1:
            raise ConfigError(f"snapshot_every must be a positive integer, got {self.snapshot_every!r}")

    @property
    def default_model(self) -> str:
        return self.models[0].name


def model_spec(text: str) -> ModelSpec:
    """``NAME=SOURCE`` or ``SOURCE`` (a folder is named after itself, anything else keeps its text)."""
    if "=" in text:
        name, source = text.split("=", 1)
        if not name or not source:
            raise ConfigError(f"--model {text!r}: expected NAME=PATH_OR_NAME or PATH_OR_NAME")
        return ModelSpec(name, source)
    path = Path(text).expanduser()
    name = path.resolve().name if path.is_dir() else text
    return ModelSpec(name, text)


def index_spec(text: str) -> IndexSpec:
    """``NAME=FOLDER`` (the folder is created on first write if missing)."""
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise ConfigError(f"--index {text!r}: expected NAME=FOLDER")
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ConfigError(f"--index name {name!r} may only use letters, digits, '-', '_' and '.'")
    path = Path(folder).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(
            f"--index {text!r}: {folder} exists and is not a folder; name a folder for the index's snapshots "
            "and log (it is created if missing)"
        )
    return IndexSpec(name, path)
