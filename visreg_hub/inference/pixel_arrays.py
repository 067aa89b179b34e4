"""In-memory pixels -> 8-bit levels: numpy arrays, torch tensors, and 16/32-bit image data.

The rules (uint16 scaled by 1/257, floats in [0, 1] by 255, 8-bit data in a 32-bit container read as it is)
are in :mod:`visreg_hub.inference.images`' docstring; errors are :class:`ImageDecodeError` naming the item.
"""

from __future__ import annotations

import numpy as np
import torch

from visreg_hub.errors import ImageDecodeError


def _whole(values: np.ndarray) -> bool:
    """Every value is a whole number (8-bit levels, or [0, 1] data that is exactly 0 or 1)."""
    return bool(np.all(values == np.rint(values)))


def high_depth_to_uint8(values: np.ndarray, mode: str, label: str) -> np.ndarray:
    """(H, W) 16/32-bit integer or float pixel values -> (H, W) uint8 levels.

    Float (F) images: [0, 1] is scaled by 255; [0, 1] data that overshoots (not whole numbers, and either
    all under 2, a resampling filter's ringing, or at most 1 % of the pixels over 1, highlights) is
    clipped at 1 first, never read as near-black levels; other values within [0, 255] are 8-bit levels
    (``L.convert("F")``, and the same image resized or blurred, which leaves fractions), kept as Pillow's
    own ``convert("RGB")`` (timm's loader) keeps them. Integer (I) images within [0, 255] are 8-bit
    levels too; up to 65535, 16-bit data scaled by 1/257. Anything else is stretched from its minimum to
    its maximum.
    """
    values = values.astype(np.float64)
    if not np.isfinite(values).all():
        raise ImageDecodeError(f"{label}: {mode}-mode image contains NaN or infinite values")
    low, high = float(values.min()), float(values.max())
    if mode == "F" and low >= 0.0 and high <= 1.0:
        scaled = values * 255.0
    elif mode == "F" and low >= 0.0 and not _whole(values) and (high < 2.0 or (values > 1.0).mean() <= 0.01):
        scaled = np.minimum(values, 1.0) * 255.0
    elif mode in ("I", "F") and low >= 0.0 and high <= 255.0:
        # 8-bit data in a 32-bit container (an 8-bit TIFF written as int32 or float); 16-bit files open as
        # I;16 instead
        scaled = values
    elif mode != "F" and low >= 0.0 and high <= 65535.0:
        scaled = values / 257.0  # 65535 -> 255 exactly: full 16-bit range, no clipping
    elif high > low:
        scaled = (values - low) * (255.0 / (high - low))
    else:
        scaled = np.zeros_like(values)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


META_TENSOR_REASON = (
    "tensor is on the meta device and holds no pixel values; pass a tensor with data (e.g. on 'cpu')"
)


def tensor_to_hwc(tensor: torch.Tensor, label: str) -> np.ndarray:
    """(H, W) or (C, H, W) tensor (uint8, uint16 or float in [0, 1]) -> (H, W) / (H, W, C) numpy array of
    its dtype (bfloat16 and half as float32), on the CPU."""
    if tensor.is_meta:
        raise ImageDecodeError(f"{label}: {META_TENSOR_REASON}")
    if not (tensor.dtype in (torch.uint8, torch.uint16) or tensor.is_floating_point()):
        raise ImageDecodeError(
            f"{label}: tensor dtype {tensor.dtype} is not supported; pass uint8 (0-255) or float in [0, 1]"
        )
    if tensor.ndim == 3:
        if not 1 <= tensor.shape[0] <= 4:
            hint = ""
            if 1 <= tensor.shape[-1] <= 4:
                hint = "; it looks channels-last, use tensor.permute(2, 0, 1)"
            shape = tuple(tensor.shape)
            raise ImageDecodeError(
                f"{label}: tensor of shape {shape} must be (C, H, W) with 1-4 channels{hint}"
            )
        tensor = tensor.permute(1, 2, 0)
    elif tensor.ndim != 2:
        raise ImageDecodeError(
            f"{label}: tensor of shape {tuple(tensor.shape)} must be (H, W), (C, H, W) or (B, C, H, W)"
        )
    tensor = tensor.detach().cpu()
    if tensor.is_floating_point() and tensor.dtype != torch.float64:
        tensor = tensor.float()  # numpy has no bfloat16
    array = tensor.numpy()
    if array.dtype.kind == "f":
        _check_unit_range(array, label, "tensor")
    return array


def _check_unit_range(array: np.ndarray, label: str, what: str) -> None:
    if not np.isfinite(array).all():
        raise ImageDecodeError(f"{label}: float {what} contains NaN or infinite values")
    if array.size and (array.min() < 0.0 or array.max() > 1.0):
        low, high = array.min(), array.max()
        raise ImageDecodeError(
            f"{label}: float {what} values span [{_exact(low)}, {_exact(high)}] but raw pixels must be in "
            f"[0, 1]: {_unit_range_hint(float(low), float(high), what)}"
        )


def _exact(value: np.floating) -> str:
    """``value`` in the shortest form that reads back as the same number of its dtype: 1.0000001 must not
    print as 1, or the message would say [0, 1] is outside [0, 1]."""
    if value == 0 or 1e-4 <= abs(value) < 1e6:
        return np.format_float_positional(value, trim="-")
    return np.format_float_scientific(value, trim="-")


def _unit_range_hint(low: float, high: float, what: str) -> str:
    """The likely cause of a float image outside [0, 1], and its fix."""
    if low >= -0.01 and high <= 1.01:  # a hair outside: resampling overshoot (bicubic) or rounding
        clamp = "tensor.clamp(0, 1)" if what == "tensor" else "np.clip(array, 0, 1)"
        return f"values just outside the range (e.g. from bicubic resizing) need clamping: pass {clamp}"
    return "divide 0-255 data by 255; an already normalised (B, C, H, W) batch goes to model(batch) directly"


def array_to_uint8(array: np.ndarray, label: str) -> np.ndarray:
    """HW / HWC array (uint8, uint16 or float in [0, 1]) -> contiguous uint8 HW / HWC."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and not 2 <= array.shape[-1] <= 4):
        hint = ""
        if array.ndim == 3:
            stack = f"; {array.shape[0]} stacked grayscale images? pass array[..., None] ((N, H, W, 1))"
            first = "; channels-first? use array.transpose(1, 2, 0)" if array.shape[0] <= 4 else ""
            hint = first + stack
        raise ImageDecodeError(
            f"{label}: array of shape {tuple(array.shape)} must be (H, W) or (H, W, C) with C in 1..4, "
            f"or an (N, H, W, C) batch{hint}"
        )
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise ImageDecodeError(f"{label}: array of shape {tuple(array.shape)} has no pixels")
    if array.dtype == np.uint8:
        converted = array
    elif array.dtype.kind == "u" and array.dtype.itemsize == 2:  # either byte order (FITS, TIFF readers: >u2)
        converted = np.rint(array / 257.0).astype(np.uint8)
    elif array.dtype.kind == "f":
        _check_unit_range(array, label, "array")
        converted = np.rint(array.astype(np.float64) * 255.0).astype(np.uint8)
    else:
        raise ImageDecodeError(
            f"{label}: array dtype {array.dtype} is not supported; pass uint8 (0-255), uint16 or "
            "float in [0, 1]"
        )
    return np.ascontiguousarray(converted)
