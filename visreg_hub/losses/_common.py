"""Argument checks and small helpers shared by the loss modules."""

from __future__ import annotations

import math

import torch


def check_weight(name: str, value: float, *, upper: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < 0 or (upper is not None and value > upper):
        bound = f"in [0, {upper}]" if upper is not None else ">= 0"
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    return float(value)


def check_views(global_proj: torch.Tensor, local_proj: torch.Tensor | None) -> None:
    if not isinstance(global_proj, torch.Tensor) or global_proj.dim() != 3:
        shape = tuple(global_proj.shape) if isinstance(global_proj, torch.Tensor) else type(global_proj)
        raise ValueError(f"global_proj must be a (V, N, D) tensor, got {shape}")
    if global_proj.shape[0] < 1 or global_proj.shape[1] < 2:
        raise ValueError(f"global_proj needs V >= 1 views and N >= 2 samples, got {tuple(global_proj.shape)}")
    if local_proj is not None and (local_proj.dim() != 3 or local_proj.shape[1:] != global_proj.shape[1:]):
        raise ValueError(
            f"local_proj must be (V_local, N, D) = (V_local, {global_proj.shape[1]}, {global_proj.shape[2]}) "
            f"to match global_proj, got {tuple(local_proj.shape)}"
        )


def all_views(global_proj: torch.Tensor, local_proj: torch.Tensor | None) -> torch.Tensor:
    if local_proj is None:
        return global_proj
    return torch.cat([global_proj, local_proj.to(global_proj.dtype)])


def report(local: torch.Tensor, reported: torch.Tensor) -> torch.Tensor:
    """Value ``reported``, gradient of ``local`` (the per-rank share of a cross-rank quantity)."""
    return local + (reported.to(local.dtype) - local).detach()
