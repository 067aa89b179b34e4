"""Encoder architecture: configuration, timm ViT with VISReg feature taps, training projector.

The names below are imported on first use (:mod:`visreg_hub._lazy`): a config is read without timm.
"""

from __future__ import annotations

from visreg_hub._lazy import lazy_exports

_EXPORTS = {
    "NAMED_SIZES": "visreg_hub.models.config",
    "PATCH_POOLING": "visreg_hub.models.config",
    "POOLINGS": "visreg_hub.models.config",
    "ModelConfig": "visreg_hub.models.config",
    "poolings_for_depth": "visreg_hub.models.config",
    "ModelLimits": "visreg_hub.models.limits",
    "Projector": "visreg_hub.models.projector",
    "VISRegEncoder": "visreg_hub.models.encoder",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
