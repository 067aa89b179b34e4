"""Cosine similarity between two batches of embeddings (sentence-transformers' ``model.similarity``)."""

from __future__ import annotations

import numpy as np
import torch

from visreg_hub.errors import UserInputError


def _as_rows(embeddings: np.ndarray | torch.Tensor | list, name: str) -> torch.Tensor:
    """(E,) or (N, E) numpy / tensor / nested list -> (N, E) float32 tensor on the CPU (or its device)."""
    values = torch.as_tensor(embeddings)
    if not values.is_floating_point():
        raise UserInputError(
            f"{name} must hold float embeddings, got {values.dtype} (quantised codes from "
            "encode(precision=...) are compared with Hamming or dot-product search, not cosine)"
        )
    if values.ndim == 1:
        values = values.unsqueeze(0)
    if values.ndim != 2:
        raise UserInputError(f"{name} must be (E,) or (N, E), got shape {tuple(values.shape)}")
    return values.float()


def cos_sim(a: np.ndarray | torch.Tensor | list, b: np.ndarray | torch.Tensor | list) -> torch.Tensor:
    """Cosine similarity of every row of ``a`` with every row of ``b``.

    Shape:
        a: (N, E) or (E,); b: (M, E) or (E,) -> (N, M) float32 (a 1-D input counts as one row).

    Normalised embeddings (``encode()``'s default) give the same values as ``a @ b.T``; unnormalised
    ones are normalised here, so the result is always a cosine.
    """
    left, right = _as_rows(a, "embeddings1"), _as_rows(b, "embeddings2")
    if left.shape[1] != right.shape[1]:
        raise UserInputError(
            f"embeddings of different lengths ({left.shape[1]} and {right.shape[1]}): compare vectors of "
            "one model and one pooling"
        )
    right = right.to(left.device)
    return torch.nn.functional.normalize(left, dim=1) @ torch.nn.functional.normalize(right, dim=1).T
