"""visreg_hub: VISReg self-supervised image embeddings.

Public surface (everything else is an implementation detail)::

    import visreg_hub
    model = visreg_hub.from_pretrained("visreg-vit-t8-fmnist")
    emb = model.encode(["cat.jpg", "dog.png"])          # (2, D) float tensor, L2-normalised

Names are imported lazily so that ``import visreg_hub`` stays fast and optional extras
(faiss, onnxruntime, gradio) are only needed by the functions that use them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "VISRegLoss": "visreg_hub.losses",
    "SIGRegLoss": "visreg_hub.losses",
    "SWDLoss": "visreg_hub.losses",
    "VICRegLoss": "visreg_hub.losses",
    "BarlowTwinsLoss": "visreg_hub.losses",
    "ModelConfig": "visreg_hub.models",
    "VISRegEncoder": "visreg_hub.models",
    "from_pretrained": "visreg_hub.hub",
    "list_models": "visreg_hub.hub",
    "EmbeddingIndex": "visreg_hub.retrieval",
    "export_onnx": "visreg_hub.inference.onnx",
    "OnnxEmbedder": "visreg_hub.inference.onnx",
    "SearchResult": "visreg_hub.retrieval",
    "VisregHubError": "visreg_hub.errors",
}

__all__ = ["__version__", *sorted(_LAZY)]


def __getattr__(name: str):
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'visreg_hub' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value  # cache: __getattr__ runs once per name
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from visreg_hub.errors import VisregHubError  # noqa: F401
    from visreg_hub.hub import from_pretrained, list_models  # noqa: F401
    from visreg_hub.inference.onnx import OnnxEmbedder, export_onnx  # noqa: F401
    from visreg_hub.losses import BarlowTwinsLoss, SIGRegLoss, SWDLoss, VICRegLoss, VISRegLoss  # noqa: F401
    from visreg_hub.models import ModelConfig, VISRegEncoder  # noqa: F401
    from visreg_hub.retrieval import EmbeddingIndex, SearchResult  # noqa: F401
