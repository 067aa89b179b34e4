"""Checkpoints: load by name (registry, Hub, folder), save, push, convert the official release."""

from visreg_hub.hub.loading import from_pretrained
from visreg_hub.hub.registry import RegistryEntry, list_models
from visreg_hub.hub.saving import push_to_hub, save_pretrained

__all__ = ["RegistryEntry", "from_pretrained", "list_models", "push_to_hub", "save_pretrained"]
