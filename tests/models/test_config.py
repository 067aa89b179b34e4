"""ModelConfig: validation, JSON round trip, named sizes, data config."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform

from tests.fixtures_models import tiny_config
from visreg_hub.errors import ConfigError
from visreg_hub.models import NAMED_SIZES, ModelConfig, VISRegEncoder


def expected_vit_param_count(cfg: ModelConfig) -> int:
    """Closed-form parameter count of a standard pre-norm ViT without head (independent of timm)."""
    dim, hidden = cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio)
    num_patches = (cfg.img_size // cfg.patch_size) ** 2
    patch_embed = cfg.in_chans * cfg.patch_size**2 * dim + dim
    tokens = dim + (1 + num_patches) * dim + cfg.num_reg_tokens * dim  # cls, pos (cls + patches), registers
    block = (
        2 * 2 * dim
        + (3 * dim * dim + 3 * dim)
        + (dim * dim + dim)
        + (dim * hidden + hidden + hidden * dim + dim)
    )
    return patch_embed + tokens + cfg.depth * block + 2 * dim


def test_json_round_trip_preserves_every_field(tmp_path):
    cfg = tiny_config(
        num_reg_tokens=2, pooling="mean_patch", extra={"loss": {"name": "visreg", "reg_weight": 0.9}}
    )
    path = cfg.to_json(tmp_path / "cfg.json")
    loaded = ModelConfig.from_json(path)
    assert loaded == cfg
    assert json.loads(path.read_text())["mean"] == list(cfg.mean)  # tuples stored as JSON lists


def test_unknown_key_is_named_in_error():
    data = tiny_config().to_dict()
    data["embed_dimm"] = 64
    with pytest.raises(ConfigError, match="embed_dimm") as info:
        ModelConfig.from_dict(data)
    assert "embed_dim" in str(info.value)  # close-match suggestion


@pytest.mark.parametrize(
    ("overrides", "field_name"),
    [
        ({"img_size": 30}, "img_size"),
        ({"num_heads": 3}, "num_heads"),
        ({"pooling": "avg"}, "pooling"),
        ({"pooling": "cls_last4"}, "depth"),
        ({"mean": (0.5, 0.5)}, "mean"),
        ({"std": (0.5, 0.0, 0.5)}, "std"),
        ({"crop_pct": 1.5}, "crop_pct"),
        ({"interpolation": "cubic"}, "interpolation"),
        ({"depth": 0}, "depth"),
        ({"extra": {"bad": object()}}, "extra"),
    ],
)
def test_invalid_values_raise_config_error_naming_the_field(overrides, field_name):
    with pytest.raises(ConfigError, match=field_name):
        tiny_config(**overrides)


def test_config_is_frozen():
    cfg = tiny_config()
    with pytest.raises(AttributeError):
        cfg.depth = 3  # type: ignore[misc]


def test_unknown_size_name_suggests_close_names():
    with pytest.raises(ConfigError, match="vit-s16"):
        ModelConfig.from_name("vit-s61")


def test_from_name_applies_overrides():
    cfg = ModelConfig.from_name("vit-s16", img_size=128, pooling="cls_last4")
    assert (cfg.img_size, cfg.embed_dim, cfg.pooling, cfg.name) == (128, 384, "cls_last4", "vit-s16")


@pytest.mark.parametrize("size_name", sorted(NAMED_SIZES))
def test_every_named_size_builds_with_the_expected_parameter_count(size_name):
    cfg = ModelConfig.from_name(size_name)
    with torch.device("meta"):  # no allocation: ViT-H/14 has 630M parameters
        model = VISRegEncoder(cfg)
    num_params = sum(p.numel() for p in model.parameters())
    assert num_params == expected_vit_param_count(cfg)
    assert model.backbone.patch_embed.proj.kernel_size == (cfg.patch_size, cfg.patch_size)
    if cfg.img_size == 224:
        # the timm architecture's own defaults describe the same network
        with torch.device("meta"):
            reference = timm.create_model(cfg.architecture, pretrained=False, num_classes=0)
        assert num_params == sum(p.numel() for p in reference.parameters())


def test_standard_sizes_match_the_paper_family():
    widths = {name: (NAMED_SIZES[name]["embed_dim"], NAMED_SIZES[name]["patch_size"]) for name in NAMED_SIZES}
    assert widths["vit-b16"] == (768, 16)
    assert widths["vit-l14"] == (1024, 14)
    assert widths["vit-h14"] == (1280, 14)
    assert widths["vit-s8"] == (384, 8)
    assert {28, 32, 64} <= {NAMED_SIZES[n].get("img_size", 224) for n in NAMED_SIZES}


def test_data_config_drives_timm_transforms():
    cfg = tiny_config(img_size=32, interpolation="bilinear", crop_pct=0.875)
    data_config = cfg.data_config
    assert data_config["input_size"] == (3, 32, 32)
    assert data_config["crop_mode"] == "center"
    transform = create_transform(**data_config, is_training=False)
    image = Image.new("RGB", (50, 40), color=(255, 255, 255))
    tensor = transform(image)
    assert tuple(tensor.shape) == (3, 32, 32)
    # white pixels normalised with the config's mean/std
    expected = (1.0 - cfg.mean[0]) / cfg.std[0]
    assert torch.allclose(tensor, torch.full_like(tensor, expected), atol=1e-5)
