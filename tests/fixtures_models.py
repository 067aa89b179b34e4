"""Tiny model builders shared by every test package (import, not fixtures, so any test can call them).

from tests.fixtures_models import tiny_config, tiny_encoder
"""

from __future__ import annotations

import torch

from visreg_hub.models import ModelConfig, VISRegEncoder

# Fashion-MNIST statistics (grayscale replicated to 3 channels).
FMNIST_MEAN = (0.2860, 0.2860, 0.2860)
FMNIST_STD = (0.3530, 0.3530, 0.3530)


def tiny_config(**overrides) -> ModelConfig:
    """A 2-block, 32-wide ViT on 28 px images with 4 px patches (7x7 grid); any field can be overridden."""
    fields = dict(
        architecture="vit_tiny_patch16_224",
        img_size=28,
        patch_size=4,
        embed_dim=32,
        depth=2,
        num_heads=2,
        mlp_ratio=2.0,
        mean=FMNIST_MEAN,
        std=FMNIST_STD,
        crop_pct=1.0,
        name="tiny-test",
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def tiny_encoder(seed: int = 0, **overrides) -> VISRegEncoder:
    """A randomly initialised tiny encoder in eval mode; the same seed gives the same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VISRegEncoder(tiny_config(**overrides))
    return model.eval()
