"""Nearest-neighbour search over embeddings (FAISS) and evaluation metrics of frozen features.

FAISS is the ``index`` extra: it is imported when an :class:`EmbeddingIndex` is created, so importing this
package works without it.
"""

from __future__ import annotations

from visreg_hub._lazy import lazy_exports

_EXPORTS = {
    "EmbeddingFile": "visreg_hub.retrieval.files",
    "read_embeddings": "visreg_hub.retrieval.files",
    "write_embeddings": "visreg_hub.retrieval.files",
    "EmbeddingIndex": "visreg_hub.retrieval.index",
    "SearchResult": "visreg_hub.retrieval.index",
    "read_manifest": "visreg_hub.retrieval.manifest",
    "LinearProbeResult": "visreg_hub.retrieval.metrics",
    "knn_accuracy": "visreg_hub.retrieval.metrics",
    "knn_predict": "visreg_hub.retrieval.metrics",
    "label_recall_at_k": "visreg_hub.retrieval.metrics",
    "linear_probe": "visreg_hub.retrieval.metrics",
    "recall_at_k": "visreg_hub.retrieval.metrics",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
