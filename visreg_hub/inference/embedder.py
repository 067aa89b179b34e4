"""``encode()``: images in, one embedding per image out; dense patch features for visualisation.

Both run the one embedding loop, :class:`~visreg_hub.inference.pipeline.EmbeddingPipeline`, on the
model's backend (:mod:`visreg_hub.inference.backends`: torch, or ONNX Runtime when the model was loaded
with ``from_pretrained(..., backend="onnx")``). Per batch: decode + resize/crop to uint8 in DataLoader
workers (``num_workers > 0``) or in-process, pinned-memory copy to the device when it is a GPU,
normalisation with the checkpoint's mean/std on the device, then the model under
``torch.inference_mode`` (and ``torch.autocast`` when ``dtype`` asks for float16/bfloat16 on a float32
model). The model is put in eval mode, and moved to ``device`` if one is given, for the duration of
the call; both are restored afterwards.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from visreg_hub.errors import UserInputError, user_stacklevel
from visreg_hub.inference.backends import BACKENDS, TorchBackend, backend_for, make_spec
from visreg_hub.inference.images import DEFAULT_MAX_PIXELS
from visreg_hub.inference.inputs import is_single_image
from visreg_hub.inference.pipeline import EmbeddingPipeline, EncodeFailure, EncodeResult
from visreg_hub.inference.quantize import EMBEDDING_PRECISIONS, quantize_embeddings

logger = logging.getLogger(__name__)

__all__ = ["EncodeFailure", "EncodeResult", "encode", "extract_patch_features", "patch_pca_rgb"]


def encode(
    model: nn.Module,
    images: Any,
    *,
    batch_size: int = 64,
    pooling: str | None = None,
    normalize: bool | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    num_workers: int = 0,
    show_progress_bar: bool | None = None,
    convert_to_numpy: bool = False,
    convert_to_tensor: bool = False,
    normalize_embeddings: bool | None = None,
    precision: str = "float32",
    calibration_embeddings: np.ndarray | torch.Tensor | None = None,
    truncate_dim: int | None = None,
    on_error: str = "raise",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    backend: str | None = None,
    draft_decode: bool = False,
) -> torch.Tensor | np.ndarray | EncodeResult:
    """Embed images with a VISReg encoder (``model.encode`` calls this); sentence-transformers' arguments.

    Args:
        model: a :class:`~visreg_hub.models.VISRegEncoder` (anything with ``data_config``,
            ``embedding_dim(pooling)`` and ``forward(images, pooling=...)``).
        images: one input or a list of them, mixed freely: file paths (``str``/``Path``), folders
            (searched recursively, sorted), encoded ``bytes``, binary file objects (``open(path, "rb")``,
            ``io.BytesIO``: one image each), PIL images, numpy arrays (H, W[, C]) ``uint8``
            or float in [0, 1], tensors (C, H, W) ``uint8`` or float in [0, 1], and 4-D batches of
            either. Every input is decoded to RGB and preprocessed with the checkpoint's data config
            (float arrays/tensors are quantised to 8 bit first, like a saved file); already normalised
            batches are refused: pass them to ``model(batch)`` instead. Decoding rules (EXIF, alpha,
            16-bit, first frame of animations, ...) are in :mod:`visreg_hub.inference.images`.
            A single image (not in a list; not a folder or a 4-D batch) gives a 1-D vector.
        batch_size: images per forward pass; does not change the result beyond float rounding.
        pooling: feature tap (``cls``, ``cls_last2``, ``cls_last4``, ``mean_patch``); None: the
            checkpoint's default. The embedding width is ``model.embedding_dim(pooling)``.
        normalize: L2-normalise each embedding (cosine similarity becomes a dot product); default True.
        device: where the model runs; None: where its parameters are. If different, the model is
            moved there for this call and moved back afterwards (move it once yourself for many calls).
        dtype: ``"bf16"``/``torch.bfloat16`` or ``"fp16"``/``torch.float16`` run a float32 model under
            autocast (meant for GPUs; CPU autocast works but is slow); None or float32: the model's own dtype.
        num_workers: DataLoader worker processes for decoding; 0 decodes in this process. With a GPU,
            batches are pinned and copied asynchronously.
        show_progress_bar: None shows it only when stderr is a terminal.
        convert_to_numpy: return a numpy array instead of a CPU tensor.
        convert_to_tensor: return a tensor (the default here; wins over ``convert_to_numpy``, as in
            sentence-transformers).
        normalize_embeddings: sentence-transformers' name for ``normalize`` (give one of the two).
        precision: ``"float32"`` (default), or quantised embeddings: ``"int8"``, ``"uint8"`` (one byte
            per dimension), ``"binary"``, ``"ubinary"`` (one bit per dimension, packed: E / 8 bytes).
            Rules: :mod:`visreg_hub.inference.quantize` (sentence-transformers' ``quantize_embeddings``).
        calibration_embeddings: (M, E) float embeddings whose per-dimension min/max give the int8/uint8
            ranges; None: the min/max of this call's own embeddings (so codes depend on the batch).
        truncate_dim: keep the first ``truncate_dim`` dimensions, before normalising (Matryoshka style;
            VISReg models are not trained for it, so expect a quality loss; measure it).
        on_error: ``"raise"`` stops at the first bad item with :class:`ImageDecodeError` naming it and
            the reason; ``"skip"`` embeds the others and returns an :class:`EncodeResult` (always 2-D).
        max_pixels: decompression-bomb cap per image (width * height); None disables it.
        backend: deprecated; choose the backend when loading instead:
            ``from_pretrained(name, backend="onnx")`` (or ``visreg_hub.inference.backends.set_backend``).
            ``"torch"`` / ``"onnx"`` still override the model's backend for this call, with a
            DeprecationWarning. None: the model's backend (torch for a model built in code).
        draft_decode: decode JPEGs much larger than the model's input at 1/2, 1/4 or 1/8 scale (libjpeg's
            DCT scaling, as Pillow's ``thumbnail``), keeping at least twice the resized side: faster on
            camera photos, embeddings within a small distance of a full decode (docs/benchmarks.md
            measures both), not bit-identical to timm's transform. Other images decode exactly as without
            it. Default False.

    Returns:
        With ``on_error="raise"``: (N, E) embeddings on the CPU in input order (N after expanding
        folders and batches; (0, E) for an empty input; (E,) for a single image), float32 or the
        ``precision``'s dtype and width. With ``"skip"``: ``EncodeResult(embeddings, failures)``.

    Raises:
        ImageDecodeError: an item could not be decoded and ``on_error="raise"``.
        ValueError: an argument is invalid (the message says which and how to fix it).
    """
    if normalize_embeddings is not None and not isinstance(normalize_embeddings, bool | np.bool_):
        raise UserInputError(f"normalize_embeddings must be True or False, got {normalize_embeddings!r}")
    if normalize is not None and normalize_embeddings is not None and normalize != normalize_embeddings:
        raise UserInputError("normalize and normalize_embeddings disagree; pass only one of them")
    normalize = next((v for v in (normalize, normalize_embeddings) if v is not None), True)
    if precision not in EMBEDDING_PRECISIONS:
        raise UserInputError(f"precision must be one of {EMBEDDING_PRECISIONS}, got {precision!r}")
    spec = None
    if backend is not None:
        warnings.warn(
            "encode(backend=...) is deprecated; choose the backend when loading: "
            "from_pretrained(name, backend='onnx'), or "
            "visreg_hub.inference.backends.set_backend(model, 'onnx')",
            DeprecationWarning,
            stacklevel=user_stacklevel(),  # model.encode() wraps this: point at the user's line
        )
        if backend not in BACKENDS:
            raise UserInputError(f"backend must be 'torch' or 'onnx', got {backend!r}")
        spec = make_spec(backend)
    runner = backend_for(model, pooling=pooling, device=device, dtype=dtype, spec=spec)
    pipeline = EmbeddingPipeline(
        runner,
        normalize=normalize,
        max_pixels=max_pixels,
        truncate_dim=truncate_dim,
        draft_decode=draft_decode,
    )
    result, failures = pipeline.run(
        images, batch_size=batch_size, num_workers=num_workers, on_error=on_error,
        show_progress_bar=show_progress_bar, desc="encode" if runner.name == "torch" else "encode (onnx)",
    )  # fmt: skip
    if precision != "float32":
        result = torch.from_numpy(
            quantize_embeddings(result.numpy(), precision, calibration_embeddings=calibration_embeddings)
        )
    if on_error == "raise" and is_single_image(images):
        result = result[0]
    embeddings = result.numpy() if convert_to_numpy and not convert_to_tensor else result
    return EncodeResult(embeddings, failures) if on_error == "skip" else embeddings


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
    draft_decode: bool = False,
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
            max_pixels, draft_decode: see :func:`encode`.

    Returns:
        (N, h, w, D) float32 grids with h = H / patch_size, w = W / patch_size, or an
        :class:`EncodeResult` with ``on_error="skip"``.
    """
    runner = TorchBackend(model, device=device, dtype=dtype, output="patch_tokens")
    pipeline = EmbeddingPipeline(
        runner, normalize=normalize, max_pixels=max_pixels, draft_decode=draft_decode
    )
    result, failures = pipeline.run(
        images, batch_size=batch_size, num_workers=num_workers, on_error=on_error,
        show_progress_bar=show_progress_bar, desc="patch features",
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
        raise UserInputError(f"patch_grid must be a non-empty (h, w, D) grid, got shape {tuple(grid.shape)}")
    height, width, dim = grid.shape
    tokens = grid.detach().cpu().to(torch.float64).reshape(height * width, dim)
    if not torch.isfinite(tokens).all():
        raise UserInputError("patch_grid contains NaN or infinite values")
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
