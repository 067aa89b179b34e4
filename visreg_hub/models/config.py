"""ModelConfig: everything needed to rebuild a VISReg encoder and preprocess its inputs.

A ``ModelConfig`` is a frozen dataclass that round-trips through JSON. It names a timm Vision
Transformer architecture plus the arguments that override it (image size, patch size, width, depth,
heads, register tokens, ...), the default feature tap (``pooling``), and the data configuration
(mean, std, crop_pct, interpolation) that preprocessing derives its transforms from.

Named sizes (``ModelConfig.from_name``) cover the standard ViT family used by the paper and small
configurations for 28-64 px images (Fashion-MNIST, CIFAR, downsampled ImageNet).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visreg_hub.errors import ConfigError, ModelNotFoundError
from visreg_hub.models.limits import MIN_CROP_PCT, check_architecture_name, check_field_bounds
from visreg_hub.suggest import did_you_mean

DEFAULT_LICENSE = "apache-2.0"  # a model's licence unless its extra["license"] says otherwise

# Feature taps returning one vector per image; "patch" (a token grid) is served by ``patch_tokens``.
POOLINGS = ("cls", "cls_last2", "cls_last4", "mean_patch")
CROP_MODES = ("center", "squash", "border")  # timm's eval crop modes
# How many blocks' CLS tokens a tap concatenates (the others read one block): its width is embed_dim times
# this, and the encoder needs at least this depth.
POOLING_BLOCKS = {"cls_last2": 2, "cls_last4": 4}
PATCH_POOLING = "patch"


def poolings_for_depth(depth: int) -> tuple[str, ...]:
    """The taps of :data:`POOLINGS` an encoder with ``depth`` blocks can compute, in that order."""
    return tuple(p for p in POOLINGS if POOLING_BLOCKS.get(p, 1) <= depth)


INTERPOLATIONS = ("bicubic", "bilinear", "nearest")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Architecture tables are data: name -> arguments of ModelConfig. The timm architecture names carry
# the default patch size/width/depth; the explicit values make the config self-describing.
NAMED_SIZES: dict[str, dict[str, Any]] = {
    "vit-t16": dict(architecture="vit_tiny_patch16_224", patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "vit-s16": dict(
        architecture="vit_small_patch16_224", patch_size=16, embed_dim=384, depth=12, num_heads=6
    ),
    "vit-s8": dict(architecture="vit_small_patch8_224", patch_size=8, embed_dim=384, depth=12, num_heads=6),
    "vit-b16": dict(
        architecture="vit_base_patch16_224", patch_size=16, embed_dim=768, depth=12, num_heads=12
    ),
    "vit-l14": dict(
        architecture="vit_large_patch14_224", patch_size=14, embed_dim=1024, depth=24, num_heads=16
    ),
    "vit-h14": dict(
        architecture="vit_huge_patch14_224", patch_size=14, embed_dim=1280, depth=32, num_heads=16
    ),
    # Small images: patch 4 keeps a 7x7 / 8x8 / 16x16 token grid; the full frame is used (crop_pct 1).
    "vit-t4-28": dict(
        architecture="vit_tiny_patch16_224",
        img_size=28,
        patch_size=4,
        embed_dim=192,
        depth=12,
        num_heads=3,
        crop_pct=1.0,
    ),
    "vit-t4-32": dict(
        architecture="vit_tiny_patch16_224",
        img_size=32,
        patch_size=4,
        embed_dim=192,
        depth=12,
        num_heads=3,
        crop_pct=1.0,
    ),
    "vit-s4-32": dict(
        architecture="vit_small_patch16_224",
        img_size=32,
        patch_size=4,
        embed_dim=384,
        depth=12,
        num_heads=6,
        crop_pct=1.0,
    ),
    "vit-s4-64": dict(
        architecture="vit_small_patch16_224",
        img_size=64,
        patch_size=4,
        embed_dim=384,
        depth=12,
        num_heads=6,
        crop_pct=1.0,
    ),
    "vit-s8-64": dict(
        architecture="vit_small_patch8_224",
        img_size=64,
        patch_size=8,
        embed_dim=384,
        depth=12,
        num_heads=6,
        crop_pct=1.0,
    ),
}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture, default feature tap and data configuration of a VISReg encoder.

    Attributes:
        architecture: timm model name the backbone is created from, e.g. ``"vit_small_patch16_224"``.
        img_size: training / default input resolution (square), in pixels.
        patch_size: side of a square patch, in pixels; must divide ``img_size``.
        embed_dim: token width D.
        depth: number of transformer blocks.
        num_heads: attention heads; must divide ``embed_dim``.
        in_chans: input channels C.
        mlp_ratio: hidden width of the block MLP relative to ``embed_dim``.
        num_reg_tokens: register tokens appended after the CLS token (timm ``reg_tokens``).
        dynamic_img_size: accept inputs of any size divisible by ``patch_size`` (position embeddings are
            interpolated on the fly).
        qkv_bias: bias on the attention qkv projection (True in the standard ViT).
        init_values: LayerScale init value, or None for no LayerScale (standard ViT).
        drop_path_rate: stochastic depth used during training; inference ignores it.
        pooling: default feature tap of ``VISRegEncoder.forward``, one of ``POOLINGS``.
        mean: per-channel normalisation mean, length ``in_chans``.
        std: per-channel normalisation std, length ``in_chans``.
        crop_pct: centre-crop fraction used at evaluation (resize to ``img_size / crop_pct``, crop).
        interpolation: resize interpolation, one of ``INTERPOLATIONS``.
        crop_mode: how an image is fitted to ``img_size`` (timm's ``crop_mode``, one of ``CROP_MODES``):
            ``"center"`` resizes the shorter side and crops the centre, ``"squash"`` resizes both sides
            (aspect ratio not kept), ``"border"`` pads to a square.
        name: human-readable name (registry / named size), or None.
        extra: JSON-serialisable metadata: training recipe, loss and its settings, license, eval results.
    """

    architecture: str
    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    in_chans: int = 3
    mlp_ratio: float = 4.0
    num_reg_tokens: int = 0
    dynamic_img_size: bool = True
    qkv_bias: bool = True
    init_values: float | None = None
    drop_path_rate: float = 0.0
    pooling: str = "cls"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    crop_mode: str = "center"
    name: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # JSON gives lists; store tuples so the frozen config is hashable-ish and compares equal.
        for stat_name in ("mean", "std"):
            values = getattr(self, stat_name)
            if not isinstance(values, list | tuple) or not all(_is_number(v) for v in values):
                raise ConfigError(f"{stat_name} must be a list of numbers (one per channel), got {values!r}")
            object.__setattr__(self, stat_name, tuple(float(v) for v in values))
        if not isinstance(self.extra, dict):
            raise ConfigError(f"extra must be a dict of JSON values, got {type(self.extra).__name__}")
        object.__setattr__(self, "extra", dict(self.extra))
        self._validate()

    def _validate(self) -> None:
        check_architecture_name(self.architecture)
        check_field_bounds(dataclasses.asdict(self))
        for number_field in ("mlp_ratio", "drop_path_rate", "crop_pct"):
            if not _is_number(getattr(self, number_field)):
                raise ConfigError(f"{number_field} must be a number, got {getattr(self, number_field)!r}")
        if self.init_values is not None and not _is_number(self.init_values):
            raise ConfigError(f"init_values must be None or a number, got {self.init_values!r}")
        for flag in ("dynamic_img_size", "qkv_bias"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"{flag} must be true or false, got {getattr(self, flag)!r}")
        if self.name is not None and not isinstance(self.name, str):
            raise ConfigError(f"name must be a string or null, got {self.name!r}")
        if not isinstance(self.pooling, str) or not isinstance(self.interpolation, str):
            raise ConfigError(
                f"pooling and interpolation must be strings, got {self.pooling!r}, {self.interpolation!r}"
            )
        for int_field in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "in_chans"):
            value = getattr(self, int_field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{int_field} must be a positive integer, got {value!r}")
        if isinstance(self.num_reg_tokens, bool) or not isinstance(self.num_reg_tokens, int):
            raise ConfigError(f"num_reg_tokens must be an integer >= 0, got {self.num_reg_tokens!r}")
        if self.num_reg_tokens < 0:
            raise ConfigError(f"num_reg_tokens must be >= 0, got {self.num_reg_tokens}")
        if self.img_size % self.patch_size:
            raise ConfigError(
                f"img_size={self.img_size} is not divisible by patch_size={self.patch_size}; "
                f"use an img_size that is a multiple of {self.patch_size}"
            )
        if self.embed_dim % self.num_heads:
            raise ConfigError(
                f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}; "
                "choose num_heads dividing embed_dim"
            )
        if not (self.mlp_ratio > 0 and math.isfinite(self.mlp_ratio)):
            raise ConfigError(f"mlp_ratio must be a positive number, got {self.mlp_ratio!r}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate!r}")
        if self.init_values is not None and not self.init_values > 0:
            raise ConfigError(f"init_values must be None or > 0, got {self.init_values!r}")
        if self.pooling not in POOLINGS:
            raise ConfigError(
                f"pooling={self.pooling!r} is not a vector feature tap; use one of {POOLINGS} "
                f"(token grids come from VISRegEncoder.patch_tokens)"
            )
        min_depth = POOLING_BLOCKS.get(self.pooling, 1)
        if self.depth < min_depth:
            raise ConfigError(f"pooling={self.pooling!r} needs depth >= {min_depth}, got depth={self.depth}")
        for stat_name in ("mean", "std"):
            stats = getattr(self, stat_name)
            if len(stats) != self.in_chans:
                raise ConfigError(
                    f"{stat_name} has {len(stats)} values but in_chans={self.in_chans}; give one per channel"
                )
        if any(not s > 0 for s in self.std):
            raise ConfigError(f"std values must be > 0, got {self.std}")
        if not MIN_CROP_PCT <= self.crop_pct <= 1.0:
            raise ConfigError(f"crop_pct must be in [{MIN_CROP_PCT}, 1], got {self.crop_pct!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(f"interpolation={self.interpolation!r} is not one of {INTERPOLATIONS}")
        if self.crop_mode not in CROP_MODES:
            raise ConfigError(f"crop_mode={self.crop_mode!r} is not one of {CROP_MODES}")
        try:
            json.dumps(self.extra)
        except (TypeError, ValueError, RecursionError) as exc:
            raise ConfigError(
                f"extra must be JSON-serialisable (plain dicts, lists, numbers, str): {exc}"
            ) from None

    # ------------------------------------------------------------------ derived views
    @property
    def data_config(self) -> dict[str, Any]:
        """Preprocessing settings with timm's keys (``timm.data.resolve_data_config`` format)."""
        return {
            "input_size": (self.in_chans, self.img_size, self.img_size),
            "mean": self.mean,
            "std": self.std,
            "crop_pct": self.crop_pct,
            "interpolation": self.interpolation,
            "crop_mode": self.crop_mode,
        }

    def timm_pretrained_cfg(self) -> dict[str, Any]:
        """timm's ``pretrained_cfg`` for this model: its preprocessing (what
        ``timm.data.resolve_model_data_config`` and transformers' image processor read) and head fields.

        It names no weights location (``url``, ``hf_hub_id``): the weights are this model's own. The
        encoder's timm backbone carries it, and ``config.json`` stores it.
        """
        return {
            "input_size": [self.in_chans, self.img_size, self.img_size],
            "fixed_input_size": not self.dynamic_img_size,
            "interpolation": self.interpolation,
            "crop_pct": self.crop_pct,
            "crop_mode": self.crop_mode,
            "mean": list(self.mean),
            "std": list(self.std),
            "num_classes": 0,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
            "license": self.extra.get("license", DEFAULT_LICENSE),
        }

    def timm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``timm.create_model`` (besides the name) that rebuild this backbone.

        These are also the ``model_args`` of the saved timm-compatible ``config.json``; the training-only
        ``drop_path_rate`` is left out so loaded checkpoints are deterministic at inference, and so are the
        head arguments (``num_classes``, ``global_pool``): timm's ``local-dir:`` loader and transformers'
        ``TimmWrapperModel`` pass ``num_classes`` themselves, and a second copy here breaks them.
        """
        return {
            "img_size": self.img_size,
            "patch_size": self.patch_size,
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "in_chans": self.in_chans,
            "mlp_ratio": self.mlp_ratio,
            "reg_tokens": self.num_reg_tokens,
            "dynamic_img_size": self.dynamic_img_size,
            "qkv_bias": self.qkv_bias,
            "init_values": self.init_values,
        }

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible dict of every field (tuples become lists)."""
        out = dataclasses.asdict(self)
        out["mean"] = list(self.mean)
        out["std"] = list(self.std)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a dict as written by :meth:`to_dict`.

        Raises:
            ConfigError: a key is not a field of ModelConfig, or a required field is missing.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"ModelConfig.from_dict expects a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            hints = "".join(did_you_mean(key, known) for key in unknown)
            raise ConfigError(f"unknown ModelConfig key(s) {unknown}; valid keys are {sorted(known)}.{hints}")
        required = {
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
        missing = sorted(required - set(data))
        if missing:
            raise ConfigError(f"ModelConfig is missing required key(s) {missing}")
        return cls(**data)

    def to_json(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as indented JSON and return the path."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return path

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        """Read a file written by :meth:`to_json`."""
        path = Path(path)
        if not path.is_file():
            raise ModelNotFoundError(f"no ModelConfig JSON at {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> ModelConfig:
        """Copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ named sizes
    @classmethod
    def available_names(cls) -> tuple[str, ...]:
        """Names accepted by :meth:`from_name`."""
        return tuple(NAMED_SIZES)

    @classmethod
    def from_name(cls, size_name: str, **overrides: Any) -> ModelConfig:
        """Config of a named size, e.g. ``ModelConfig.from_name("vit-s16", img_size=128)``.

        Args:
            size_name: one of :meth:`available_names` (``vit-t16``, ``vit-s16``, ``vit-s8``, ``vit-b16``,
                ``vit-l14``, ``vit-h14``, ``vit-t4-28``, ``vit-t4-32``, ``vit-s4-32``, ``vit-s4-64``,
                ``vit-s8-64``).
            **overrides: any ModelConfig field.

        Raises:
            ConfigError: unknown size name (with close matches) or unknown override key.
        """
        key = size_name.lower().replace("_", "-").replace("/", "")
        if key not in NAMED_SIZES:
            raise ConfigError(
                f"unknown model size {size_name!r}; choose one of {list(NAMED_SIZES)}."
                + did_you_mean(key, NAMED_SIZES)
            )
        base: dict[str, Any] = {"img_size": 224, "name": key}
        base.update(NAMED_SIZES[key])
        base.update(overrides)
        return cls.from_dict(base)
