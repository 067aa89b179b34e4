"""visreg_hub: VISReg self-supervised image embeddings.

Public surface (everything else is an implementation detail)::

    import visreg_hub
    model = visreg_hub.from_pretrained("vit-mini-p7-fmnist")    # bundled with the package, offline
    emb = model.encode(["shirt.png", "boot.jpg"])               # (2, 64) float tensor, L2-normalised

Names are imported lazily so that ``import visreg_hub`` stays fast and optional extras
(faiss, onnxruntime, gradio) are only needed by the functions that use them.
"""

from __future__ import annotations

from visreg_hub._lazy import lazy_exports

__version__ = "0.2.5"

# The one list of public names: name -> module that defines it. ``__all__``, ``dir()`` and the lazy
# ``__getattr__`` below are all derived from it, so adding a public name is one line here.
_PUBLIC = {
    "from_pretrained": "visreg_hub.hub",
    "list_models": "visreg_hub.hub",
    "VISRegEncoder": "visreg_hub.models",
    "ModelConfig": "visreg_hub.models",
    "VISRegLoss": "visreg_hub.losses",
    "EmbeddingIndex": "visreg_hub.retrieval",
    "SearchResult": "visreg_hub.retrieval",
    "embed_dataset": "visreg_hub.bulk",
    "export_onnx": "visreg_hub.inference.onnx",
    "Client": "visreg_hub.serving.client",
}

__all__ = ["__version__", *_PUBLIC]


__getattr__, __dir__ = lazy_exports(__name__, _PUBLIC)
