"""Validation of user arrays shared by the index, the metrics and the embedding files."""

from __future__ import annotations

from typing import Any

import numpy as np

from visreg_hub.errors import UserInputError

_FLOAT64_BLOCK = 8192  # rows per float64 block (l2_normalize, the norm check): about one float32 copy


def as_float32_matrix(array: Any, *, name: str, dim: int | None = None, first_row: int = 0) -> np.ndarray:
    """Validate user vectors and return a C-contiguous float32 (N, D) array.

    Args:
        array: (N, D) or (D,) floating array; a numpy array, a torch tensor or a nested list.
        name: the argument name used in error messages.
        dim: expected D, or None to accept any.
        first_row: the number of ``array``'s first row in messages (a block read from a larger file).

    Raises:
        ValueError: non-floating dtype, wrong rank, wrong dimension, or NaN/inf values.
    """
    if hasattr(array, "detach") and hasattr(array, "cpu"):  # torch tensor without importing torch
        array = array.detach().cpu()
        if str(array.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            array = array.float()
        array = array.numpy()
    try:
        array = np.asarray(array)
    except ValueError:  # rows of different lengths ("inhomogeneous shape")
        raise UserInputError(
            f"{name} must be (N, D) or (D,) numbers: its rows have different lengths"
        ) from None
    if not np.issubdtype(array.dtype, np.floating):
        raise UserInputError(
            f"{name} must be a floating-point array, got dtype {array.dtype}; "
            f"convert it with .astype(np.float32) if the values really are embeddings"
        )
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2:
        raise UserInputError(f"{name} must have shape (N, D) or (D,), got shape {tuple(array.shape)}")
    if dim is not None and array.shape[1] != dim:
        raise UserInputError(
            f"{name} has dimension {array.shape[1]} but the index holds {dim}-dimensional vectors; "
            f"use embeddings from the same model (and pooling) the index was built with"
        )
    if array.dtype.itemsize > 4:  # float64: a finite value beyond float32's range would become inf
        with np.errstate(invalid="ignore"):
            too_big = np.isfinite(array) & (np.abs(array) > np.finfo(np.float32).max)
        if too_big.any():
            row = first_row + int(np.flatnonzero(too_big.any(axis=1))[0])
            raise UserInputError(
                f"{name} has values beyond float32's range (|x| > 3.4e38), first at row {row}; "
                f"the index stores float32: rescale those rows (e.g. normalise them)"
            )
    array = np.ascontiguousarray(array, dtype=np.float32)
    finite = np.isfinite(array).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise UserInputError(
            f"{name} contains NaN or infinite values in {bad.size} row(s), first at row "
            f"{first_row + int(bad[0])}; drop or re-encode those rows"
        )
    _check_norms(array, name, first_row)
    return array


# why: FAISS computes distances and inner products in float32; below this squared norm every squared L2
# distance (<= 2|a|^2 + 2|b|^2) and inner product (<= |a||b|) of two rows is finite, so no score is inf
MAX_SQUARED_NORM = float(np.finfo(np.float32).max) / 4


def _check_norms(array: np.ndarray, name: str, first_row: int = 0) -> None:
    """Refuse (N, D) rows too long for finite float32 scores (norm over about 9.2e18), a block at a time."""
    for start in range(0, array.shape[0], _FLOAT64_BLOCK):
        block = array[start : start + _FLOAT64_BLOCK].astype(np.float64)
        squared = np.einsum("ij,ij->i", block, block)
        if (squared > MAX_SQUARED_NORM).any():
            row = first_row + start + int(np.flatnonzero(squared > MAX_SQUARED_NORM)[0])
            raise UserInputError(
                f"{name} has a row of norm {np.sqrt(squared.max()):.3g} (first at row {row}), too long for "
                f"finite float32 distances (at most {np.sqrt(MAX_SQUARED_NORM):.3g}); rescale those rows "
                "(e.g. normalise them)"
            )


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """float32 (N, D) rows scaled to unit L2 norm.

    Rows are normalised in float64, a block at a time (memory stays at about one float32 copy): in
    float32 the squares of a row like ``[1e-30] * D`` underflow to a norm of 0, or to a wrong tiny one,
    although the row has a direction. Only an all-zero row has none.

    Raises:
        ValueError: a row is all zeros (the message names the first).
    """
    out = np.empty(x.shape, dtype=np.float32)
    for start in range(0, x.shape[0], _FLOAT64_BLOCK):
        block = x[start : start + _FLOAT64_BLOCK].astype(np.float64)
        norms = np.linalg.norm(block, axis=1, keepdims=True)
        if (norms == 0).any():
            row = start + int(np.flatnonzero(norms[:, 0] == 0)[0])
            raise UserInputError(
                f"cannot L2-normalise a zero vector (row {row}); remove it or use normalize=False"
            )
        out[start : start + _FLOAT64_BLOCK] = block / norms
    return out
