"""Loss modules live one family per file; the old import path ``visreg_hub.losses.modules`` still works."""

from __future__ import annotations

import importlib

import visreg_hub.losses as losses

FAMILIES = {
    "visreg_hub.losses.visreg": ("VISRegLoss", "VISRegOutput"),
    "visreg_hub.losses.swd": ("SWDLoss", "SWDOutput"),
    "visreg_hub.losses.lejepa": ("SIGRegLoss", "SIGRegOutput"),
    "visreg_hub.losses.pairwise": ("VICRegLoss", "VICRegOutput", "BarlowTwinsLoss", "BarlowTwinsOutput"),
}


def test_old_and_new_import_paths_give_the_same_classes():
    modules = importlib.import_module("visreg_hub.losses.modules")
    exported = set()
    for path, names in FAMILIES.items():
        family = importlib.import_module(path)
        for name in names:
            cls = getattr(family, name)
            assert cls.__module__ == path  # defined there, not re-exported from elsewhere
            assert getattr(losses, name) is cls and getattr(modules, name) is cls
            exported.add(name)
    assert set(modules.__all__) == exported
    assert exported <= set(losses.__all__)
