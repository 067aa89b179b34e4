"""Limits checked before anything is allocated: known architectures, field bounds, a memory budget.

A ``config.json`` is untrusted input: ``depth=10000`` or ``img_size=4096, patch_size=1`` would otherwise
allocate gigabytes before the weights file is even looked at. Three layers, all cheap (no timm model is
built, no tensor allocated):

1. :func:`check_architecture`: only timm Vision Transformer names (``vit_*`` in timm's
   ``vision_transformer`` module) reach ``timm.create_model``; ``hf-hub:``/``local-dir:`` prefixes and any
   other string are refused, so a local load can never make timm download or read elsewhere.
2. Hard bounds on each field (:data:`FIELD_BOUNDS`, enforced by ``ModelConfig`` itself).
3. :func:`check_budget`: closed-form parameter count and per-image activation memory
   (:func:`estimate`) against :class:`ModelLimits` (defaults :data:`DEFAULT_MAX_PARAMS` parameters and
   :data:`DEFAULT_MAX_ACTIVATION_BYTES` per image); pass ``limits=ModelLimits(...)`` to load more.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from visreg_hub.errors import ConfigError

# Images: decoded pixels per image (width * height) above which decoding is refused, read from the header
# before any pixel is decoded. Pillow's own default warning threshold (about 89 Mpx: a 1 GiB RGBA buffer / 3).
# Here, not in visreg_hub.inference.images, so that the model's ``encode`` signature can show the default.
DEFAULT_MAX_PIXELS = 1024 * 1024 * 1024 // 4 // 3

# Largest released ViTs: ViT-G/14 1.8 B, ViT-7B (DINOv3) 6.7 B parameters; the default admits the former.
DEFAULT_MAX_PARAMS = 3_000_000_000
DEFAULT_MAX_ACTIVATION_BYTES = 8 * 1024**3  # float32 peak of one image's forward pass
# Inclusive upper bounds of ModelConfig fields (every released ViT is far inside them).
FIELD_BOUNDS = {
    "img_size": 8192,
    "patch_size": 1024,
    "embed_dim": 16384,
    "depth": 512,
    "num_heads": 1024,
    "in_chans": 64,
    "num_reg_tokens": 1024,
    "mlp_ratio": 64.0,
}
# Smallest crop_pct: preprocessing resizes to img_size / crop_pct before the centre crop, so a tiny value
# from an untrusted config would resize every image to an enormous intermediate (timm's models use 0.875-1).
MIN_CROP_PCT = 0.05
_NAME = re.compile(r"^vit_[a-z0-9_]{1,120}$")


@dataclass(frozen=True)
class ModelLimits:
    """The budget a model built from an untrusted config must fit.

    Attributes:
        max_params: most backbone parameters (``None``: no limit).
        max_activation_bytes: most float32 activation bytes for one image at ``img_size`` (``None``: no
            limit).
    """

    max_params: int | None = DEFAULT_MAX_PARAMS
    max_activation_bytes: int | None = DEFAULT_MAX_ACTIVATION_BYTES

    def __post_init__(self) -> None:
        for name in ("max_params", "max_activation_bytes"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ConfigError(f"ModelLimits.{name} must be a non-negative integer or None, got {value!r}")


@dataclass(frozen=True)
class Estimate:
    """Closed-form size of a timm ViT backbone (no head).

    Attributes:
        params: parameter count.
        tokens: sequence length T = grid cells + CLS + register tokens.
        activation_bytes: float32 peak of one image's forward pass: one block's attention scores
            (heads x T x T), MLP hidden (T x H) and a few (T x D) buffers.
    """

    params: int
    tokens: int
    activation_bytes: int


@functools.lru_cache(maxsize=1)
def known_architectures() -> frozenset[str]:
    """timm's ``vit_*`` model names from its ``vision_transformer`` module (no pretrained tags)."""
    import timm

    return frozenset(
        name for name in timm.list_models(module="vision_transformer") if name.startswith("vit_")
    )


def check_architecture_name(architecture: object) -> None:
    """Syntax-only check (no timm import): a plain ``vit_*`` name, no prefix, path or tag.

    Raises:
        ConfigError: anything else, e.g. ``hf-hub:org/repo`` or ``local-dir:/path``.
    """
    if not isinstance(architecture, str) or not _NAME.match(architecture):
        raise ConfigError(
            f"architecture {architecture!r} is not a timm Vision Transformer name (vit_*); visreg_hub builds "
            "only known ViT architectures and never follows hf-hub:/local-dir: names from a config"
        )


def check_architecture(architecture: object) -> None:
    """:func:`check_architecture_name` plus membership in timm's ViT registry and a CLS token.

    Raises:
        ConfigError: not a known timm ViT architecture (close names are suggested), or one that timm builds
            without a CLS token (``*_gap_*``, ``*_siglip_*``, ...).
    """
    check_architecture_name(architecture)
    known = known_architectures()
    if architecture not in known:
        from visreg_hub.suggest import did_you_mean

        raise ConfigError(
            f"architecture {architecture!r} is not a timm Vision Transformer this version of timm knows; "
            f"use one of timm.list_models('vit_*').{did_you_mean(architecture, known)}"
        )
    check_class_token(architecture)


def check_class_token(architecture: str) -> None:
    """Refuse a timm ViT built without a CLS token: every visreg_hub pooling reads that token.

    Raises:
        ConfigError: naming the architecture and the fix. Without this check timm's own refusal is an
            ``assert`` (an AssertionError, or nothing at all under ``python -O``).
    """
    if has_class_token(architecture) is False:
        raise ConfigError(
            f"architecture {architecture!r} has no CLS token (timm builds it with class_token=False, e.g. "
            "a *_gap_* or *_siglip_* variant); visreg_hub loads ViTs with class_token=True: name a ViT "
            "with a class token, such as vit_small_patch16_224"
        )


@functools.lru_cache(maxsize=256)
def has_class_token(architecture: str) -> bool | None:
    """Whether timm builds ``architecture`` with a CLS token; None when timm cannot build it at all.

    Read from a one-block build on the meta device (no memory, a few milliseconds) without a pooling head:
    ``global_pool=""`` keeps timm's "token pooling needs the class token" assert out of the way.
    """
    import timm
    import torch

    try:
        with torch.device("meta"):
            probe = timm.create_model(architecture, pretrained=False, num_classes=0, global_pool="", depth=1)
    except Exception:  # why: not ours to judge; the real build reports it with the config's arguments
        return None
    return getattr(probe, "cls_token", None) is not None


def check_field_bounds(values: dict) -> None:
    """Type and bound checks of the size fields present in ``values`` (ModelConfig field names).

    Raises:
        ConfigError: a wrong type, or a value above :data:`FIELD_BOUNDS`, naming the field.
    """
    for name, bound in FIELD_BOUNDS.items():
        if name not in values:
            continue
        value = values[name]
        numeric = (int, float) if isinstance(bound, float) else (int,)
        lower = 0 if name == "num_reg_tokens" else (1e-9 if isinstance(bound, float) else 1)
        if isinstance(value, bool) or not isinstance(value, numeric) or not lower <= value <= bound:
            kind = "a number" if isinstance(bound, float) else "an integer"
            raise ConfigError(
                f"{name}={value!r} is out of range: expected {kind} in [{lower:g}, {bound:g}]; "
                "fix the model configuration"
            )


def estimate(
    img_size: int,
    patch_size: int,
    embed_dim: int,
    depth: int,
    num_heads: int,
    in_chans: int = 3,
    mlp_ratio: float = 4.0,
    num_reg_tokens: int = 0,
    qkv_bias: bool = True,
    init_values: float | None = None,
) -> Estimate:
    """Parameters and activation memory of timm's ``VisionTransformer`` with these arguments.

    Exact for the standard layout (patch conv, CLS + register tokens, learned position embedding over
    every token, pre-norm blocks with qkv/proj attention and a 2-layer MLP, final norm, no head).
    """
    grid = img_size // patch_size
    tokens = grid * grid + 1 + num_reg_tokens
    dim, hidden = embed_dim, int(embed_dim * mlp_ratio)
    embed = in_chans * patch_size * patch_size * dim + dim  # patch projection
    embed += dim * (1 + num_reg_tokens) + tokens * dim  # cls + registers + position embedding
    block = 2 * dim + (dim * 3 * dim + (3 * dim if qkv_bias else 0)) + dim * dim + dim  # norm1, attention
    block += 2 * dim + dim * hidden + hidden + hidden * dim + dim  # norm2, MLP
    block += 2 * dim if init_values else 0  # LayerScale
    params = embed + depth * block + 2 * dim
    activation = 4 * (num_heads * tokens * tokens + tokens * hidden + 4 * tokens * dim)
    return Estimate(params=params, tokens=tokens, activation_bytes=activation)


def estimate_config(config) -> Estimate:
    """:func:`estimate` for a :class:`~visreg_hub.models.ModelConfig`."""
    return estimate(
        config.img_size,
        config.patch_size,
        config.embed_dim,
        config.depth,
        config.num_heads,
        config.in_chans,
        config.mlp_ratio,
        config.num_reg_tokens,
        config.qkv_bias,
        config.init_values,
    )


def check_budget(
    config, limits: ModelLimits | None = None, source: str = "the configuration", fix: str | None = None
) -> Estimate:
    """Refuse a config whose model exceeds ``limits`` before anything is built.

    Args:
        config: a :class:`~visreg_hub.models.ModelConfig`.
        limits: the budget (default :class:`ModelLimits`).
        source: names the config in the message.
        fix: what the user should do instead of the default hint (pass a larger ``ModelLimits``).

    Raises:
        ConfigError: over budget; the message gives the estimate, the limit and the override.
    """
    limits = ModelLimits() if limits is None else limits
    if not isinstance(limits, ModelLimits):
        raise ConfigError(f"limits must be a ModelLimits (or None), got {type(limits).__name__}")
    size = estimate_config(config)
    if limits.max_params is not None and size.params > limits.max_params:
        raise ConfigError(
            f"{source} describes a {_count(size.params, limits.max_params)}-parameter model, over the limit "
            f"of {_count(limits.max_params, size.params)}; "
            + (fix or "if you trust it, pass limits=ModelLimits(max_params=...)")
        )
    if limits.max_activation_bytes is not None and size.activation_bytes > limits.max_activation_bytes:
        raise ConfigError(
            f"{source} needs about {_bytes(size.activation_bytes)} of activations per image "
            f"({size.tokens} tokens), over the limit of {_bytes(limits.max_activation_bytes)}; "
            + (fix or "if you trust it, pass limits=ModelLimits(max_activation_bytes=...)")
        )
    return size


def _count(n: int, other: int) -> str:
    """``3.00 B``, ``86.6 M`` or ``1,234``: a parameter count in the unit that shows it, exact when rounding
    would print it as the ``other`` count it is compared with."""

    def rounded(value: int) -> str:
        if value >= 999_950_000:  # from here on "M" would read 1000.0
            return f"{value / 1e9:.2f} B"
        return f"{value / 1e6:.1f} M" if value >= 1_000_000 else ""

    short = rounded(n)
    return short if short and short != rounded(other) else f"{n:,}"


def _bytes(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n:,} bytes"
