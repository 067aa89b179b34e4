"""Checkpoints: load by name (registry, Hub, folder), save, push, convert the official release.

The names below are imported on first use (:mod:`visreg_hub._lazy`): the registry is read without torch,
so ``visreg-hub list`` and ``--help`` answer at once.
"""

from __future__ import annotations

from visreg_hub._lazy import lazy_exports

_EXPORTS = {
    "from_pretrained": "visreg_hub.hub.loading",
    "RegistryEntry": "visreg_hub.hub.registry",
    "list_models": "visreg_hub.hub.registry",
    "push_to_hub": "visreg_hub.hub.saving",
    "save_pretrained": "visreg_hub.hub.saving",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
