"""Lazy package exports, so that importing a package (or running ``visreg-hub list``) does not pay for torch
and timm (seconds on a small CPU) until a name that needs them is used.

A package lists its public names and the module defining each; the module is imported on first access::

    __getattr__, __dir__ = lazy_exports(__name__, {"from_pretrained": "visreg_hub.hub.loading"})
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list]]:
    """The module-level ``__getattr__`` and ``__dir__`` of ``package`` for ``exports`` (name -> module)."""

    # the names Python looks up on a module (PEP 562), hence the dunders
    def __getattr__(name: str) -> object:  # noqa: N807
        module_name = exports.get(name)
        if module_name is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module_name), name)
        vars(sys.modules[package])[name] = value  # cache: __getattr__ runs once per name
        return value

    def __dir__() -> list[str]:  # noqa: N807
        # the public names only: not the helpers a package imports for itself, nor its submodules
        return sorted({key for key in vars(sys.modules[package]) if key.startswith("__")} | set(exports))

    return __getattr__, __dir__
