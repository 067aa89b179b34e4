"""Checking a user's device string before anything is moved to it.

``torch.device("bogus")`` raises a ``RuntimeError`` listing every backend torch knows, and
``model.to("cuda")`` on a machine without a GPU fails deep inside CUDA initialisation; both become one
:class:`~visreg_hub.errors.DeviceError` naming what is available.
"""

from __future__ import annotations

import torch

from visreg_hub.errors import DeviceError

USUAL = "cpu, cuda, cuda:N or mps"


def _available() -> str:
    found = ["cpu"]
    if torch.cuda.is_available():
        found.append(f"cuda:0..{torch.cuda.device_count() - 1}")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return ", ".join(found)


def default_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` checked by :func:`resolve_device`; None or ``"auto"``: the first CUDA GPU when there is
    one, else the CPU (the default of the server, the demo and the evaluation script).

    Raises:
        DeviceError: as :func:`resolve_device`.
    """
    if device is None or (isinstance(device, str) and device.strip() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return resolve_device(device)


def resolve_device(device: str | torch.device | None) -> torch.device | None:
    """``device`` as a ``torch.device`` that exists on this machine (None stays None: the caller's default).

    Raises:
        DeviceError: malformed (``bogus``, ``cuda:x``), hardware this machine does not have, or ``meta``
            (it holds shapes without data: moving a model there would empty its weights).
    """
    if device is None:
        return None
    if isinstance(device, torch.device):
        parsed = device
    elif isinstance(device, str) and device.strip():
        try:
            parsed = torch.device(device.strip())
        except (RuntimeError, ValueError) as exc:
            raise DeviceError(
                f"device {device!r} is not a device name ({type(exc).__name__}); use {USUAL} "
                f"(available here: {_available()})"
            ) from None
    else:
        raise DeviceError(f"device must be a string such as {USUAL}, got {device!r}")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device {str(parsed)!r} asked for, but no CUDA GPU is usable here "
                f"(torch.cuda.is_available() is False); use device='cpu' (--device cpu on the command line; "
                f"available: {_available()})"
            )
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise DeviceError(
                f"device {str(parsed)!r} does not exist: this machine has {torch.cuda.device_count()} CUDA "
                f"device(s) (available: {_available()})"
            )
    elif parsed.type == "mps" and not (
        getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    ):
        raise DeviceError(f"device 'mps' asked for, but Apple MPS is not available here ({_available()})")
    elif parsed.type == "meta":
        raise DeviceError(
            "device 'meta' holds no data: a model moved there loses its weights and cannot embed; use "
            f"{USUAL} (available here: {_available()})"
        )
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"device {str(parsed)!r} is not supported by visreg_hub; use {USUAL}")
    return parsed
