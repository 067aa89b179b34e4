"""Embedding quantisation with sentence-transformers' rules (``encode(..., precision=...)``).

This shrinks stored embeddings (4x for int8/uint8, 32x for binary); it is not model quantisation (for
that, see ``from_pretrained(..., backend="onnx", precision="int8")``). The rules are those of
``sentence_transformers.quantization.quantize_embeddings``:

* ``"float32"``: unchanged, as float32.
* ``"uint8"`` / ``"int8"``: per dimension d, ``start_d = min_d``, ``step_d = (max_d - min_d) / 255``
  (1 where the range is empty); ``uint8 = clip(floor((x - start) / step), 0, 255)`` and
  ``int8 = uint8 - 128``, in float32 as sentence-transformers (>= 6) computes them, so codes made here
  and there from the same embeddings and ranges are equal and can share an index. The calibration rule:
  ``ranges`` (a (2, E) array of per-dimension minimum and maximum) if given, else the minimum and maximum
  of ``calibration_embeddings`` if given, else of the embeddings being quantised (the batch itself: then
  the result depends on what else is in the batch, and a single embedding has no range; pass calibration
  embeddings for stable codes).
* ``"ubinary"``: ``numpy.packbits(x > 0)`` per row, uint8 (E / 8 bytes, zero-padded to a whole byte).
* ``"binary"``: the same bits as int8: ``packbits(x > 0) - 128``.

Where this differs from sentence-transformers, on purpose: int8/uint8 codes of a single embedding
without ``ranges`` or calibration warn and give the lowest code (sentence-transformers raises), so that
``encode()`` of one image never fails after the model has run.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import torch

from visreg_hub.errors import UserInputError, user_stacklevel

logger = logging.getLogger(__name__)

EMBEDDING_PRECISIONS = ("float32", "int8", "uint8", "binary", "ubinary")


def quantization_ranges(
    embeddings: np.ndarray, calibration_embeddings: np.ndarray | torch.Tensor | None = None
) -> np.ndarray:
    """The (2, E) per-dimension [min; max] used by int8/uint8: from the calibration set, else the batch.

    Args:
        embeddings: (N, E) float embeddings being quantised (used when there is no calibration set).
        calibration_embeddings: (M, E) float embeddings representative of the corpus, or None.
    """
    source = (
        embeddings
        if calibration_embeddings is None
        else _as_float_array(calibration_embeddings, "calibration_embeddings")
    )
    if not np.isfinite(source).all():
        what = "the embeddings" if calibration_embeddings is None else "calibration_embeddings"
        raise UserInputError(f"{what} contain NaN or infinite values; int8/uint8 ranges need finite ones")
    if source.ndim != 2 or source.shape[1] != embeddings.shape[1] or len(source) == 0:
        raise UserInputError(
            f"calibration_embeddings must be a non-empty (M, {embeddings.shape[1]}) array, got shape "
            f"{tuple(source.shape)}"
        )
    if calibration_embeddings is None and len(source) < 100:
        logger.info(
            "int8/uint8 ranges come from the %d embedding(s) of this call; pass calibration_embeddings "
            "(or ranges) for codes that do not depend on the batch",
            len(source),
        )
    return np.stack([source.min(axis=0), source.max(axis=0)]).astype(np.float32)


def quantize_embeddings(
    embeddings: np.ndarray | torch.Tensor,
    precision: str,
    *,
    ranges: np.ndarray | None = None,
    calibration_embeddings: np.ndarray | torch.Tensor | None = None,
) -> np.ndarray:
    """Quantise (N, E) float embeddings to ``precision`` (rules in the module docstring).

    Args:
        embeddings: (N, E) float embeddings (normalised or not, as they will be compared).
        precision: ``"float32"``, ``"int8"``, ``"uint8"``, ``"binary"`` or ``"ubinary"``.
        ranges: (2, E) per-dimension minimum and maximum for int8/uint8.
        calibration_embeddings: (M, E) embeddings whose per-dimension min/max give the ranges when
            ``ranges`` is None; None: the ranges of ``embeddings`` itself.

    Returns:
        float32 (N, E), int8 / uint8 (N, E), or int8 / uint8 (N, ceil(E / 8)) for binary / ubinary.
    """
    if precision not in EMBEDDING_PRECISIONS:
        raise UserInputError(f"precision must be one of {EMBEDDING_PRECISIONS}, got {precision!r}")
    values = _as_float_array(embeddings, "embeddings")
    if values.ndim != 2:
        raise UserInputError(f"embeddings must be (N, E), got shape {tuple(values.shape)}")
    if precision == "float32":
        return values.astype(np.float32)
    if precision in ("binary", "ubinary"):
        bits = np.packbits(values > 0, axis=-1)
        return bits if precision == "ubinary" else (bits.astype(np.int16) - 128).astype(np.int8)
    if ranges is None and calibration_embeddings is None and len(values) == 0:
        # nothing to quantise and nothing to take ranges from (an empty call, or every image failed)
        return np.empty(values.shape, dtype=np.uint8 if precision == "uint8" else np.int8)
    if ranges is None:
        if calibration_embeddings is None and len(values) < 2:
            warnings.warn(
                f"{precision} codes of {len(values)} embedding without calibration_embeddings: a range taken "
                "from one vector is empty, so every code is the lowest; pass calibration_embeddings (or "
                "ranges) from a representative set",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
        ranges = quantization_ranges(values, calibration_embeddings)
    ranges = np.asarray(ranges, dtype=np.float32)  # float32 steps, as sentence-transformers: equal codes
    if ranges.shape != (2, values.shape[1]):
        raise UserInputError(f"ranges must have shape (2, {values.shape[1]}), got {ranges.shape}")
    starts = ranges[0]
    steps = (ranges[1] - starts) / np.float32(255)
    steps = np.where(steps == 0, np.float32(1), steps)
    levels = np.clip(np.floor((values - starts) / steps), 0, 255)  # uniform buckets; outside: the ends
    if precision == "uint8":
        return levels.astype(np.uint8)
    return (levels - 128).astype(np.int8)


def _as_float_array(values: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    array = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    if not np.issubdtype(array.dtype, np.floating):
        raise UserInputError(f"{name} must be floating point, got {array.dtype}")
    return array
