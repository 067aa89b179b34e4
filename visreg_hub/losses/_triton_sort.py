"""Optional Triton kernel for the shape term's forward: sort, subtract quantiles, scatter back, one pass.

``torch.sort`` must return int64 indices (8 bytes per element) that are then read again by a scatter.
Here each program sorts one row of projections in registers as *packed keys*: the value's
order-preserving bit pattern in the high bits and the element's index in the low 16 bits (an int32 key
for bf16/fp16 values, an int64 key for float32), so a plain value sort yields both the sorted values and
the permutation. The program then subtracts the Gaussian quantiles, stores the residual at the
element's original position and writes the row's sum of squares. Rows of up to ``MAX_ROW`` samples
(N <= 16384, well inside the 16-bit index) are handled; anything else, CPU tensors, float64, or a
machine without Triton use the ``torch.sort`` path, with identical results up to the order of tied values
(which does not change any residual value).

If the kernel fails to compile or launch, a warning is logged once and the torch path is used from then
on. Nothing here runs on import: Triton is imported and the kernel built on first use.
"""

from __future__ import annotations

import contextlib
import logging

import torch

log = logging.getLogger(__name__)

MAX_ROW = 1 << 14
_SUPPORTED = (torch.bfloat16, torch.float16, torch.float32)
_state: dict[str, object] = {"kernel": None, "disabled": False}

try:  # Triton ships with CUDA builds of torch; CPU-only installs may lack it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None
    tl = None


if triton is not None:

    def _sorted_residual_body(
        proj_ptr, quant_ptr, res_ptr, sq_ptr, n, BLOCK: tl.constexpr, WIDE: tl.constexpr
    ):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < n
        values = tl.load(proj_ptr + row * n + offs, mask=mask, other=0.0)
        if WIDE:  # float32: 32 value bits and 16 index bits in an int64 key
            bits = values.to(tl.int32, bitcast=True).to(tl.int64)
            ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # negative floats: reverse magnitude
            keys = (ordered << 16) | offs.to(tl.int64)
            keys = tl.where(mask, keys, 0x7FFFFFFFFFFFFFFF)
            keys = tl.sort(keys)
            index = (keys & 0xFFFF).to(tl.int64)
            ordered = keys >> 16
            bits = tl.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF).to(tl.int32)
            sorted_values = bits.to(tl.float32, bitcast=True)
        else:  # bf16 / fp16: 16 value bits and 16 index bits in an int32 key
            bits = values.to(tl.int16, bitcast=True).to(tl.int32)
            ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFF)
            keys = (ordered << 16) | offs
            keys = tl.where(mask, keys, 0x7FFFFFFF)
            keys = tl.sort(keys)
            index = (keys & 0xFFFF).to(tl.int64)
            ordered = keys >> 16
            bits = tl.where(ordered >= 0, ordered, ordered ^ 0x7FFF).to(tl.int16)
            sorted_values = bits.to(proj_ptr.dtype.element_ty, bitcast=True).to(tl.float32)
        quantiles = tl.load(quant_ptr + offs, mask=mask, other=0.0)
        residual = tl.where(mask, sorted_values - quantiles, 0.0)
        tl.store(res_ptr + row * n + index, residual.to(res_ptr.dtype.element_ty), mask=mask)
        tl.store(sq_ptr + row, tl.sum(residual * residual, axis=0))


def build_kernel():
    """Compile-on-first-launch Triton kernel (an interpreted one when ``TRITON_INTERPRET=1`` is set)."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    return triton.jit(_sorted_residual_body)


def usable(projections: torch.Tensor) -> bool:
    """Whether the Triton path applies to a ``(rows, N)`` projection tensor."""
    return (
        triton is not None
        and not _state["disabled"]
        and projections.is_cuda
        and projections.dtype in _SUPPORTED
        and 2 <= projections.shape[-1] <= MAX_ROW
    )


def _num_warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


def launch(projections, quantiles, residual, kernel=None) -> torch.Tensor:
    """Fill ``residual`` (``(rows, N)``, unsorted order) and return per-row sums of squares (float32).

    Args:
        projections: contiguous ``(rows, N)`` bf16, fp16 or float32 projections.
        quantiles: contiguous ``(N,)`` float32 Gaussian quantiles.
        residual: contiguous ``(rows, N)`` output, any float dtype.
        kernel: an explicit kernel (tests pass an interpreted one); default the cached compiled kernel.
    """
    rows, n = projections.shape
    if kernel is None:
        if _state["kernel"] is None:
            _state["kernel"] = build_kernel()
        kernel = _state["kernel"]
    block = triton.next_power_of_2(n)
    squares = torch.empty(rows, dtype=torch.float32, device=projections.device)
    device_guard = torch.cuda.device(projections.device) if projections.is_cuda else contextlib.nullcontext()
    with device_guard:  # launch on the tensors' GPU, not whichever is current
        kernel[(rows,)](
            projections,
            quantiles,
            residual,
            squares,
            n,
            BLOCK=block,
            WIDE=projections.dtype == torch.float32,
            num_warps=_num_warps(block),
        )
    return squares


def try_launch(projections, quantiles, residual) -> torch.Tensor | None:
    """:func:`launch`, or None (and the torch path from then on) if the kernel cannot run here."""
    try:
        return launch(projections, quantiles, residual)
    except Exception as error:  # compile or launch failure: fall back for good, say so once
        _state["disabled"] = True
        log.warning("Triton sort kernel unavailable (%s); using torch.sort for the shape term", error)
        return None
