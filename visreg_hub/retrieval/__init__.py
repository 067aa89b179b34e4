"""Nearest-neighbour search over embeddings (FAISS) and evaluation metrics of frozen features.

FAISS is the ``index`` extra: it is imported when an :class:`EmbeddingIndex` is created, so importing this
package works without it.
"""

from __future__ import annotations

from visreg_hub.retrieval.files import EmbeddingFile, read_embeddings, write_embeddings
from visreg_hub.retrieval.index import EmbeddingIndex, SearchResult
from visreg_hub.retrieval.manifest import read_manifest
from visreg_hub.retrieval.metrics import (
    LinearProbeResult,
    knn_accuracy,
    knn_predict,
    label_recall_at_k,
    linear_probe,
    recall_at_k,
)

__all__ = [
    "EmbeddingFile",
    "EmbeddingIndex",
    "LinearProbeResult",
    "SearchResult",
    "knn_accuracy",
    "knn_predict",
    "label_recall_at_k",
    "linear_probe",
    "read_embeddings",
    "read_manifest",
    "recall_at_k",
    "write_embeddings",
]
