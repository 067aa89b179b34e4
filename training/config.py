"""Training configuration: frozen dataclasses read from YAML, overridden by ``key=value`` arguments.

A config file has one mapping per section (``model``, ``projector``, ``data``, ``augment``, ``loss``,
``optim``, ``train``, ``eval``, ``monitor``, ``debug``). A file may start with ``extends: other.yaml``
(relative to itself) to inherit a preset and change a few values. Command-line overrides use dotted keys
and YAML values: ``optim.lr=5e-4 loss.name=sigreg augment.global_scale=[0.2,1.0]``.

Every value is checked when the config is built, before any work starts: unknown keys (with close
matches suggested), wrong types and out-of-range values raise :class:`ConfigError` naming the key, the
value and the fix. Relative paths are resolved against the current working directory.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from training.augment_specs import ColorSpec
from training.checks import FMNIST_DIR, validate  # noqa: F401  (FMNIST_DIR re-exported)
from visreg_hub.errors import ConfigError
from visreg_hub.models.config import IMAGENET_MEAN, IMAGENET_STD
from visreg_hub.suggest import did_you_mean

LOSS_NAMES = ("visreg", "sigreg", "swd", "vicreg", "barlow")
DATA_SOURCES = ("folder", "filelist", "webdataset", "fmnist", "npz")


@dataclass(frozen=True)
class ModelSection:
    """Backbone: a named size of :meth:`visreg_hub.models.ModelConfig.from_name` plus overrides.

    ``img_size`` defaults to ``augment.global_size``; ``in_chans``, ``mean`` and ``std`` come from ``data``.
    """

    size: str = "vit-s16"
    img_size: int | None = None
    patch_size: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float | None = None
    num_reg_tokens: int = 0
    drop_path_rate: float = 0.0
    pooling: str = "cls"


@dataclass(frozen=True)
class ProjectorSection:
    """Training-only MLP head ``in -> hidden (x num_hidden_layers) -> out_dim`` (BN + activation)."""

    hidden_dim: int = 2048
    out_dim: int = 256
    activation: Literal["gelu", "relu"] = "gelu"
    num_hidden_layers: int = 2


@dataclass(frozen=True)
class LongTailSection:
    """Long-tailed subsampling of a labelled training set (ImageNet-LT style); see ``training.data``."""

    enabled: bool = False
    profile: Literal["pareto", "exponential"] = "pareto"
    imbalance_ratio: float = 256.0
    alpha: float | None = None
    max_per_class: int | None = None
    min_per_class: int = 1
    many_threshold: int | None = None
    few_threshold: int | None = None
    seed: int = 0


@dataclass(frozen=True)
class DataSection:
    """Where images come from and how they are decoded (resized to ``base_size`` squares in workers)."""

    source: Literal["folder", "filelist", "webdataset", "fmnist", "npz"] = "folder"
    path: str | None = None
    split: Literal["train", "test"] = "train"
    val_source: Literal["folder", "filelist", "webdataset", "fmnist", "npz"] | None = None
    val_path: str | None = None
    val_split: Literal["train", "test"] = "test"
    val_size: int = 0
    channels: Literal[1, 3] = 3
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    base_size: int = 256
    num_workers: int = 4
    shuffle_buffer: int = 2000
    long_tail: LongTailSection = field(default_factory=LongTailSection)


@dataclass(frozen=True)
class AugmentSection:
    """Multi-crop views and photometric augmentation (``training.augment``), in workers or on the device."""

    global_count: int = 4
    global_size: int = 224
    global_scale: tuple[float, float] = (0.3, 1.0)
    local_count: int = 6
    local_size: int = 96
    local_scale: tuple[float, float] = (0.05, 0.3)
    # flip and photometric: training.augment_specs.ColorSpec holds the defaults (the official repository's)
    flip_prob: float = ColorSpec.flip_prob
    jitter_prob: float = ColorSpec.jitter_prob
    brightness: float = ColorSpec.brightness
    contrast: float = ColorSpec.contrast
    saturation: float = ColorSpec.saturation
    grayscale_prob: float = ColorSpec.grayscale_prob
    blur_prob: float = ColorSpec.blur_prob
    solarize_prob: float = ColorSpec.solarize_prob
    augment_on: Literal["workers", "device"] = "workers"


@dataclass(frozen=True)
class LossSection:
    """Objective and its settings; the per-loss mappings hold extra constructor arguments of each loss.

    ``reg_weight`` (lambda), ``num_slices`` and ``slice_mode`` are passed to every loss whose constructor
    takes them, so ``loss.name=sigreg`` compares losses under the same budget without editing the file.
    """

    name: Literal["visreg", "sigreg", "swd", "vicreg", "barlow"] = "visreg"
    reg_weight: float = 0.9
    num_slices: int = 4096
    slice_mode: Literal["partition", "replicate", "local"] = "partition"
    visreg: dict[str, Any] = field(default_factory=dict)
    sigreg: dict[str, Any] = field(default_factory=dict)
    swd: dict[str, Any] = field(default_factory=dict)
    vicreg: dict[str, Any] = field(default_factory=dict)
    barlow: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OptimSection:
    """AdamW (no decay on norms, biases, position embedding, CLS/register tokens), warmup + cosine."""

    lr: float = 9e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_epochs: float = 5.0
    warmup_steps: int | None = None
    min_lr_ratio: float = 1e-3
    clip_grad_norm: float = 1.0
    probe_lr: float = 2e-2
    probe_weight_decay: float = 1e-6


@dataclass(frozen=True)
class TrainSection:
    """Run length, batch plan, precision, logging and checkpoint cadence (steps are optimiser steps)."""

    output_dir: str = "runs/visreg"
    seed: int = 0
    epochs: int = 100
    max_steps: int | None = None
    stop_after: int | None = None
    global_batch_size: int = 128
    per_device_batch_size: int = 16
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"
    compile: bool = False
    log_every: int = 10
    checkpoint_every: int = 1000
    keep_last: int = 3
    export_every: int = 0
    progress_bar: bool = True
    log_with: Literal["tensorboard", "none"] = "tensorboard"
    online_probe: bool = True


@dataclass(frozen=True)
class EvalSection:
    """Periodic frozen-feature kNN on the validation split (bank: labelled training images)."""

    knn_every: int = 0
    knn_k: int = 20
    knn_temperature: float = 0.07
    knn_bank_size: int = 10000
    batch_size: int = 256


@dataclass(frozen=True)
class MonitorSection:
    """Health statistics and the collapse alarm (see ``training.monitor``)."""

    min_std: float = 0.05
    min_rank: float = 1.5
    stop_on_collapse: bool = False
    collapse_patience: int = 3
    gaussianity_slices: int = 64


@dataclass(frozen=True)
class DebugSection:
    """Test hooks: projector output NaN at step ``nan_at_step`` on rank ``nan_rank`` (None: every rank)."""

    nan_at_step: int | None = None
    nan_rank: int | None = None


@dataclass(frozen=True)
class TrainingConfig:
    """The whole training configuration."""

    model: ModelSection = field(default_factory=ModelSection)
    projector: ProjectorSection = field(default_factory=ProjectorSection)
    data: DataSection = field(default_factory=DataSection)
    augment: AugmentSection = field(default_factory=AugmentSection)
    loss: LossSection = field(default_factory=LossSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    monitor: MonitorSection = field(default_factory=MonitorSection)
    debug: DebugSection = field(default_factory=DebugSection)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists), suitable for YAML/JSON and for :func:`from_dict`."""
        return _plain(dataclasses.asdict(self))

    def replace(self, **sections: Any) -> TrainingConfig:
        """Copy with sections changed by dotted-key overrides, e.g. ``replace(**{"train.seed": 1})``."""
        raw = self.to_dict()
        for key, value in sections.items():
            _set_dotted(raw, key, value)
        return from_dict(raw)


# ---------------------------------------------------------------------------------------------- building
def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against the type hint ``hint`` and convert YAML spellings (``9e-4`` is a str)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [arg for arg in args if arg is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(value, option, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is Literal:
        if isinstance(value, bool) and ("no" if value is False else "yes") in args:
            value = "no" if value is False else "yes"  # YAML 1.1 reads an unquoted no / yes as a boolean
        if value not in args:
            raise ConfigError(f"{key}={value!r} is not allowed; choose one of {list(args)}.")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} must be a list like {_example(args)}, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(item, args[0], key) for item in value)
        if len(value) != len(args):
            raise ConfigError(f"{key} must have {len(args)} values like {_example(args)}, got {value!r}")
        return tuple(_coerce(item, arg, key) for item, arg in zip(value, args))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of settings, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {hint!r}")  # pragma: no cover - schema bug


def _example(args: tuple) -> str:
    return "[" + ", ".join("0.3" if arg is float else "1" for arg in args if arg is not Ellipsis) + "]"


def _build(cls: type, data: Any, prefix: str) -> Any:
    """Instantiate dataclass ``cls`` from a mapping, checking keys and types recursively."""
    where = prefix or "the config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            full = f"{prefix}.{key}" if prefix else key
            dotted = [f"{prefix}.{name}" if prefix else name for name in names]
            raise ConfigError(
                f"unknown config key {full!r}.{did_you_mean(full, dotted)} Valid keys of {where}: {names}"
            )
    kwargs = {
        key: _coerce(value, hints[key], f"{prefix}.{key}" if prefix else key) for key, value in data.items()
    }
    return cls(**kwargs)


def from_dict(data: dict[str, Any]) -> TrainingConfig:
    """Build and validate a :class:`TrainingConfig` from a nested mapping."""
    config = _build(TrainingConfig, data, "")
    validate(config)
    return config


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {dotted!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(items: typing.Sequence[str]) -> dict[str, Any]:
    """``["optim.lr=5e-4", "loss.name=sigreg"]`` -> ``{"optim.lr": 0.0005, "loss.name": "sigreg"}``."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. optim.lr=5e-4")
        try:
            overrides[key.strip()] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from None
    return overrides


def _check_unique_keys(root: yaml.Node | None, path: Path) -> None:
    """Refuse a key given twice in one mapping of a composed YAML document.

    why: YAML's last-one-wins would silently drop the first value, and a repeated section (a second
    ``optim:``) every key of the first one.
    """
    stack, seen_nodes = ([root] if root is not None else []), set()
    while stack:
        node = stack.pop()
        if id(node) in seen_nodes:  # anchors make shared (even cyclic) nodes
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            lines: dict[Any, int] = {}
            for key_node, value_node in node.value:
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else id(key_node)
                line = key_node.start_mark.line + 1
                if key in lines:
                    raise ConfigError(
                        f"{path}: key {key!r} appears twice in one section (lines {lines[key]} and {line}); "
                        "keep one"
                    )
                lines[key] = line
                stack.append(value_node)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if path.is_dir():
        raise ConfigError(f"config {str(path)!r} is a folder; pass a YAML file (presets: training/configs/)")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; presets are in training/configs/")
    if path in seen:
        raise ConfigError(f"config {path} extends itself through {[str(p) for p in seen]}")
    try:
        text = path.read_text(encoding="utf-8")
        _check_unique_keys(yaml.compose(text, Loader=yaml.SafeLoader), path)
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    merged = _read_yaml((path.parent / str(parent)).resolve(), (*seen, path))
    _merge(merged, data)
    return merged


def _merge(base: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> TrainingConfig:
    """Read a YAML config (or the defaults when ``path`` is None) and apply ``key=value`` overrides.

    Raises:
        ConfigError: the file is missing or malformed, a key is unknown, or a value is invalid.
    """
    raw = _read_yaml(Path(path).resolve()) if path is not None else {}
    for key, value in parse_overrides(overrides).items():
        _set_dotted(raw, key, value)
    return from_dict(raw)
