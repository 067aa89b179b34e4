"""Closed-form model size against timm's own modules, bounds and the budget."""

from __future__ import annotations

import pytest
import torch

from tests.fixtures_models import tiny_config
from visreg_hub.errors import ConfigError
from visreg_hub.models import ModelConfig
from visreg_hub.models.limits import (
    FIELD_BOUNDS,
    ModelLimits,
    check_architecture,
    check_budget,
    estimate_config,
)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"num_reg_tokens": 4, "init_values": 1e-5},
        {"qkv_bias": False, "mlp_ratio": 2.5, "in_chans": 1, "mean": (0.5,), "std": (0.5,)},
        {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 3, "num_heads": 3},
    ],
)
def test_parameter_estimate_equals_timm_numel(overrides):
    """Reference: timm builds the backbone on the meta device; the estimate must equal its numel."""
    import timm

    config = tiny_config(**overrides)
    with torch.device("meta"):
        backbone = timm.create_model(
            config.architecture, pretrained=False, num_classes=0, **config.timm_kwargs()
        )
    assert estimate_config(config).params == sum(p.numel() for p in backbone.parameters())


@pytest.mark.parametrize("size", ["vit-s16", "vit-b16", "vit-l14", "vit-h14"])
def test_parameter_estimate_of_the_named_sizes(size):
    import timm

    config = ModelConfig.from_name(size)
    with torch.device("meta"):
        backbone = timm.create_model(
            config.architecture, pretrained=False, num_classes=0, **config.timm_kwargs()
        )
    assert estimate_config(config).params == sum(p.numel() for p in backbone.parameters())


def test_activation_estimate_is_the_attention_matrix_and_mlp():
    config = ModelConfig.from_name("vit-b16")  # 197 tokens, 12 heads, hidden 3072, width 768
    expected = 4 * (12 * 197 * 197 + 197 * 3072 + 4 * 197 * 768)
    assert estimate_config(config).tokens == 197 and estimate_config(config).activation_bytes == expected


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("depth", 10_000),
        ("embed_dim", 1 << 20),
        ("num_reg_tokens", 100_000),
        ("mlp_ratio", 1e6),
        ("img_size", 1 << 20),
        ("depth", 12.0),
        ("depth", True),
        ("embed_dim", "768"),
    ],
)
def test_field_bounds_and_types(field, value):
    with pytest.raises(ConfigError, match=field):
        tiny_config(**{field: value})


def test_bounds_are_inclusive_and_documented():
    assert FIELD_BOUNDS["depth"] >= 48 and FIELD_BOUNDS["embed_dim"] >= 6144  # ViT-G/ViT-7B sizes fit
    tiny_config(depth=FIELD_BOUNDS["depth"], embed_dim=32)  # the bound itself is accepted


def test_budget_refuses_parameters_and_activations_and_can_be_overridden():
    huge = ModelConfig.from_name("vit-h14", depth=128)  # 2.5 B parameters: under the default
    assert check_budget(huge).params > 2e9
    with pytest.raises(ConfigError, match=r"B-parameter model, over the limit.*ModelLimits"):
        check_budget(huge, ModelLimits(max_params=1_000_000_000))
    wide_image = tiny_config(img_size=4096, patch_size=4)  # 1M tokens: ~4 TiB of attention scores
    with pytest.raises(ConfigError, match="GiB of activations per image"):
        check_budget(wide_image)
    assert check_budget(wide_image, ModelLimits(max_activation_bytes=None)).tokens == 1024 * 1024 + 1
    # a small limit is printed in a unit that shows it (it read "a 0.00 B-parameter model, over 0.00 B")
    params = check_budget(tiny_config(), ModelLimits(max_params=None)).params
    with pytest.raises(ConfigError, match=rf"describes a {params:,}-parameter model, over the limit of 10;"):
        check_budget(tiny_config(), ModelLimits(max_params=10))
    with pytest.raises(ConfigError, match="limits must be a ModelLimits"):
        check_budget(tiny_config(), "x")
    huge_params = check_budget(huge).params  # rounded alike ("2.5 B over 2.5 B"): both exact (review 18)
    with pytest.raises(ConfigError, match=rf"a {huge_params:,}-parameter model, over the limit of "
                                          rf"{huge_params - 1:,};"):  # fmt: skip
        check_budget(huge, ModelLimits(max_params=huge_params - 1))
    for bad in ("10", -1, 1.5, float("nan"), True):
        with pytest.raises(ConfigError, match="must be a non-negative integer or None"):
            ModelLimits(max_params=bad)


@pytest.mark.parametrize(
    "name",
    ["hf-hub:timm/vit_tiny_patch16_224", "local-dir:/tmp/x", "resnet50", "vit_tiny_patch16_224.augreg_in21k",
     "vit_nonexistent_model", "", "VIT_TINY_PATCH16_224", "vit_tiny/../x", None, 3],
)  # fmt: skip
def test_only_known_vit_architectures(name):
    with pytest.raises(ConfigError, match="not a timm Vision Transformer"):
        check_architecture(name)


def test_known_architectures_pass():
    for name in ("vit_tiny_patch16_224", "vit_base_patch16_224", "vit_small_patch8_224"):
        check_architecture(name)
