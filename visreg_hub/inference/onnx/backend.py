"""The ONNX Runtime backend of the embedding pipeline, and its per-model export cache.

:class:`OnnxBackend` runs an :class:`~visreg_hub.inference.onnx.embedder.OnnxEmbedder`'s session behind
the :class:`~visreg_hub.inference.backends.Backend` interface. :func:`onnx_backend_for` is what
:func:`visreg_hub.inference.backends.backend_for` calls for a model whose backend is ``"onnx"``: it
exports the model once per (pooling, precision, optimisation, provider, device) and keeps the export for
the model's lifetime (and on disk across processes, :mod:`.cache`), redoing it when the weights change.
"""

from __future__ import annotations

import itertools
import logging
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from visreg_hub.inference.backends import Backend, BackendSpec, resolve_dtype
from visreg_hub.inference.images import DEFAULT_MAX_PIXELS
from visreg_hub.inference.onnx.cache import cached_export
from visreg_hub.inference.onnx.embedder import OnnxEmbedder
from visreg_hub.inference.onnx.export import export_onnx
from visreg_hub.inference.onnx.runtime import CPU
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


def weights_fingerprint(model: nn.Module) -> tuple:
    """Identity of the weights' current values: changes on in-place updates and on moves."""
    # why: in-place updates bump a tensor's version counter and moves change its storage, so a stale
    # export is never reused without hashing hundreds of MB of weights on every call. Each module's own
    # parameters and buffers rather than state_dict(): the same tensors without state_dict's hooks,
    # prefixes and detached copies, about 3x cheaper (it runs on every encode() call)
    return tuple(
        (t.data_ptr(), t._version)
        for module in model.modules()
        for t in itertools.chain(module._parameters.values(), module._buffers.values())
        if t is not None
    )


def _providers_for(spec: BackendSpec, device: str | torch.device | None) -> tuple[str | None, int]:
    if device is None:
        return spec.provider, 0
    target = torch.device(device)
    if target.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N' for the ONNX backend, got {device!r}")
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
        export_onnx(
            model, path, pooling=pooling, fp16=precision == "fp16", int8=precision == "int8",
            optimize=optimize, validation_providers=providers,
        )  # fmt: skip

    return cached_export(model, options, export)


def onnx_backend_for(
    model: nn.Module,
    spec: BackendSpec,
    *,
    pooling: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    optimize: bool = False,
    cache: weakref.WeakKeyDictionary,
) -> OnnxBackend:
    """The ONNX backend of ``model`` for one call's arguments (exported or read from disk on first use).

    Args:
        model: a float32 :class:`~visreg_hub.models.VISRegEncoder`.
        spec: the model's backend spec (provider, precision).
        pooling: None: the checkpoint's default.
        device: None: ``spec.provider`` (None: best available); ``"cpu"``; ``"cuda"`` / ``"cuda:1"``.
        dtype: None: ``spec.precision``; float32 or float16 choose the graph precision; bfloat16 is refused.
        optimize: export with ONNX Runtime fusions.
        cache: model -> {key: (weights fingerprint, embedder)}, weakly keyed by the model.
    """
    pooling = model.config.pooling if pooling is None else pooling
    model.embedding_dim(pooling)  # validates before any export
    resolved = resolve_dtype(dtype)
    if resolved == torch.bfloat16:
        raise ValueError(
            "dtype=bfloat16 is not supported by the ONNX backend; use dtype='fp16' or backend='torch'"
        )
    precision = spec.precision if resolved is None else "fp16" if resolved == torch.float16 else "fp32"
    providers, device_id = _providers_for(spec, device)
    key = (pooling, precision, optimize, providers, device_id)
    entries = cache.setdefault(model, {})
    fingerprint = weights_fingerprint(model)
    entry = entries.get(key)
    if entry is None or entry[0] != fingerprint:
        path = export_cached(
            model, pooling=pooling, precision=precision, optimize=optimize, providers=providers
        )
        embedder = OnnxEmbedder(path, providers=providers, device_id=device_id)
        logger.info("%s runs on ONNX Runtime: %s", model.config.name or "the model", embedder)
        entries[key] = entry = (fingerprint, embedder)
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
    from visreg_hub.inference.backends import _ONNX_BACKENDS

    backend = onnx_backend_for(
        model, BackendSpec("onnx"), pooling=pooling, device=device, dtype=dtype, optimize=optimize,
        cache=_ONNX_BACKENDS,
    )  # fmt: skip
    pipeline = EmbeddingPipeline(
        backend, normalize=normalize, max_pixels=max_pixels, draft_decode=draft_decode
    )
    result, failures = pipeline.run(images, on_error=on_error, desc="encode (onnx)", **run_kwargs)
    embeddings = result.numpy() if convert_to_numpy else result
    return EncodeResult(embeddings, failures) if on_error == "skip" else embeddings
