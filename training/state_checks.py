"""Reading untrusted training-state files and checking them against the live objects they restore.

Every function raises :class:`~visreg_hub.errors.CheckpointError` naming the file or the state key, never
a raw JSON, safetensors or type error; :mod:`training.state_io` calls them before it changes anything.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from visreg_hub.errors import CheckpointError
from visreg_hub.hub.header import looks_like_pickle
from visreg_hub.native_io import load_safetensors

MAX_JSON_BYTES = 64 * 1024 * 1024  # optimiser param groups of very large models stay far below this


def read_json(path: Path, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Parse a JSON file of a checkpoint; every failure is a :class:`CheckpointError` naming the file."""
    try:
        if path.stat().st_size > max_bytes:
            raise CheckpointError(f"{path} is larger than {max_bytes} bytes; it is not a training-state file")
        return json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{path} is not readable JSON ({type(exc).__name__}: {exc})") from None


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file onto the CPU (no pickle); every failure is a :class:`CheckpointError`."""
    try:
        return load_safetensors(path)
    except (OSError, SafetensorError, ValueError, RuntimeError) as exc:
        hint = (
            "; it looks like a pickle renamed to .safetensors, which is never unpickled"
            if looks_like_pickle(path)
            else "; it is corrupt, truncated or was modified"
        )
        raise CheckpointError(
            f"{path} is not a valid safetensors file ({exc}){hint}: resume from another checkpoint"
        ) from None


def like(saved: Any, reference: Any, where: str) -> None:
    """Check that ``saved`` (from JSON) has the structure and types of ``reference`` (the live state)."""
    if isinstance(reference, dict):
        if not isinstance(saved, dict) or set(saved) != {str(k) for k in reference}:
            got = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
            raise CheckpointError(
                f"training state {where} has keys {got}, expected {sorted(map(str, reference))}"
            )
        for key, value in reference.items():
            like(saved[str(key)], value, f"{where}.{key}")
    elif isinstance(reference, (list, tuple)):
        if not isinstance(saved, list) or len(saved) != len(reference):
            raise CheckpointError(f"training state {where} should be a list of {len(reference)} items")
        for i, (item, ref) in enumerate(zip(saved, reference, strict=True)):
            like(item, ref, f"{where}[{i}]")
    elif isinstance(reference, bool) or reference is None or isinstance(reference, str):
        if type(saved) is not type(reference):
            raise CheckpointError(f"training state {where} should be {reference!r}-like, got {saved!r}")
    elif isinstance(reference, (int, float)):
        check_number(saved, where)
        if isinstance(reference, int) and not isinstance(saved, int):
            raise CheckpointError(f"training state {where} should be an integer, got {saved!r}")
    else:
        raise CheckpointError(f"training state {where}: unsupported live value {type(reference).__name__}")


def check_number(saved: Any, where: str) -> None:
    """Refuse a saved scalar that is not a finite number below 2**53 (a float's exact integers).

    why: counters and rates of a real run are far below it, and a JSON integer of 400 digits would
    overflow every float conversion after it (an OverflowError instead of a CheckpointError, so
    ``--resume auto`` would not fall back to an older checkpoint).
    """
    if isinstance(saved, bool) or not isinstance(saved, (int, float)):
        raise CheckpointError(f"training state {where} should be a number, got {saved!r}"[:200])
    if abs(saved) >= 2**53 or not math.isfinite(saved):  # ints first: math.isfinite(10**400) overflows
        message = f"training state {where} should be a finite number below 2**53, got {saved!r}"
        raise CheckpointError(message[:200])


def retuple(saved: Any, reference: Any) -> Any:
    """JSON turns tuples into lists; give back the live state's container types (e.g. AdamW ``betas``)."""
    if isinstance(reference, dict):
        return {key: retuple(saved[str(key)], value) for key, value in reference.items()}
    if isinstance(reference, (list, tuple)):
        items = [retuple(s, r) for s, r in zip(saved, reference, strict=True)]
        return tuple(items) if isinstance(reference, tuple) else items
    return saved


def check_module_tensors(tensors: dict, module: torch.nn.Module, where: str) -> None:
    expected = {k: v for k, v in module.state_dict().items() if not k.endswith("_extra_state")}
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{where} does not match the model being trained (missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}); resume with the configuration that wrote it"
        )
    for name, value in expected.items():
        if tensors[name].shape != value.shape or tensors[name].dtype != value.dtype:
            raise CheckpointError(
                f"{where}: {name} is {tuple(tensors[name].shape)} {tensors[name].dtype}, the model has "
                f"{tuple(value.shape)} {value.dtype}; resume with the configuration that wrote it"
            )
        if tensors[name].is_floating_point() and not torch.isfinite(tensors[name]).all():
            # a run saves only finite weights (it stops at the first non-finite loss): this file was altered
            raise CheckpointError(
                f"{where}: {name} holds NaN or infinite values; resume from another checkpoint"
            )


_PLAN_HINT = (
    "if train.global_batch_size, train.per_device_batch_size, the number of processes, the data or "
    "data.val_size changed since the checkpoint was written, resume with the values it was written with "
    "(the warning 'resuming with changed settings' lists them); otherwise the checkpoint is damaged"
)


def check_trainer_state(trainer: Any, steps_by_epoch: tuple[int, ...]) -> None:
    """The trainer's position: non-negative integers within the run's epochs (``steps_by_epoch``: a step
    inside an epoch past its end would crash the data loader mid-run)."""
    ints = ("global_step", "epoch", "step_in_epoch")
    optional_floats = ("best_metric", "last_knn")
    if not isinstance(trainer, dict) or set(trainer) != set(ints + optional_floats):
        raise CheckpointError(f"training state 'trainer' should hold exactly {list(ints + optional_floats)}")
    for key in ints:
        value = trainer[key]
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**53:
            raise CheckpointError(
                f"training state trainer.{key} should be a non-negative integer, got {value!r}"[:200]
            )
    for key in optional_floats:
        value = trainer[key]
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
        ):
            raise CheckpointError(
                f"training state trainer.{key} should be a finite number or null, got {value!r}"[:200]
            )
    epoch, inside = trainer["epoch"], trainer["step_in_epoch"]
    if epoch < len(steps_by_epoch) and inside > steps_by_epoch[epoch]:
        raise CheckpointError(
            f"training state trainer.step_in_epoch is {inside}, but epoch {epoch} has "
            f"{steps_by_epoch[epoch]} steps; the file is inconsistent with this run's data: {_PLAN_HINT}"
        )
    if epoch > len(steps_by_epoch):
        raise CheckpointError(
            f"training state trainer.epoch is {epoch}, beyond this run's {len(steps_by_epoch)} epochs"[:200]
        )
    position = sum(steps_by_epoch[:epoch]) + inside
    if trainer["global_step"] != position:
        raise CheckpointError(
            f"training state trainer.global_step is {trainer['global_step']}, but epoch {epoch} step "
            f"{inside} of this run's plan is step {position}; the file is inconsistent with this run's data "
            f"and batch: {_PLAN_HINT}"
        )
