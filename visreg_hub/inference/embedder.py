"""``encode()``: images in, one embedding per image out; dense patch features for visualisation.

Pipeline per batch: decode + resize/crop to uint8 in DataLoader workers (``num_workers > 0``) or
in-process, pinned-memory copy to the device when it is a GPU, normalisation with the checkpoint's
mean/std on the device, then the model under ``torch.inference_mode`` (and ``torch.autocast`` when
``dtype`` asks for float16/bfloat16 on a float32 model). The model is put in eval mode, and moved to
``device`` if one is given, for the duration of the call; both are restored afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from visreg_hub.errors import ImageDecodeError
from visreg_hub.inference.images import DEFAULT_MAX_PIXELS, expand_inputs
from visreg_hub.inference.preprocess import Collate, ImageDataset, Preprocessor

logger = logging.getLogger(__name__)

ON_ERROR = ("raise", "skip")
_FLUSH_BYTES = 64 * 2**20
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}  # fmt: skip


class EncodeFailure(NamedTuple):
    """An item that could not be embedded.

    Attributes:
        index: position in the expanded input list (see :func:`~visreg_hub.inference.images.expand_inputs`;
            the input position when no folder or 4-D batch was given).
        reason: the item's label (path or ``item K``) and what went wrong.
    """

    index: int
    reason: str


class EncodeResult(NamedTuple):
    """Return value of ``encode(..., on_error="skip")`` (and of ``extract_patch_features``).

    Attributes:
        embeddings: the good items' outputs, in input order: (N_good, E) for ``encode``,
            (N_good, h, w, D) for ``extract_patch_features``; a tensor, or a numpy array with
            ``convert_to_numpy=True``.
        failures: one :class:`EncodeFailure` per bad item, in input order.
    """

    embeddings: torch.Tensor | np.ndarray
    failures: list[EncodeFailure]


def encode(
    model: nn.Module,
    images: Any,
    *,
    batch_size: int = 64,
    pooling: str | None = None,
    normalize: bool = True,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    num_workers: int = 0,
    show_progress_bar: bool | None = None,
    convert_to_numpy: bool = False,
    on_error: str = "raise",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    backend: str = "torch",
) -> torch.Tensor | np.ndarray | EncodeResult:
    """Embed images with a VISReg encoder (``model.encode`` calls this).

    Args:
        model: a :class:`~visreg_hub.models.VISRegEncoder` (anything with ``data_config``,
            ``embedding_dim(pooling)`` and ``forward(images, pooling=...)``).
        images: one input or a list of them, mixed freely: file paths (``str``/``Path``), folders
            (searched recursively, sorted), encoded ``bytes``, PIL images, numpy arrays (H, W[, C]) ``uint8``
            or float in [0, 1], tensors (C, H, W) ``uint8`` or float in [0, 1], and 4-D batches of
            either. Every input is decoded to RGB and preprocessed with the checkpoint's data config
            (float arrays/tensors are quantised to 8 bit first, like a saved file); already normalised
            batches are refused: pass them to ``model(batch)`` instead. Decoding rules (EXIF, alpha,
            16-bit, first frame of animations, ...) are in :mod:`visreg_hub.inference.images`.
        batch_size: images per forward pass; does not change the result beyond float rounding.
        pooling: feature tap (``cls``, ``cls_last2``, ``cls_last4``, ``mean_patch``); None: the
            checkpoint's default. The embedding width is ``model.embedding_dim(pooling)``.
        normalize: L2-normalise each embedding (cosine similarity becomes a dot product).
        device: where the model runs; None: where its parameters are. If different, the model is
            moved there for this call and moved back afterwards (move it once yourself for many calls).
        dtype: ``"bf16"``/``torch.bfloat16`` or ``"fp16"``/``torch.float16`` run a float32 model under
            autocast (meant for GPUs; CPU autocast works but is slow); None or float32: the model's own dtype.
        num_workers: DataLoader worker processes for decoding; 0 decodes in this process. With a GPU,
            batches are pinned and copied asynchronously.
        show_progress_bar: None shows it only when stderr is a terminal.
        convert_to_numpy: return a ``np.float32`` array instead of a CPU float32 tensor.
        on_error: ``"raise"`` stops at the first bad item with :class:`ImageDecodeError` naming it and
            the reason; ``"skip"`` embeds the others and returns an :class:`EncodeResult`.
        max_pixels: decompression-bomb cap per image (width * height); None disables it.
        backend: ``"torch"`` runs the model itself; ``"onnx"`` exports it once (cached per model,
            pooling, precision and device) and runs it with ONNX Runtime (``pip install
            'visreg_hub[onnx]'``), same decoding, preprocessing and return contract.

    Returns:
        With ``on_error="raise"``: (N, E) float32 embeddings on the CPU, in input order (N after
        expanding folders and batches; (0, E) for an empty input). With ``"skip"``:
        ``EncodeResult(embeddings, failures)``.

    Raises:
        ImageDecodeError: an item could not be decoded and ``on_error="raise"``.
        ValueError: an argument is invalid (the message says which and how to fix it).
    """
    if backend == "onnx":
        from visreg_hub.inference.onnx import encode_onnx

        return encode_onnx(
            model, images, batch_size=batch_size, pooling=pooling, normalize=normalize, device=device,
            dtype=dtype, num_workers=num_workers, show_progress_bar=show_progress_bar,
            convert_to_numpy=convert_to_numpy, on_error=on_error, max_pixels=max_pixels,
        )  # fmt: skip
    if backend != "torch":
        raise ValueError(f"backend must be 'torch' or 'onnx', got {backend!r}")
    embedding_dim = model.embedding_dim(pooling)  # validates pooling before any decoding

    def forward(batch: torch.Tensor) -> torch.Tensor:
        embeddings = model(batch, pooling=pooling).float()
        return nn.functional.normalize(embeddings, dim=-1) if normalize else embeddings

    return _run(
        model, images, forward, (embedding_dim,), batch_size=batch_size, device=device, dtype=dtype,
        num_workers=num_workers, show_progress_bar=show_progress_bar, convert_to_numpy=convert_to_numpy,
        on_error=on_error, max_pixels=max_pixels, desc="encode",
    )  # fmt: skip


def extract_patch_features(
    model: nn.Module,
    images: Any,
    *,
    batch_size: int = 32,
    normalize: bool = False,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    num_workers: int = 0,
    show_progress_bar: bool | None = None,
    convert_to_numpy: bool = False,
    on_error: str = "raise",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> torch.Tensor | np.ndarray | EncodeResult:
    """Patch-token grids (after the final LayerNorm) for dense tasks and PCA visualisation.

    Same inputs, preprocessing and arguments as :func:`encode`; each image gives
    ``model.patch_tokens(batch)``. For all tokens (CLS, registers, patches) of a preprocessed
    batch, call ``model.forward_features(batch)``; ``Preprocessor(model.data_config).preprocess(img)``
    builds such a batch item from a decoded image.

    Args:
        model: a :class:`~visreg_hub.models.VISRegEncoder` (needs ``patch_tokens`` and ``config``).
        images: see :func:`encode`.
        normalize: L2-normalise each patch token.
        batch_size, device, dtype, num_workers, show_progress_bar, convert_to_numpy, on_error,
            max_pixels: see :func:`encode`.

    Returns:
        (N, h, w, D) float32 grids with h = H / patch_size, w = W / patch_size, or an
        :class:`EncodeResult` with ``on_error="skip"``.
    """
    _, height, width = Preprocessor(model.data_config).output_shape
    patch = model.config.patch_size
    grid_shape = (height // patch, width // patch, model.config.embed_dim)

    def forward(batch: torch.Tensor) -> torch.Tensor:
        tokens = model.patch_tokens(batch).float()
        return nn.functional.normalize(tokens, dim=-1) if normalize else tokens

    return _run(
        model, images, forward, grid_shape, batch_size=batch_size, device=device, dtype=dtype,
        num_workers=num_workers, show_progress_bar=show_progress_bar, convert_to_numpy=convert_to_numpy,
        on_error=on_error, max_pixels=max_pixels, desc="patch features",
    )  # fmt: skip


def _check_args(batch_size: Any, num_workers: Any, on_error: Any) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an integer >= 0, got {num_workers!r}")
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype in _DTYPES.values()):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(
        f"dtype must be None, float32, float16 or bfloat16 (or 'fp32', 'fp16', 'bf16'), got {dtype!r}"
    )


def _worker_init(_worker_id: int) -> None:
    # why: PIL decoding is single-threaded; intra-op torch threads per worker would oversubscribe cores
    torch.set_num_threads(1)


@contextlib.contextmanager
def _inference_state(model: nn.Module, device: torch.device):
    """Eval mode and ``device`` for the duration; every module's training flag and the device restored."""
    flags = [(module, module.training) for module in model.modules()]
    original_device = next(model.parameters()).device
    moved = original_device != device
    if moved:
        logger.info("moving the model from %s to %s for this call", original_device, device)
        model.to(device)
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training
        if moved:
            model.to(original_device)


def _run(
    model: nn.Module,
    images: Any,
    forward: Callable[[torch.Tensor], torch.Tensor],
    item_shape: tuple[int, ...],
    *,
    batch_size: int,
    device: str | torch.device | None,
    dtype: str | torch.dtype | None,
    num_workers: int,
    show_progress_bar: bool | None,
    convert_to_numpy: bool,
    on_error: str,
    max_pixels: int | None,
    desc: str,
) -> torch.Tensor | np.ndarray | EncodeResult:
    """Shared batching loop: decode, preprocess, ``forward`` (B, C, H, W) -> (B, *item_shape), collect."""
    _check_args(batch_size, num_workers, on_error)
    amp_dtype = _resolve_dtype(dtype)
    param_dtype = next(model.parameters()).dtype
    target = torch.device(device) if device is not None else next(model.parameters()).device
    if target.type == "cuda" and target.index is None:  # "cuda" means the current device, as in .to()
        target = torch.device("cuda", torch.cuda.current_device())
    if amp_dtype == torch.float32 and param_dtype != torch.float32:
        raise ValueError(
            f"dtype=float32 was asked but the model's parameters are {param_dtype}; call model.float() first"
        )
    use_autocast = amp_dtype in (torch.float16, torch.bfloat16) and param_dtype == torch.float32
    if amp_dtype in (torch.float16, torch.bfloat16) and target.type == "cpu":
        logger.info("autocast to %s on the CPU is slow; dtype is meant for GPUs", amp_dtype)

    preprocessor = Preprocessor(model.data_config)
    sources = expand_inputs(images)
    loader = torch.utils.data.DataLoader(
        ImageDataset(sources, preprocessor, max_pixels),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=Collate(preprocessor.output_shape),
        pin_memory=target.type == "cuda",
        worker_init_fn=_worker_init if num_workers > 0 else None,
    )
    if show_progress_bar is None:
        show_progress_bar = sys.stderr.isatty()

    failures: list[EncodeFailure] = []
    outputs: list[torch.Tensor] = []  # on the CPU
    pending: list[torch.Tensor] = []  # on the device, not yet copied back

    def flush() -> None:
        if pending:
            outputs.append(torch.cat(pending).cpu())
            pending.clear()

    with (
        _inference_state(model, target),
        torch.inference_mode(),
        tqdm(total=len(sources), desc=desc, unit="img", disable=not show_progress_bar) as progress,
    ):
        autocast = torch.autocast(target.type, dtype=amp_dtype, enabled=use_autocast)
        for batch in loader:
            if batch.failures and on_error == "raise":
                index, reason = batch.failures[0]
                hint = f"(input index {index}; pass on_error='skip' to embed the others)"
                raise ImageDecodeError(f"{reason} {hint}")
            failures.extend(EncodeFailure(index, reason) for index, reason in batch.failures)
            if len(batch.indices):
                pixels = batch.pixels.to(target, non_blocking=True)
                inputs = preprocessor.normalize(pixels, dtype=param_dtype)
                with autocast:
                    pending.append(forward(inputs).float())
                # why: copying every batch back would make the host wait for the device each batch
                # and stall kernel launches; a few dozen MiB of results per copy keeps the queue full
                if sum(t.numel() for t in pending) * 4 >= _FLUSH_BYTES or target.type == "cpu":
                    flush()
            progress.update(len(batch.indices) + len(batch.failures))
        flush()
    result = torch.cat(outputs) if outputs else torch.empty((0, *item_shape), dtype=torch.float32)
    if failures:
        logger.warning(
            "%d of %d images could not be decoded and were skipped; first: %s",
            len(failures), len(sources), failures[0].reason,
        )  # fmt: skip
    embeddings = result.numpy() if convert_to_numpy else result
    return EncodeResult(embeddings, failures) if on_error == "skip" else embeddings


def patch_pca_rgb(patch_grid: torch.Tensor | np.ndarray) -> np.ndarray:
    """Colour a patch-token grid by its first three principal components (the DINO-style picture).

    The tokens are centred, their top-3 principal directions found by SVD (float64), each token
    projected on them, and each component min-max scaled to [0, 255] as the R, G, B channel. Each
    component's sign is fixed so that its largest-magnitude projection is positive (sklearn's
    ``svd_flip`` convention), so the colours are deterministic. With fewer than 3 non-trivial
    components the remaining channels are 0.

    Args:
        patch_grid: (h, w, D) tokens of one image, e.g. ``extract_patch_features(model, img)[0]``.

    Returns:
        (h, w, 3) ``uint8`` image (upsample it to the input size for display).

    Raises:
        ValueError: ``patch_grid`` is not 3-D, is empty, or has non-finite values.
    """
    grid = torch.as_tensor(np.asarray(patch_grid) if not isinstance(patch_grid, torch.Tensor) else patch_grid)
    if grid.ndim != 3 or 0 in grid.shape:
        raise ValueError(f"patch_grid must be a non-empty (h, w, D) grid, got shape {tuple(grid.shape)}")
    height, width, dim = grid.shape
    tokens = grid.detach().cpu().to(torch.float64).reshape(height * width, dim)
    if not torch.isfinite(tokens).all():
        raise ValueError("patch_grid contains NaN or infinite values")
    centred = tokens - tokens.mean(dim=0, keepdim=True)
    left, singular, _ = torch.linalg.svd(centred, full_matrices=False)
    num = min(3, singular.numel())
    scores = left[:, :num] * singular[:num]  # projections on the principal directions
    signs = torch.sign(scores[scores.abs().argmax(dim=0), torch.arange(num)])
    scores = scores * torch.where(signs == 0, 1.0, signs)
    rgb = torch.zeros(height * width, 3, dtype=torch.float64)
    low, high = scores.min(dim=0).values, scores.max(dim=0).values
    span = high - low
    # tiny spans are numerical noise of an absent component: leave that channel at 0
    live = span > 1e-12 * max(float(singular[0]) if singular.numel() else 0.0, 1e-300)
    rgb[:, :num] = torch.where(live, (scores - low) / torch.where(live, span, 1.0) * 255.0, 0.0)
    return rgb.round().clamp(0, 255).to(torch.uint8).reshape(height, width, 3).numpy()
