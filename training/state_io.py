"""Training state as safetensors + JSON: nothing on the resume path is ever unpickled.

A checkpoint folder holds (names: the constants below and :func:`rng_files`)::

    model.safetensors             backbone + projector (the unwrapped module's state dict)
    probe.safetensors             the online probe, when there is one
    training_state.safetensors    optimiser moments (``optimizer.<param index>.<name>``), loss buffers
    training_state.json           optimiser param groups and scalars, LR schedule, GradScaler, loss slice
                                  state, monitor counters, position (:class:`~training.engine.TrainState`)
    rng_state_<rank>.safetensors  torch CPU (``cpu``) and CUDA (``cuda.<device>``) generator states
    rng_state_<rank>.json         Python ``random`` and NumPy global generator states

Everything read back is checked (:mod:`training.state_checks`) against the live objects it goes into
(same keys, types, shapes) before anything is changed, so a hostile folder gives a
:class:`CheckpointError`, never code execution or a half-restored run. Integrity (sha256 of every
file) is :mod:`training.manifest`'s job.
This writer replaces accelerate's ``save_state``, whose optimiser, scheduler, RNG and custom-object files
are pickles that ``load_state`` unpickles with ``weights_only=False``. The state dicts are those of a
single-replica module (DDP); sharded FSDP/DeepSpeed states are not supported by this trainer.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from training.state_checks import (
    check_module_tensors,
    check_number,
    check_trainer_state,
    like,
    read_json,
    read_tensors,
    retuple,
)
from visreg_hub.errors import CheckpointError

MODEL_FILE = "model.safetensors"
PROBE_FILE = "probe.safetensors"
TENSORS_FILE = "training_state.safetensors"
STATE_JSON = "training_state.json"
FORMAT = "visreg-training-state"
VERSION = 1


_KNOWN = re.compile(
    r"^(model|probe|training_state)\.safetensors$|^(training_state|trainer_state|manifest)\.json$"
    r"|^rng_state_\d+\.(safetensors|json)$"
)


def rng_files(rank: int) -> tuple[str, str]:
    """(safetensors, JSON) names of one rank's generator states."""
    return f"rng_state_{rank}.safetensors", f"rng_state_{rank}.json"


@dataclass
class TrainingParts:
    """The live objects a checkpoint saves and restores (the model unwrapped from DDP)."""

    model: torch.nn.Module
    probe: torch.nn.Module | None
    optimizer: Any  # torch.optim.Optimizer or accelerate's AcceleratedOptimizer
    scheduler: Any
    scaler: Any  # torch.amp.GradScaler or None
    loss_fn: torch.nn.Module
    monitor: Any  # training.monitor.HealthMonitor
    state: Any  # training.engine.TrainState


# ----------------------------------------------------------------------------------------------- saving
def _tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # clone: safetensors refuses views sharing storage; cpu: files are device-independent
    return {name: value.detach().cpu().contiguous().clone() for name, value in state.items()}


def _json_ready(value: Any, where: str) -> Any:
    """Refuse anything JSON cannot hold exactly (so a state never silently needs pickle)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value  # json writes repr(): exact; nan/inf as NaN/Infinity literals
    if isinstance(value, (list, tuple)):
        return [_json_ready(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, dict):
        return {str(key): _json_ready(item, f"{where}.{key}") for key, item in value.items()}
    raise TypeError(f"training state {where} is a {type(value).__name__}, which JSON cannot hold")


def _optimizer_split(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _loss_split(loss_fn: torch.nn.Module) -> tuple[dict[str, torch.Tensor], Any]:
    tensors, extra = {}, None
    for name, value in loss_fn.state_dict().items():
        if name.endswith("_extra_state"):
            extra = value
        else:
            tensors[f"loss.{name}"] = value
    return tensors, extra


def save_training_state(folder: Path, parts: TrainingParts, rank: int, is_main: bool) -> list[str]:
    """Write ``parts`` into ``folder``; every rank calls this (rank files), the main one writes the rest.

    Returns:
        The names of the files this process wrote.
    """
    written = []
    rng_tensors, rng_json = _rng_state()
    tensor_name, json_name = rng_files(rank)
    save_file(_tensors(rng_tensors), str(folder / tensor_name))
    _write_json(folder / json_name, rng_json)
    written += [tensor_name, json_name]
    if not is_main:
        return written
    save_file(_tensors(parts.model.state_dict()), str(folder / MODEL_FILE))
    written.append(MODEL_FILE)
    if parts.probe is not None:
        save_file(_tensors(parts.probe.state_dict()), str(folder / PROBE_FILE))
        written.append(PROBE_FILE)
    optimizer_tensors, optimizer_json = _optimizer_split(parts.optimizer)
    loss_tensors, loss_extra = _loss_split(parts.loss_fn)
    save_file(_tensors({**optimizer_tensors, **loss_tensors}), str(folder / TENSORS_FILE))
    record = {
        "format": FORMAT,
        "version": VERSION,
        "optimizer": optimizer_json,
        "scheduler": parts.scheduler.state_dict(),
        "scaler": None if parts.scaler is None else parts.scaler.state_dict(),
        "loss": loss_extra,
        "monitor": parts.monitor.state_dict(),
        "trainer": parts.state.state_dict(),
    }
    _write_json(folder / STATE_JSON, _json_ready(record, "state"))
    return [*written, TENSORS_FILE, STATE_JSON]


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    version, internal, gauss_next = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state(legacy=True)
    tensors = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    record = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "numpy": {
            "kind": kind, "keys": keys.tolist(), "position": int(position),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached),
        },
    }  # fmt: skip
    return tensors, record


# ---------------------------------------------------------------------------------------------- loading
# AdamW's per-parameter state; ``max_exp_avg_sq`` only with amsgrad (a flag of the live param group)
_ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


def _optimizer_state(parts: TrainingParts, record: dict, tensors: dict) -> dict:
    """The optimiser state to load: the checkpoint's moments and step counts, this run's param groups.

    Hyperparameters and flags (lr, betas, eps, weight decay, amsgrad, maximize, ...) are the live
    optimiser's, built from the configuration: a resume with a new ``optim.lr`` or weight decay uses
    it (the saved groups only have to name the same parameters), and a hostile file cannot switch on
    gradient ascent or a state layout the step would crash on. Each parameter's state must be
    exactly AdamW's: a scalar step >= 0 and finite moments of the parameter's shape.
    """
    live = parts.optimizer.state_dict()
    saved_groups = record["param_groups"]
    if isinstance(saved_groups, list) and len(saved_groups) != len(live["param_groups"]):
        raise CheckpointError(
            f"the checkpoint's optimiser has {len(saved_groups)} parameter group(s), this run's "
            f"{len(live['param_groups'])}: the online probe adds one; resume with the train.online_probe "
            "setting it was written with"
        )
    like(saved_groups, live["param_groups"], "optimizer.param_groups")
    for number, (saved, current) in enumerate(zip(saved_groups, live["param_groups"], strict=True)):
        if saved["params"] != current["params"]:
            raise CheckpointError(
                f"training state optimizer.param_groups[{number}] holds other parameters than this "
                "model's; resume with the configuration that wrote it"
            )
    params = [p for group in parts.optimizer.param_groups for p in group["params"]]
    amsgrad = {i: bool(group.get("amsgrad")) for group in live["param_groups"] for i in group["params"]}
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        index_text, _, key = name.removeprefix("optimizer.").partition(".")
        if not index_text.isdigit() or int(index_text) >= len(params) or not key:
            raise CheckpointError(f"{TENSORS_FILE}: {name!r} names no parameter of this optimiser")
        if not value.is_floating_point():
            raise CheckpointError(f"{TENSORS_FILE}: {name} is {value.dtype}, expected a float tensor")
        state.setdefault(int(index_text), {})[key] = value
    scalars = record["scalars"]
    if not isinstance(scalars, dict):
        raise CheckpointError("training state optimizer.scalars should be a mapping")
    for index_text, values in scalars.items():
        if not index_text.isdigit() or int(index_text) >= len(params) or not isinstance(values, dict):
            raise CheckpointError(f"training state optimizer.scalars.{index_text} names no parameter")
        for key, value in values.items():
            check_number(value, f"optimizer.scalars.{index_text}.{key}")
            state.setdefault(int(index_text), {})[key] = value
    for index, values in state.items():
        _check_adam_state(index, values, params[index].shape, amsgrad[index])
    return {"state": state, "param_groups": live["param_groups"]}


def _check_adam_state(index: int, values: dict, shape: torch.Size, amsgrad: bool) -> None:
    where = f"training state of optimiser parameter {index}"
    expected = {"step", *_ADAM_MOMENTS, *(("max_exp_avg_sq",) if amsgrad else ())}
    if set(values) != expected:
        raise CheckpointError(f"{where} holds {sorted(values)}, expected exactly {sorted(expected)}")
    step = values["step"]
    step_value = float(step) if not isinstance(step, torch.Tensor) or step.dim() == 0 else math.nan
    if not (math.isfinite(step_value) and step_value >= 0 and step_value == int(step_value)):
        raise CheckpointError(f"{where}: step must be a whole number >= 0 (a scalar), got {step!r}"[:300])
    for key in expected - {"step"}:
        tensor = values[key]
        if tensor.shape != shape:
            raise CheckpointError(
                f"{where}: {key} has shape {tuple(tensor.shape)}, the parameter has {tuple(shape)}; "
                "resume with the configuration that wrote it"
            )
        if not torch.isfinite(tensor).all() or (key != "exp_avg" and (tensor < 0).any()):
            raise CheckpointError(f"{where}: {key} holds non-finite or (for a second moment) negative values")


def _check_optimizer_steps(state: dict, global_step: int, where: Path) -> None:
    """AdamW's per-parameter step can trail the trainer's (a skipped fp16 step, a parameter without a
    gradient yet) but never lead it: a step of 1e20 would silently switch off bias correction."""
    for index, values in state["state"].items():
        step = float(values["step"])
        if step > global_step:
            raise CheckpointError(
                f"{where}: optimiser parameter {index} has taken {step:.0f} steps but the run only "
                f"{global_step}; the checkpoint is damaged: resume from another one"
            )


def _scheduler_state(parts: TrainingParts, saved: Any, global_step: int) -> dict:
    """The saved LR-scheduler position with this run's base learning rates.

    The position must be the trainer's (one scheduler step per optimiser step): a hostile
    ``last_epoch`` of 10**30 would otherwise silently move the schedule.
    """
    live = parts.scheduler.state_dict()
    like(saved, live, "scheduler")
    state = retuple(saved, live)
    if state.get("last_epoch") != global_step:
        raise CheckpointError(
            f"training state scheduler.last_epoch is {state.get('last_epoch')!r}, but the trainer is at step "
            f"{global_step}; the file is inconsistent: resume from another checkpoint"
        )
    return {**state, "base_lrs": live["base_lrs"], "_last_lr": live["_last_lr"]}


# the sliced losses' extra state: the slice seed (from train.seed, in [0, 2**32)) and the slice step
_LOSS_LIMITS = {"seed": 2**32, "step": 2**53}


def _check_loss_extra(path: Path, extra: Any, loss_fn: torch.nn.Module) -> None:
    """Check the loss's extra state (slice seed and step) before any live object changes.

    ``like`` has matched its keys and types to the live loss's; the ranges are checked here, naming the
    file and key, and a trial load into a copy of the loss catches whatever else its setter refuses.
    """
    if extra is None:
        return
    for key, limit in _LOSS_LIMITS.items():
        value = extra.get(key)
        if isinstance(value, int) and not 0 <= value < limit:
            message = f"{path}: loss.{key} must be an integer in [0, {limit}), got {value!r}"
            raise CheckpointError(message[:300])
    try:
        copy.deepcopy(loss_fn).set_extra_state(extra)
    except (ValueError, TypeError, OverflowError) as exc:
        raise CheckpointError(f"{path}: the loss entry is malformed ({exc})"[:300]) from None


def _apply_schedule(parts: TrainingParts) -> None:
    """Set each group's lr to this run's schedule at the restored step (what ``scheduler.step`` does)."""
    scheduler = parts.scheduler
    step = scheduler.last_epoch
    lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
    for group, lr in zip(parts.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs


def _read_rng(folder: Path, rank: int, names: set[str]):
    """Parse and check one rank's generator states; returns a function that applies them, or None."""
    tensor_name, json_name = rng_files(rank)
    if tensor_name not in names or json_name not in names:
        return None
    tensors, record = read_tensors(folder / tensor_name), read_json(folder / json_name)
    _, reference = _rng_state()
    like(record, reference, "rng")
    python, numpy_state, cpu = record["python"], record["numpy"], tensors.get("cpu")
    python_state = (python["version"], tuple(python["state"]), python["gauss_next"])
    if cpu is None or cpu.dtype != torch.uint8:
        raise CheckpointError(
            f"{folder / tensor_name}: the torch CPU generator state is missing or malformed"
        )
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors)) if f"cuda.{i}" in tensors]
    try:  # trial runs on throwaway generators: the setters are the authority on what is valid
        keys = numpy_state["keys"]
        if not all(0 <= key < 2**32 for key in keys):
            raise ValueError("NumPy keys must be integers in [0, 2**32)")
        numpy_tuple = (
            numpy_state["kind"], np.asarray(keys, dtype=np.uint32), numpy_state["position"],
            numpy_state["has_gauss"], numpy_state["cached_gaussian"],
        )  # fmt: skip
        random.Random().setstate(python_state)
        np.random.RandomState().set_state(numpy_tuple)
    except (ValueError, TypeError, OverflowError, RuntimeError) as exc:
        raise CheckpointError(f"{folder / json_name}: a generator state is malformed ({exc})") from None
    try:  # the torch state lives in the safetensors file: blame that one
        torch.Generator().set_state(cpu)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise CheckpointError(
            f"{folder / tensor_name}: the torch CPU generator state is malformed ({exc})"
        ) from None

    def apply() -> None:
        random.setstate(python_state)
        np.random.set_state(numpy_tuple)
        torch.set_rng_state(cpu)
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)

    return apply


def load_training_state(
    folder: Path, parts: TrainingParts, rank: int, names: set[str], steps_by_epoch: tuple[int, ...]
) -> list[str]:
    """Restore ``parts`` from ``folder``, reading only the verified files ``names`` (see the manifest).

    Everything is parsed and checked before the first live object changes. The optimiser's moments and
    the run's position come from the checkpoint; its hyperparameters and the LR schedule from this
    run's configuration (so a resume with a lower ``optim.lr`` takes effect at once).

    Args:
        steps_by_epoch: optimiser steps of each epoch of this run (:class:`training.plan.RunPlan`),
            to check the saved position against.

    Returns:
        Notes for the log (e.g. a rank without saved generator states after a change of world size).

    Raises:
        CheckpointError: a file is missing, malformed, or does not fit the objects being restored.
    """
    needed = {MODEL_FILE, TENSORS_FILE, STATE_JSON} | ({PROBE_FILE} if parts.probe is not None else set())
    if needed - names:
        raise CheckpointError(
            f"{folder} lacks {sorted(needed - names)}; it is not a complete training checkpoint"
        )
    record = read_json(folder / STATE_JSON)
    if not isinstance(record, dict) or record.get("format") != FORMAT or record.get("version") != VERSION:
        raise CheckpointError(f"{folder / STATE_JSON} is not a {FORMAT} version {VERSION} file")
    model_tensors = read_tensors(folder / MODEL_FILE)
    check_module_tensors(model_tensors, parts.model, MODEL_FILE)
    probe_tensors = None
    if parts.probe is not None:
        probe_tensors = read_tensors(folder / PROBE_FILE)
        check_module_tensors(probe_tensors, parts.probe, PROBE_FILE)
    tensors = read_tensors(folder / TENSORS_FILE)
    loss_tensors = {k.removeprefix("loss."): v for k, v in tensors.items() if k.startswith("loss.")}
    check_module_tensors(loss_tensors, parts.loss_fn, f"{TENSORS_FILE} (loss)")
    optimizer_tensors = {k: v for k, v in tensors.items() if not k.startswith("loss.")}
    if not isinstance(record.get("optimizer"), dict) or set(record["optimizer"]) != {
        "param_groups",
        "scalars",
    }:
        raise CheckpointError(f"{folder / STATE_JSON}: the optimizer entry is malformed")
    optimizer_state = _optimizer_state(parts, record["optimizer"], optimizer_tensors)
    for key, live in (("scheduler", parts.scheduler), ("scaler", parts.scaler), ("monitor", parts.monitor)):
        reference = None if live is None else live.state_dict()
        like(record.get(key), reference, key)
    if parts.monitor is not None and any(count < 0 for count in record["monitor"].values()):
        raise CheckpointError(f"{folder / STATE_JSON}: the monitor's alarm counters must be >= 0")
    _, loss_extra = _loss_split(parts.loss_fn)
    if (record.get("loss") is None) != (loss_extra is None):
        wrote = "a sliced loss (visreg, sigreg or swd)" if loss_extra is None else "a loss without slices"
        raise CheckpointError(
            f"{folder} was written with {wrote}, unlike this run's {type(parts.loss_fn).__name__}; resume "
            "with the loss.name that wrote it"
        )
    like(record.get("loss"), loss_extra, "loss")
    _check_loss_extra(folder / STATE_JSON, record["loss"], parts.loss_fn)
    trainer = record.get("trainer")
    check_trainer_state(trainer, steps_by_epoch)
    _check_optimizer_steps(optimizer_state, trainer["global_step"], folder / STATE_JSON)
    scheduler_state = _scheduler_state(parts, record["scheduler"], trainer["global_step"])
    apply_rng = _read_rng(folder, rank, names)

    # Everything parsed and checked: now change the live objects.
    parts.model.load_state_dict(model_tensors, strict=True)
    if parts.probe is not None:
        parts.probe.load_state_dict(probe_tensors, strict=True)
    parts.optimizer.load_state_dict(optimizer_state)
    parts.scheduler.load_state_dict(scheduler_state)
    _apply_schedule(parts)
    if parts.scaler is not None:
        parts.scaler.load_state_dict(record["scaler"])
    loss_state = {**loss_tensors}
    if loss_extra is not None:
        loss_state = {**loss_state, "_extra_state": record["loss"]}
    parts.loss_fn.load_state_dict(loss_state, strict=True)
    parts.monitor.load_state_dict(record["monitor"])
    parts.state.load_state_dict(trainer)
    notes = []
    if apply_rng is not None:
        apply_rng()
    ignored = sorted(name for name in os.listdir(folder) if not _KNOWN.match(name))
    if ignored:
        notes.append(f"{folder}: ignoring {ignored} (not part of a training checkpoint; never read)")
    if apply_rng is None:
        notes.append(
            f"{folder} holds no generator state for rank {rank} ({_why_no_rng(names)}); random "
            "streams restart from the seed, so the run is not bit-exact with an uninterrupted one"
        )
    return notes


def _why_no_rng(names: set[str]) -> str:
    """Why a rank finds no generator state: other ranks' files, or none at all in the manifest."""
    if any(name.startswith("rng_state_") for name in names):
        return "saved with another number of processes"
    return "its manifest lists no rng_state_* files"
