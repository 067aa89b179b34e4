"""Inference backends: what turns a batch of preprocessed uint8 pixels into features.

One small interface, two implementations, chosen when the model is loaded (as sentence-transformers
does): ``from_pretrained(name, backend="torch" | "onnx", provider=..., precision=...)`` records a
:class:`BackendSpec` on the model, and :func:`backend_for` turns it into a :class:`Backend` the first
time the model embeds something (for the ONNX backend that means exporting or reading a cached graph).

* :class:`TorchBackend`: the model itself under ``torch.inference_mode`` (and autocast when asked).
* ``OnnxBackend`` (:mod:`visreg_hub.inference.onnx.backend`): an exported graph run by ONNX Runtime.

Both give the :class:`~visreg_hub.inference.pipeline.EmbeddingPipeline` the same four things: the
per-image transform (decoded PIL image -> (C, H, W) uint8, run in DataLoader workers), the shape of one
transformed item, the shape of one output item, and ``forward`` ((B, C, H, W) uint8 -> (B, *out) float32,
pooled but not L2-normalised).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from visreg_hub.devices import resolve_device
from visreg_hub.errors import DeviceError, MissingExtraError, UserInputError
from visreg_hub.inference.preprocess import Preprocessor

logger = logging.getLogger(__name__)

BACKENDS = ("torch", "onnx")
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}  # fmt: skip


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bf16"``, ``torch.float16``, ... -> a torch dtype (None stays None); anything else: ValueError."""
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype in _DTYPES.values()):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise UserInputError(
        f"dtype must be None, float32, float16 or bfloat16 (or 'fp32', 'fp16', 'bf16'), got {dtype!r}"
    )


class _SharedState:
    """What the calls running on one model share: the saved training flags and device, and a count."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.users = 0
        self.device: torch.device | None = None
        self.original_device: torch.device | None = None
        self.flags: list[tuple[nn.Module, bool]] = []


_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> _SharedState
_STATES_LOCK = threading.Lock()


@contextlib.contextmanager
def inference_state(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Eval mode and ``device`` for the duration; every module's training flag and the device restored.

    Safe for concurrent calls on one model (threads of a server, a validation thread beside training):
    the first call saves the flags and moves the model, the last one restores them, so no call runs a
    forward in training mode and the caller's ``train()`` is not lost. A call that needs another device
    waits until the calls on the current one have finished.
    """
    with _STATES_LOCK:
        state = _STATES.setdefault(model, _SharedState())
    with state.changed:
        while state.users and state.device != device:
            state.changed.wait()
        if state.users == 0:
            state.flags = [(module, module.training) for module in model.modules()]
            state.original_device = next(model.parameters()).device
            state.device = device
            if state.original_device != device:
                logger.info("moving the model from %s to %s for this call", state.original_device, device)
                model.to(device)
            model.eval()
        state.users += 1
    try:
        yield
    finally:
        with state.changed:
            state.users -= 1
            if state.users == 0:
                for module, training in state.flags:
                    module.training = training
                if state.original_device != device:
                    model.to(state.original_device)
                state.flags, state.device = [], None
                state.changed.notify_all()


class Backend:
    """The interface the pipeline needs; subclasses fill in the attributes and ``forward``.

    Attributes:
        name: ``"torch"`` or ``"onnx"``.
        device: where ``forward`` returns its outputs (the pipeline normalises them there).
        transform: decoded PIL image -> (C, H, W) uint8 tensor; picklable (runs in DataLoader workers).
        input_shape: (C, H, W) of one transformed image.
        output_shape: shape of one output item, e.g. (E,) for embeddings, (h, w, D) for patch grids.
        pin_memory: the DataLoader should pin batches (a GPU consumes them).
    """

    name: str
    device: torch.device
    transform: Callable[[Any], torch.Tensor]
    input_shape: tuple[int, int, int]
    output_shape: tuple[int, ...]
    pin_memory: bool = False

    def session(self) -> contextlib.AbstractContextManager:
        """Context entered around a run of ``forward`` calls (eval mode, device, no-grad, autocast)."""
        return contextlib.nullcontext()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) uint8 on the CPU -> (B, *output_shape) float32 on ``device`` (not normalised)."""
        raise NotImplementedError

    def describe(self) -> str:
        """One line for logs: backend, device or provider, precision."""
        return f"{self.name} on {self.device}"


class TorchBackend(Backend):
    """The PyTorch model itself, normalisation on its device, optional autocast.

    Args:
        model: a :class:`~visreg_hub.models.VISRegEncoder`.
        pooling: feature tap of the embedding (None: the checkpoint's default); ignored for patch tokens.
        device: where to run (None: where the parameters are). The model is moved there for each
            ``session()`` and moved back afterwards.
        dtype: float16/bfloat16 run a float32 model under autocast; None or float32: the model's dtype.
        output: ``"embedding"`` ((B, E) pooled) or ``"patch_tokens"`` ((B, h, w, D) grids).
    """

    name = "torch"

    def __init__(
        self,
        model: nn.Module,
        *,
        pooling: str | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        output: str = "embedding",
    ) -> None:
        self.model = model
        self.pooling = pooling
        self.output = output
        amp_dtype = resolve_dtype(dtype)
        self.param_dtype = next(model.parameters()).dtype
        target = resolve_device(device) if device is not None else next(model.parameters()).device
        if target.type == "cuda" and target.index is None:  # "cuda" means the current device, as in .to()
            target = torch.device("cuda", torch.cuda.current_device())
        if amp_dtype == torch.float32 and self.param_dtype != torch.float32:
            raise UserInputError(
                f"dtype=float32 was asked but the model's parameters are {self.param_dtype}; "
                "call model.float() first"
            )
        self.amp_dtype = amp_dtype
        self.use_autocast = amp_dtype in (torch.float16, torch.bfloat16) and self.param_dtype == torch.float32
        if amp_dtype in (torch.float16, torch.bfloat16) and target.type == "cpu":
            logger.info("autocast to %s on the CPU is slow; dtype is meant for GPUs", amp_dtype)
        self.device = target
        self.preprocessor = Preprocessor(model.data_config)
        self.transform = self.preprocessor
        self.input_shape = self.preprocessor.output_shape
        self.pin_memory = target.type == "cuda"
        if output == "embedding":
            self.output_shape = (model.embedding_dim(pooling),)  # validates pooling before any decoding
        elif output == "patch_tokens":
            _, height, width = self.input_shape
            patch = model.config.patch_size
            self.output_shape = (height // patch, width // patch, model.config.embed_dim)
        else:
            raise UserInputError(f"output must be 'embedding' or 'patch_tokens', got {output!r}")

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        with inference_state(self.model, self.device), torch.inference_mode():
            yield

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        inputs = self.preprocessor.normalize(
            pixels.to(self.device, non_blocking=True), dtype=self.param_dtype
        )
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_autocast):
            if self.output == "patch_tokens":
                return self.model.patch_tokens(inputs).float()
            return self.model(inputs, pooling=self.pooling).float()

    def describe(self) -> str:
        precision = self.amp_dtype if self.use_autocast else self.param_dtype
        return f"torch on {self.device} ({str(precision).removeprefix('torch.')})"


# ------------------------------------------------------------------ choosing a backend at load time
@dataclass(frozen=True)
class BackendSpec:
    """What ``from_pretrained(..., backend=, provider=, precision=)`` asked for; stored on the model.

    Attributes:
        backend: ``"auto"`` (ONNX Runtime on the CPU when it is installed, torch on GPUs), ``"torch"``
            or ``"onnx"``.
        provider: ONNX Runtime provider (``"cpu"``, ``"cuda"``, ``"tensorrt"`` or a full name), or a tuple
            of them, best first (``("cuda", "cpu")`` falls back to the CPU); None: from the model's
            device. Only for the ONNX backend.
        precision: ONNX graph precision: ``"fp32"``, ``"fp16"`` (GPU providers) or ``"int8"`` (dynamic
            int8 quantisation of the linear layers, for CPUs). Only for the ONNX backend.
    """

    backend: str = "torch"
    provider: str | tuple[str, ...] | None = None
    precision: str = "fp32"


REQUESTS = ("auto", *BACKENDS)
PRECISIONS = ("fp32", "fp16", "int8")
ENV_BACKEND = "VISREG_HUB_BACKEND"


def make_spec(backend: str = "auto", provider: str | None = None, precision: str = "fp32") -> BackendSpec:
    """Check and normalise ``from_pretrained``'s backend arguments (a ValueError names the bad one).

    ``"auto"`` with a ``provider`` or a non-fp32 ``precision`` means ``"onnx"`` (only ONNX takes them).
    """
    if backend not in REQUESTS:
        raise UserInputError(f"backend must be one of {REQUESTS}, got {backend!r}")
    aliases = {"float32": "fp32", "float16": "fp16"}
    precision = aliases.get(precision, precision)
    if precision not in PRECISIONS:
        raise UserInputError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if backend == "torch" and (provider is not None or precision != "fp32"):
        raise UserInputError(
            "provider= and precision= choose the ONNX Runtime graph; pass backend='onnx' with them "
            "(for torch use device= and dtype=)"
        )
    if backend == "auto" and (provider is not None or precision != "fp32"):
        backend = "onnx"
    if isinstance(provider, list):  # kept on the model and part of the export key: hashable
        provider = tuple(provider)
    if provider is not None:  # a misspelt provider fails here, not after the first encode()'s export
        _check_provider(provider)
    return BackendSpec(backend, provider, precision)


def _check_provider(provider: str | tuple[str, ...]) -> None:
    """Refuse a provider name that is not one, or providers none of which this onnxruntime build has: as
    with ``encode(device="cuda")``, a device asked for by name is never silently replaced by the CPU (a
    list that names ``"cpu"`` last asks for that fallback)."""
    from visreg_hub.inference.onnx.runtime import provider_names

    names = provider_names(provider)
    if importlib.util.find_spec("onnxruntime") is None:
        return  # set_backend says what is missing
    import onnxruntime

    available = onnxruntime.get_available_providers()
    if not any(name in available for name in names):
        printed = list(provider) if isinstance(provider, tuple) else provider
        raise DeviceError(
            f"provider {printed!r} asked for, but this onnxruntime build has none of {names} (available: "
            f"{available}); use provider='cpu', install onnxruntime-gpu with matching CUDA/cuDNN "
            "(pip install 'visreg_hub[onnx]'), or pass e.g. ['cuda', 'cpu'] to fall back to the CPU"
        )


def default_backend() -> str:
    """``$VISREG_HUB_BACKEND`` (``auto``, ``torch`` or ``onnx``) when set, else ``"auto"``."""
    value = os.environ.get(ENV_BACKEND, "").strip().lower() or "auto"
    if value not in REQUESTS:
        raise UserInputError(f"{ENV_BACKEND}={value!r} is not one of {REQUESTS}; unset it or fix it")
    return value


ONNX_PACKAGES = ("onnxruntime", "onnx", "onnxscript")


def onnx_available() -> bool:
    """ONNX Runtime and the exporter's packages are importable (``pip install 'visreg_hub[onnx-cpu]'``)."""
    return all(importlib.util.find_spec(name) is not None for name in ONNX_PACKAGES)


# models whose "auto" backend fell back to torch (an unusable ONNX export cache, or a failed export)
_CACHE_FALLBACKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def resolve_backend(model: nn.Module, spec: BackendSpec, device: str | torch.device | None = None) -> str:
    """``"torch"`` or ``"onnx"``: what ``spec`` means for ``model`` on ``device`` (None: its parameters')."""
    if spec.backend != "auto":
        return spec.backend
    if model in _CACHE_FALLBACKS:
        return "torch"
    parameter = next(model.parameters())
    target = resolve_device(device) if device is not None else parameter.device
    if parameter.dtype != torch.float32:  # the exporter needs float32 weights; bf16/fp16 models stay on torch
        return "torch"
    # why: on the CPU ONNX Runtime is 1.7x (batch 32) to 2.6x (batch 1) torch eager for ViT-S/16; on GPUs
    # torch (bf16, IOBinding-free) is faster than ORT's CUDA provider (docs/benchmarks.md)
    return "onnx" if target.type == "cpu" and onnx_available() else "torch"


def set_backend(
    model: nn.Module, backend: str = "auto", provider: str | None = None, precision: str = "fp32"
):
    """Record which backend ``encode()`` uses for ``model`` (what ``from_pretrained(backend=...)`` does).

    The choice is logged (INFO) and readable as ``model.backend``. Nothing is exported here: the ONNX
    graph is exported (or read from the on-disk cache) the first time the model embeds.
    """
    spec = make_spec(backend, provider, precision)
    if spec.backend == "onnx" and not onnx_available():  # now, not at the first encode() after an export
        from visreg_hub.inference.onnx.runtime import onnx_extra

        missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
        raise MissingExtraError(
            f"backend 'onnx' needs {', '.join(missing)}, not installed; install them with: "
            f"pip install 'visreg_hub[{onnx_extra()}]', or load the model with backend='torch'"
        )
    model.backend_spec = spec
    name = getattr(model.config, "name", None) or "model"
    chosen = resolve_backend(model, spec)
    why = (
        f" (backend={spec.backend!r} on {next(model.parameters()).device})" if spec.backend == "auto" else ""
    )
    extra = f", precision {spec.precision}" if chosen == "onnx" else ""
    logger.info("%s: encode() uses the %s backend%s%s", name, chosen, extra, why)
    return model


def spec_of(model: nn.Module) -> BackendSpec:
    """The model's :class:`BackendSpec` (torch when none was recorded, e.g. a model built in code)."""
    spec = getattr(model, "backend_spec", None)
    return spec if isinstance(spec, BackendSpec) else BackendSpec()


def backend_for(
    model: nn.Module,
    *,
    pooling: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    spec: BackendSpec | None = None,
) -> Backend:
    """The backend that embeds with ``model`` for these call arguments.

    Args:
        model: a :class:`~visreg_hub.models.VISRegEncoder`.
        pooling, device, dtype: as :func:`visreg_hub.inference.encode`.
        spec: override the model's recorded :class:`BackendSpec`.

    Returns:
        A :class:`TorchBackend`, or an ONNX Runtime backend (exported once per model, pooling, precision
        and provider, kept in memory for the model's lifetime and on disk across processes; redone when
        the weights change). With ``backend="auto"``, a cache dir that cannot be written or read, or an
        export that does not match PyTorch, means torch, with one warning per model.

    Raises:
        OnnxCacheError: ``backend="onnx"`` and the ONNX export cache dir cannot be written.
        OnnxValidationError: ``backend="onnx"`` and the export does not match PyTorch.
    """
    spec = spec or spec_of(model)
    resolved_dtype = resolve_dtype(dtype)
    if spec.backend == "auto" and resolved_dtype in (torch.float16, torch.bfloat16):
        spec = BackendSpec("torch")  # autocast dtypes are a torch feature; auto never refuses them
    if resolve_backend(model, spec, device) == "torch":
        return TorchBackend(model, pooling=pooling, device=device, dtype=dtype)
    from visreg_hub.inference.onnx.backend import onnx_backend_for
    from visreg_hub.inference.onnx.cache import OnnxCacheError
    from visreg_hub.inference.onnx.validate import OnnxValidationError

    try:
        return onnx_backend_for(model, spec, pooling=pooling, device=device, dtype=dtype)
    except (OnnxCacheError, OnnxValidationError) as exc:
        if spec.backend != "auto":  # ONNX was asked for by name: its error names the cause and the fix
            raise
        # why: "auto" is the default, so a user who never asked for ONNX must not lose encode() to an
        # unusable cache folder (a container's arbitrary UID, HOME=/nonexistent, a read-only home) or to
        # a graph that ONNX Runtime does not run as PyTorch does (and must not re-export it on every call)
        _CACHE_FALLBACKS[model] = True  # one warning per model, not one per call
        logger.warning("%s; backend='auto' falls back to the torch backend for this model", exc)
        return TorchBackend(model, pooling=pooling, device=device, dtype=dtype)
