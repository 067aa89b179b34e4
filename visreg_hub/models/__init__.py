"""Encoder architecture: configuration, timm ViT with VISReg feature taps, training projector."""

from visreg_hub.models.config import NAMED_SIZES, PATCH_POOLING, POOLINGS, ModelConfig, poolings_for_depth
from visreg_hub.models.encoder import VISRegEncoder
from visreg_hub.models.limits import ModelLimits
from visreg_hub.models.projector import Projector

__all__ = [
    "NAMED_SIZES",
    "PATCH_POOLING",
    "POOLINGS",
    "ModelConfig",
    "ModelLimits",
    "Projector",
    "VISRegEncoder",
    "poolings_for_depth",
]
