"""The ONNX Runtime backend of the embedding pipeline, and its per-model export cache.

:class:`OnnxBackend` runs an :class:`~visreg_hub.inference.onnx.embedder.OnnxEmbedder`'s session behind
the :class:`~visreg_hub.inference.backends.Backend` interface. :func:`onnx_backend_for` is what
:func:`visreg_hub.inference.backends.backend_for` calls for a model whose backend is ``"onnx"``: it
exports the model once per (pooling, precision, optimisation, provider, device) and keeps the export for
the model's lifetime (and on disk across processes, :mod:`.cache`), redoing it when the weights change.
"""

from __future__ import annotations

import itertools
import json
import logging
import secrets
import threading
import weakref
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from visreg_hub.errors import DeviceError, UserInputError, VisregHubError
from visreg_hub.inference.backends import Backend, BackendSpec, resolve_dtype
from visreg_hub.inference.images import DEFAULT_MAX_PIXELS
from visreg_hub.inference.onnx.cache import cached_export
from visreg_hub.inference.onnx.embedder import OnnxEmbedder
from visreg_hub.inference.onnx.export import export_onnx
from visreg_hub.inference.onnx.graph import CORE_INPUT, EMBEDDING
from visreg_hub.inference.onnx.runtime import CPU, PROVIDER_PRIORITY, OnnxMetadata, read_onnx_metadata
from visreg_hub.inference.onnx.validate import (
    OnnxValidationError,
    default_min_cosine,
    failure_summary,
    validate_onnx,
)
from visreg_hub.inference.pipeline import EmbeddingPipeline, EncodeResult

logger = logging.getLogger(__name__)


class OnnxBackend(Backend):
    """An exported graph run by ONNX Runtime (plain ``session.run`` on the CPU, IOBinding on GPUs).

    Args:
        embedder: the opened ``.onnx`` file.
    """

    name = "onnx"

    def __init__(self, embedder: OnnxEmbedder) -> None:
        self.embedder = embedder
        self.transform = embedder.transform
        self.input_shape = embedder.input_shape
        self.output_shape = (embedder.embedding_dim,)
        self.pin_memory = embedder.uses_io_binding
        self.device = torch.device("cpu")  # outputs come back to the host (IOBinding copies them)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.embedder.embed_pixels(pixels)

    def describe(self) -> str:
        return f"onnx on {self.embedder.active_provider} ({self.embedder.metadata.precision})"


SAMPLES_PER_TENSOR = 64  # values of each weight tensor compared on every call (see WeightsWatch)
_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _weight_tensors(model: nn.Module) -> list[torch.Tensor]:
    # each module's own parameters and buffers rather than state_dict(): the same tensors without
    # state_dict's hooks, prefixes and detached copies, about 3x cheaper (it runs on every encode() call)
    return [
        t
        for module in model.modules()
        for t in itertools.chain(module._parameters.values(), module._buffers.values())
        if t is not None
    ]


def weights_fingerprint(model: nn.Module) -> tuple:
    """Identity of the weight tensors: changes on ordinary in-place updates and on moves."""
    return tuple((t.data_ptr(), t._version) for t in _weight_tensors(model))


class WeightsWatch:
    """Tells whether a model's weights still hold the values an export was made from, on every call.

    Ordinary in-place updates bump a tensor's version counter and moves change its storage
    (:func:`weights_fingerprint`), but an update through ``param.data`` (hand-written EMA, weight surgery)
    has a version counter of its own, which the parameter never sees. So the watch also keeps strided
    views of :data:`SAMPLES_PER_TENSOR` values spread over each tensor and compares them bit for bit:
    about 0.2 ms for a ViT-S on a CPU, where hashing its 88 MB of weights would take tens of ms.
    An edit that misses every sampled value goes unseen; ``backend="torch"`` has no such gap.
    """

    def __init__(self, model: nn.Module) -> None:
        tensors = _weight_tensors(model)
        self.fingerprint = tuple((t.data_ptr(), t._version) for t in tensors)
        groups: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            flat = t.detach().reshape(-1)
            step = max(1, flat.numel() // SAMPLES_PER_TENSOR)
            groups.setdefault(t.dtype, []).append(flat[::step])
        self._views = list(groups.values())
        self._sample = self._read()

    def _read(self) -> list[torch.Tensor]:
        # bit patterns, so that NaN weights compare equal to themselves
        out = []
        for views in self._views:
            values = torch.cat(views)
            floating = values.is_floating_point() or values.is_complex()
            out.append(values.view(_SAME_SIZE_INT[values.element_size()]) if floating else values)
        return out

    def unchanged(self, model: nn.Module) -> bool:
        """True when ``model``'s weights are the tensors watched, holding the sampled values."""
        if weights_fingerprint(model) != self.fingerprint:
            return False
        return all(torch.equal(now, then) for now, then in zip(self._read(), self._sample, strict=True))


def _providers_for(spec: BackendSpec, device: str | torch.device | None) -> tuple[str | None, int]:
    """(provider, device id) for an ``encode(device=...)`` call on the ONNX backend.

    Raises:
        DeviceError: a malformed device, or ``cuda`` where this onnxruntime build has no GPU provider:
            as on the torch backend, a device asked for by name is never silently replaced by the CPU.
    """
    if device is None:
        return spec.provider, 0
    try:
        target = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise DeviceError(f"device {device!r} is not a device name; use 'cpu', 'cuda' or 'cuda:N'") from None
    if target.type not in ("cpu", "cuda"):
        raise DeviceError(f"device must be 'cpu', 'cuda' or 'cuda:N' for the ONNX backend, got {device!r}")
    if target.type == "cuda":
        import onnxruntime

        available = onnxruntime.get_available_providers()
        if not any(name in available for name in PROVIDER_PRIORITY if name != CPU):
            raise DeviceError(
                f"device {str(target)!r} asked for, but this onnxruntime build has no GPU provider "
                f"(available: {available}); use device='cpu', install onnxruntime-gpu with matching "
                "CUDA/cuDNN, or load with backend='torch'"
            )
    return ("cuda" if target.type == "cuda" else CPU), target.index or 0


def export_cached(
    model: nn.Module,
    *,
    pooling: str,
    precision: str = "fp32",
    optimize: bool = False,
    providers: str | list[str] | None = None,
) -> Path:
    """Path of ``model``'s exported, validated graph in the on-disk cache (exported on a miss).

    Args:
        model: a float32 :class:`~visreg_hub.models.VISRegEncoder`.
        pooling: feature tap of the graph's ``embedding``.
        precision: ``"fp32"``, ``"fp16"`` or ``"int8"`` (dynamic int8 quantisation of the linear layers).
        optimize: ONNX Runtime fusions.
        providers: providers of the validation against PyTorch.
    """
    options = {"pooling": pooling, "precision": precision, "optimize": bool(optimize)}

    def export(path: Path) -> None:
        logger.info(
            "exporting %s to ONNX (pooling=%s, precision=%s); once per weights and options, then cached",
            model.config.name or "the model", pooling, precision,
        )  # fmt: skip
        try:
            export_onnx(
                model, path, pooling=pooling, fp16=precision == "fp16", int8=precision == "int8",
                optimize=optimize, validation_providers=providers,
            )  # fmt: skip
        except OnnxValidationError as exc:  # its message names a staging file the cache deletes
            raise OnnxValidationError(
                f"the ONNX export of {model.config.name or 'the model'} (pooling={pooling}, "
                f"precision={precision}) does not match PyTorch, so nothing was cached: "
                f"{failure_summary(exc.report)}. `visreg-hub export onnx` keeps a graph and its report",
                exc.report,
            ) from None

    def check(path: Path) -> None:
        # a graph read from the cache (this user's own, see .cache) runs once against the model before it
        # is used, judged by what this model and these options make (not by what the file's metadata says:
        # the metadata also drives preprocessing, which the random-input run does not exercise), on
        # inputs of a fresh seed: this catches a damaged or mismatched export
        try:
            differs = metadata_mismatch(read_onnx_metadata(path), model, pooling=pooling, precision=precision)
            if differs:
                raise VisregHubError(f"the cached graph's metadata is not this model's ({differs})")
            validate_onnx(
                model, path, batch_sizes=(1,), providers=providers, min_cosine=default_min_cosine(precision),
                seed=secrets.randbits(32),
            )  # fmt: skip
        except VisregHubError:
            raise
        except Exception as exc:  # a file ONNX Runtime cannot even run is as untrustworthy
            raise VisregHubError(f"the cached graph does not run ({type(exc).__name__}: {exc})") from exc

    return cached_export(model, options, export, check=check)


def metadata_mismatch(meta: OnnxMetadata, model: nn.Module, *, pooling: str, precision: str) -> str:
    """The fields of a cached plain graph's metadata that differ from what ``export_cached`` writes for
    ``model`` (``"field: recorded X, expected Y"``, joined), or "" when they agree."""
    config = model.config
    expected = {
        "model_config": config.to_dict(),
        "data_config": dict(config.data_config),
        "pooling": pooling,
        "embedding_dim": model.embedding_dim(pooling),
        "outputs": [EMBEDDING],
        "precision": precision,
        "input_name": CORE_INPUT,
        "input_layout": "NCHW",
        "preprocessing": "",
    }
    recorded = asdict(meta)

    def plain(value: Any) -> Any:  # tuples and lists alike, as the JSON in the file
        return json.loads(json.dumps(value, sort_keys=True, default=str))

    return "; ".join(
        f"{name}: recorded {plain(recorded[name])!r}, expected {plain(value)!r}"
        for name, value in expected.items()
        if plain(recorded[name]) != plain(value)
    )


_EXPORT_LOCK = threading.Lock()  # held while a graph is exported or opened (see onnx_backend_for)
_CACHE_LOCK = threading.Lock()  # guards LIVE_BACKENDS' dictionaries
# The in-memory cache: model -> {(pooling, precision, optimize, providers, device id): (WeightsWatch,
# OnnxEmbedder)}, weakly keyed, so a session lives as long as its model (the disk cache is .cache's).
LIVE_BACKENDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _current(model: nn.Module, key: tuple) -> tuple | None:
    """The cached (watch, embedder) of ``model`` for ``key`` if its weights are unchanged, else None."""
    with _CACHE_LOCK:
        entry = LIVE_BACKENDS.get(model, {}).get(key)
    return entry if entry is not None and entry[0].unchanged(model) else None


def onnx_backend_for(
    model: nn.Module,
    spec: BackendSpec,
    *,
    pooling: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    optimize: bool = False,
) -> OnnxBackend:
    """The ONNX backend of ``model`` for one call's arguments (exported or read from disk on first use).

    Args:
        model: a float32 :class:`~visreg_hub.models.VISRegEncoder`.
        spec: the model's backend spec (provider, precision).
        pooling: None: the checkpoint's default.
        device: None: ``spec.provider`` (None: best available); ``"cpu"``; ``"cuda"`` / ``"cuda:1"``.
        dtype: None: ``spec.precision``; float32 or float16 choose the graph precision; bfloat16 is refused.
        optimize: export with ONNX Runtime fusions.
    """
    pooling = model.config.pooling if pooling is None else pooling
    model.embedding_dim(pooling)  # validates before any export
    resolved = resolve_dtype(dtype)
    if resolved == torch.bfloat16:
        raise UserInputError(
            "dtype=bfloat16 is not supported by the ONNX backend; use dtype='fp16' or backend='torch'"
        )
    precision = spec.precision if resolved is None else "fp16" if resolved == torch.float16 else "fp32"
    providers, device_id = _providers_for(spec, device)
    key = (pooling, precision, optimize, providers, device_id)
    entry = _current(model, key)
    if entry is None:
        # why one lock for the process: torch.export keeps global tracing state, so two exports in two
        # threads (a server's first requests, on one model or two) break each other and can leave fake
        # tensors in the model; the second thread waits here and then finds the first one's graph
        with _EXPORT_LOCK:
            entry = _current(model, key)
            if entry is None:
                watch = WeightsWatch(model)
                path = export_cached(
                    model, pooling=pooling, precision=precision, optimize=optimize, providers=providers
                )
                embedder = OnnxEmbedder(path, providers=providers, device_id=device_id)
                logger.info("%s runs on ONNX Runtime: %s", model.config.name or "the model", embedder)
                entry = (watch, embedder)
                with _CACHE_LOCK:
                    LIVE_BACKENDS.setdefault(model, {})[key] = entry
    return OnnxBackend(entry[1])


def encode_onnx(
    model: nn.Module,
    images: Any,
    *,
    pooling: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    optimize: bool = False,
    normalize: bool = True,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    convert_to_numpy: bool = False,
    on_error: str = "raise",
    draft_decode: bool = False,
    **run_kwargs: Any,
) -> torch.Tensor | np.ndarray | EncodeResult:
    """``encode()`` of ``model`` through its ONNX Runtime backend, with export options (``optimize``).

    Args:
        model: a float32 :class:`~visreg_hub.models.VISRegEncoder`.
        images, pooling, normalize, max_pixels, convert_to_numpy, on_error, draft_decode: as ``encode()``.
        device: None: the best available provider; ``"cpu"``; ``"cuda"`` / ``"cuda:1"``: the CUDA
            provider (TensorRT is used only when asked for through :class:`OnnxEmbedder`).
        dtype: None or float32: an fp32 graph; float16: an fp16 graph. bfloat16 is refused.
        optimize: export with ONNX Runtime fusions.
        **run_kwargs: ``batch_size``, ``num_workers``, ``show_progress_bar`` (see ``encode()``).
    """
    backend = onnx_backend_for(
        model, BackendSpec("onnx"), pooling=pooling, device=device, dtype=dtype, optimize=optimize
    )
    pipeline = EmbeddingPipeline(
        backend, normalize=normalize, max_pixels=max_pixels, draft_decode=draft_decode
    )
    result, failures = pipeline.run(images, on_error=on_error, desc="encode (onnx)", **run_kwargs)
    embeddings = result.numpy() if convert_to_numpy else result
    return EncodeResult(embeddings, failures) if on_error == "skip" else embeddings
