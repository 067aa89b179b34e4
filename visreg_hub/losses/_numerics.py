"""Helpers shared by every loss file: dtypes, autocast, quantiles, argument checks, view stacking.

One home for what the terms have in common, so the term files import from here instead of from each
other's private names. Nothing here is public API.
"""

from __future__ import annotations

import contextlib
import functools
import math

import numpy as np
import torch

from visreg_hub.errors import UserInputError

#: Elements of one block of float32 temporaries in every loss term (16 MiB; int64 sort indices get half
#: that many elements). glibc's malloc serves blocks under 32 MiB from its heap and reuses them; a larger
#: one is a fresh ``mmap`` whose pages fault on first touch, measured on the CPU at 10x the cost of filling
#: a reused block of the same size (a fresh 64 MiB tensor: 28 ms, the reused one: 2.4 ms). SIGReg's
#: fwd+bwd at V4 N2048 D512 K2048 took 3.8-3.9 s of CPU with 64 MiB blocks and 2.1-2.4 s with these.
TEMPORARY_ELEMENTS = 1 << 22

_QUANTILE_CACHE: dict[tuple[int, str, torch.dtype], torch.Tensor] = {}


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, else float32: the dtype statistics and sums are kept in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def to_accumulation(z: torch.Tensor) -> torch.Tensor:
    """``z`` in :func:`accumulation_dtype` (no copy when it already is)."""
    return z.to(accumulation_dtype(z.dtype))


def resolve_projection_dtype(x: torch.Tensor, projection_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a loss's matmuls run in: explicit, else the active autocast dtype, else x's."""
    if projection_dtype is not None:
        return projection_dtype
    device_type = x.device.type
    if x.dtype == torch.float32 and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def autocast_off(device_type: str):
    """Inside the loss kernels every dtype is chosen explicitly; autocast would silently re-cast matmuls."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def check_samples(z: torch.Tensor, minimum: int = 1) -> None:
    """``z`` must be a floating ``(..., N, D)`` tensor with ``N >= minimum``, ``D >= 1`` and no empty
    leading dimension (an empty stack of views has no statistics: every term would be NaN)."""
    if z.dim() < 2 or z.shape[-2] < minimum:
        raise UserInputError(
            f"embeddings must have shape (..., N, D) with N >= {minimum}, got {tuple(z.shape)}"
        )
    if z.shape[-1] < 1 or 0 in z.shape[:-2]:
        raise UserInputError(
            f"embeddings of shape {tuple(z.shape)} are empty: they need D >= 1 and at least one view"
        )
    if not z.is_floating_point():
        raise UserInputError(f"embeddings must be a floating-point tensor, got dtype {z.dtype}")


def moments_like(values: torch.Tensor, rows: torch.Size, name: str) -> torch.Tensor:
    """``values`` (per-row moments) as ``rows`` = the embeddings' ``(..., D)``: equal, or broadcast from a
    shape that broadcasts to it (``(1, D)``, ``(D,)``: pooled over views).

    Raises:
        UserInputError: any other shape (another batch's moments would silently give a wrong value).
    """
    shape = tuple(values.shape)
    try:
        fits = torch.broadcast_shapes(values.shape, rows) == rows
    except RuntimeError:
        fits = False
    if not fits:
        raise UserInputError(
            f"{name} must have shape {tuple(rows)} (one row per stack of samples, as batch_moments gives) or "
            f"broadcast to it, got {shape}"
        )
    return values.expand(rows)


def check_directions(x: torch.Tensor, directions: torch.Tensor) -> None:
    """``directions`` must be ``(D, K)`` with K >= 1 for embeddings ``(..., N, D)``, of unit columns (the
    latter checked for CPU tensors, see below)."""
    if directions.dim() != 2 or directions.shape[0] != x.shape[-1] or directions.shape[1] < 1:
        raise UserInputError(
            f"directions must have shape (D, K) = ({x.shape[-1]}, K) with K >= 1 for embeddings of shape "
            f"{tuple(x.shape)}, got {tuple(directions.shape)}"
        )
    if directions.device.type == "cpu":
        # why CPU only: the functional terms run on every training step with the sampler's (unit) columns,
        # and on a GPU reading the check's result back is a device sync per step; explicit directions given
        # to a loss module are checked on any device (SlicedLoss._check_explicit)
        check_unit_columns(directions)


UNIT_TOLERANCE = 2e-2  # bf16 directions hold their norm to about 4e-3


def check_unit_columns(directions: torch.Tensor) -> None:
    """Slice directions are points on the unit sphere: a longer column scales its slice's projections,
    and with them the shape and SIGReg terms (tenfold columns gave a 3,000x larger shape term)."""
    if not directions.is_floating_point():
        raise UserInputError(f"directions must be a floating-point tensor, got dtype {directions.dtype}")
    error = float((directions.detach().float().norm(dim=0) - 1.0).abs().max())
    if not error <= UNIT_TOLERANCE:  # NaN fails too
        raise UserInputError(
            f"directions must have unit-length columns (slice directions on the sphere); a column's length "
            f"is off by {error:.3g}: pass directions / directions.norm(dim=0, keepdim=True)"
        )


def check_eps(eps: float) -> None:
    """A stabiliser added under a square root must be a finite number > 0 (else NaN or a division by 0)."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf:
        raise UserInputError(f"eps must be a finite number > 0, got {eps!r}")


def cached_quantiles(n: int, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """:func:`gaussian_quantiles` without the copy: the shared cached tensor, for the losses' hot path
    (never modified there). ``n`` is trusted (a batch dimension)."""
    # a plain dict rather than functools.lru_cache, which torch.compile warns about
    key = (n, str(device), dtype)
    cached = _QUANTILE_CACHE.get(key)
    if cached is None:
        if len(_QUANTILE_CACHE) >= 64:
            _QUANTILE_CACHE.clear()
        levels = torch.arange(1, n + 1, dtype=torch.float64) / (n + 1)
        cached = _QUANTILE_CACHE[key] = torch.special.ndtri(levels).to(device=device, dtype=dtype)
    return cached


def gaussian_quantiles(
    n: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``t_i = Phi^-1(i / (n + 1))`` for ``i = 1..n``: the N(0, 1) quantiles a sorted slice is matched to.

    Shape:
        ``(n,)``. Computed in float64 and cast to ``dtype``; a copy of the cached values, so editing it
        in place changes nothing else.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserInputError(f"n must be a positive integer, got {n!r}")
    device = torch.device("cpu") if device is None else torch.device(device)
    return cached_quantiles(n, device, dtype).clone()


# ------------------------------------------------------------------------------- module arguments
def check_flag(name: str, value: bool) -> bool:
    """A yes/no option: True or False (numpy's too); why not bool(value): the string 'false' is truthy, so a
    config's quoted 'false' would switch the option on and be recorded as asked."""
    if not isinstance(value, bool | np.bool_):
        raise UserInputError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_weight(name: str, value: float, *, upper: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UserInputError(f"{name} must be a finite number, got {value!r}")
    if value < 0 or (upper is not None and value > upper):
        bound = f"in [0, {upper}]" if upper is not None else ">= 0"
        raise UserInputError(f"{name} must be {bound}, got {value!r}")
    return float(value)


def check_views(global_proj: torch.Tensor, local_proj: torch.Tensor | None) -> torch.Tensor | None:
    """Check the (V, N, D) view stacks; return ``local_proj``, or None when it holds no views.

    A ``(0, N, D)`` stack is what ``proj[num_global:]`` gives when a recipe has no local crops; it means
    the same as ``None``.
    """
    if not isinstance(global_proj, torch.Tensor) or global_proj.dim() != 3:
        shape = tuple(global_proj.shape) if isinstance(global_proj, torch.Tensor) else type(global_proj)
        raise UserInputError(f"global_proj must be a (V, N, D) tensor, got {shape}")
    if global_proj.shape[0] < 1 or global_proj.shape[1] < 2 or global_proj.shape[2] < 1:
        raise UserInputError(
            "global_proj needs V >= 1 views, N >= 2 samples and D >= 1 dimensions, "
            f"got {tuple(global_proj.shape)}"
        )
    if local_proj is None:
        return None
    if not isinstance(local_proj, torch.Tensor):
        raise UserInputError(
            f"local_proj must be a (V_local, N, D) tensor or None, got {type(local_proj).__name__}"
        )
    if local_proj.dim() != 3 or local_proj.shape[1:] != global_proj.shape[1:]:
        raise UserInputError(
            f"local_proj must be (V_local, N, D) = (V_local, {global_proj.shape[1]}, {global_proj.shape[2]}) "
            f"to match global_proj, got {tuple(local_proj.shape)}"
        )
    if not local_proj.is_floating_point():  # as global_proj: an integer tensor is a mistake, not a cast
        raise UserInputError(f"local_proj must be a floating-point tensor, got dtype {local_proj.dtype}")
    return local_proj if local_proj.shape[0] > 0 else None


def all_views(global_proj: torch.Tensor, local_proj: torch.Tensor | None) -> torch.Tensor:
    """Global and local views stacked ``(Vg + Vl, N, D)``, in the wider of their dtypes (a bf16 global
    stack and a float32 local one are not rounded to bf16)."""
    if local_proj is None:
        return global_proj
    dtype = torch.promote_types(global_proj.dtype, local_proj.dtype)
    return torch.cat([global_proj.to(dtype), local_proj.to(dtype)])


def report(local: torch.Tensor, reported: torch.Tensor) -> torch.Tensor:
    """Value ``reported``, gradient of ``local`` (the per-rank share of a cross-rank quantity)."""
    return local + (reported.to(local.dtype) - local).detach()


def first_order_only(backward):
    """``once_differentiable`` for a custom Function's backward, plus a clear refusal of double backward.

    why: ``once_differentiable`` raises on a second differentiation only when the incoming gradient
    itself requires grad; for a loss's root gradient (a constant) it silently returns a gradient that
    does not depend on the inputs, so a gradient penalty built from it contributes nothing. Grad mode is
    on during a backward only under ``create_graph=True``, which is refused here by name.
    """
    once = torch.autograd.function.once_differentiable(backward)

    @functools.wraps(backward)
    def checked(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "visreg_hub's losses support first-order gradients only: backward with create_graph=True "
                "(double backward, e.g. a gradient penalty) is not implemented for them"
            )
        return once(ctx, *grads)

    return checked
