"""EmbeddingIndex: nearest-neighbour search over image embeddings with FAISS.

Exact search (``kind="flat"``) is the default: it never misses a neighbour and needs no training (about
300 queries/s over 100k x 256 vectors on 2 CPU threads, see docs/benchmarks.md). ``"ivf"`` (inverted
lists) and ``"hnsw"`` (graph) trade recall for speed on millions of vectors; their recall depends on the
data, so measure it (``metrics.recall_at_k`` against a flat index) before switching.

FAISS stores vectors at positions ``0..count-1``; the index keeps the user's int64 ids and JSON metadata
in arrays aligned with those positions, so every kind supports ids and metadata the same way.

Persistence (``save``/``load``, manifest with checksums, no pickle) lives in
:mod:`visreg_hub.retrieval.storage`.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from visreg_hub.errors import ConfigError, require_extra
from visreg_hub.retrieval.arrays import as_float32_matrix, check_positive_int, l2_normalize
from visreg_hub.retrieval.storage import load_index, save_index

logger = logging.getLogger(__name__)

METRICS = ("ip", "l2")
KINDS = ("flat", "ivf", "hnsw")
# Vectors whose norm is within this of 1 count as L2-normalised (float32 round-off of encode()).
_UNIT_NORM_TOL = 1e-3


@dataclass
class SearchResult:
    """Batched search result.

    Attributes:
        scores: float32 (Q, k). Inner products for ``metric="ip"`` (higher is closer); squared L2
            distances for ``metric="l2"`` (lower is closer). Unfilled slots hold ``-inf`` (ip) / ``inf`` (l2).
        ids: int64 (Q, k) user ids, best first. ``-1`` marks an unfilled slot, which only approximate
            kinds produce (IVF with ``nprobe < nlist`` probing too few vectors, HNSW on tiny graphs).
        metadata: (Q, k) nested list of the metadata dict stored with each hit (``None`` where no
            metadata was given or the slot is unfilled).
    """

    scores: np.ndarray
    ids: np.ndarray
    metadata: list[list[dict[str, Any] | None]] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.ids.shape[0])


class EmbeddingIndex:
    """A FAISS index over (N, D) embeddings with int64 ids and JSON metadata.

    Args:
        dim: embedding dimension D.
        metric: ``"ip"`` (inner product; cosine similarity for L2-normalised vectors, the output of
            ``encode(normalize=True)``) or ``"l2"`` (squared Euclidean distance).
        kind: ``"flat"`` (exact, default), ``"ivf"`` (inverted file; trained on the first ``add`` or by
            ``train``) or ``"hnsw"`` (graph, no training).
        nlist: IVF cells; None picks ``round(4 * sqrt(n))`` capped so each cell gets >= 39 training points.
        nprobe: IVF cells visited per query (recall/speed knob; ``nprobe == nlist`` is exact);
            None picks ``min(nlist, 16)``.
        m: HNSW neighbours per node.
        ef_construction: HNSW build-time beam width.
        ef_search: HNSW query-time beam width (recall/speed knob; must be >= k for good recall).
        normalize: L2-normalise vectors on ``add`` and queries on ``search`` (makes ``"ip"`` cosine).
        model_name: the model that produced the embeddings; recorded in the manifest so ``visreg-hub
            search`` can embed queries with the same model.
        pooling: the pooling used to produce the embeddings, recorded likewise (None = model default).

    Example:
        >>> index = EmbeddingIndex(dim=384)
        >>> index.add(embeddings, metadata=[{"path": p} for p in paths])
        >>> result = index.search(query_embeddings, k=5)   # result.ids (Q, 5), result.metadata
    """

    def __init__(
        self,
        dim: int,
        *,
        metric: str = "ip",
        kind: str = "flat",
        nlist: int | None = None,
        nprobe: int | None = None,
        m: int = 32,
        ef_construction: int = 40,
        ef_search: int = 64,
        normalize: bool = False,
        model_name: str | None = None,
        pooling: str | None = None,
    ) -> None:
        check_positive_int("dim", dim)
        if metric not in METRICS:
            raise ConfigError(f"metric must be one of {METRICS}, got {metric!r}")
        if kind not in KINDS:
            raise ConfigError(f"kind must be one of {KINDS}, got {kind!r}")
        for label, value in (("nlist", nlist), ("nprobe", nprobe)):
            if value is not None:
                check_positive_int(label, value)
        for label, value in (("m", m), ("ef_construction", ef_construction), ("ef_search", ef_search)):
            check_positive_int(label, value)
        self.dim = int(dim)
        self.metric = metric
        self.kind = kind
        self.m = int(m)
        self.ef_construction = int(ef_construction)
        self._ef_search = int(ef_search)
        self._nlist = None if nlist is None else int(nlist)
        self._nprobe = None if nprobe is None else int(nprobe)
        self.normalize = bool(normalize)
        self.model_name = model_name
        self.pooling = pooling
        self._ids = np.zeros((0,), dtype=np.int64)
        self._id_set: set[int] = set()
        self._metadata: list[dict[str, Any] | None] = []
        self._all_unit_norm = True
        self._faiss_index = None if kind == "ivf" else self._build_untrained(nlist=None)

    # ----------------------------------------------------------------------------------- properties
    def __len__(self) -> int:
        return int(self._ids.shape[0])

    @property
    def count(self) -> int:
        """Number of stored vectors."""
        return len(self)

    @property
    def is_trained(self) -> bool:
        """False only for an IVF index before ``train``/the first ``add``."""
        return self._faiss_index is not None and bool(self._faiss_index.is_trained)

    @property
    def normalized(self) -> bool:
        """True when every stored vector has unit L2 norm (so ``"ip"`` scores are cosine similarities)."""
        return self.normalize or self._all_unit_norm

    @property
    def nlist(self) -> int | None:
        return self._nlist

    @property
    def nprobe(self) -> int | None:
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        check_positive_int("nprobe", value)
        self._nprobe = int(value)
        if self.kind == "ivf" and self._faiss_index is not None:
            self._faiss_index.nprobe = min(self._nprobe, self._faiss_index.nlist)

    @property
    def ef_search(self) -> int:
        return self._ef_search

    @ef_search.setter
    def ef_search(self, value: int) -> None:
        check_positive_int("ef_search", value)
        self._ef_search = int(value)
        if self.kind == "hnsw":
            self._faiss_index.hnsw.efSearch = self._ef_search

    @property
    def ids(self) -> np.ndarray:
        """int64 (count,) user ids in insertion order (a copy)."""
        return self._ids.copy()

    # --------------------------------------------------------------------------------- building
    def _faiss_metric(self, faiss):
        return faiss.METRIC_INNER_PRODUCT if self.metric == "ip" else faiss.METRIC_L2

    def _build_untrained(self, nlist: int | None):
        faiss = require_extra("faiss", "index")
        metric = self._faiss_metric(faiss)
        if self.kind == "flat":
            return faiss.IndexFlatIP(self.dim) if self.metric == "ip" else faiss.IndexFlatL2(self.dim)
        if self.kind == "hnsw":
            index = faiss.IndexHNSWFlat(self.dim, self.m, metric)
            index.hnsw.efConstruction = self.ef_construction
            index.hnsw.efSearch = self._ef_search
            return index
        quantizer = faiss.IndexFlatIP(self.dim) if self.metric == "ip" else faiss.IndexFlatL2(self.dim)
        # faiss's Python wrapper keeps a reference to the quantizer for the index's lifetime
        return faiss.IndexIVFFlat(quantizer, self.dim, nlist, metric)

    def _prepare(self, vectors: Any, name: str) -> np.ndarray:
        array = as_float32_matrix(vectors, name=name, dim=self.dim)
        return l2_normalize(array) if self.normalize else array

    def train(self, embeddings: Any) -> None:
        """Train the IVF coarse quantizer (k-means) on representative vectors.

        Args:
            embeddings: (N, D) floating array with N >= nlist (ideally >= 39 * nlist).

        Raises:
            ValueError: the kind needs no training and the index is not IVF, or too few vectors.
        """
        if self.kind != "ivf":
            logger.info("kind=%r needs no training; train() ignored", self.kind)
            return
        if self.is_trained:
            raise ValueError("this IVF index is already trained; create a new EmbeddingIndex to retrain")
        data = self._prepare(embeddings, "embeddings")
        n = data.shape[0]
        if self._nlist is None:
            # 4*sqrt(n) is FAISS's rule of thumb; the cap keeps >= 39 points per cell for stable k-means.
            self._nlist = max(1, min(round(4 * math.sqrt(n)), n // 39))
        if n < self._nlist:
            raise ValueError(
                f"IVF training needs at least nlist={self._nlist} vectors, got {n}; "
                f"pass a smaller nlist, more training vectors, or use kind='flat'"
            )
        if n < 39 * self._nlist:
            logger.warning("training %d IVF cells on only %d vectors; recall may suffer", self._nlist, n)
        index = self._build_untrained(self._nlist)
        index.train(data)
        index.nprobe = min(self._nprobe if self._nprobe is not None else 16, self._nlist)
        self._nprobe = int(index.nprobe)
        self._faiss_index = index

    def add(
        self,
        embeddings: Any,
        ids: Any = None,
        metadata: list[dict[str, Any] | None] | None = None,
    ) -> np.ndarray:
        """Add vectors, with optional int64 ids and JSON metadata.

        Args:
            embeddings: (N, D) floating array (numpy or torch); cast to float32.
            ids: (N,) integer ids, unique across the index; None assigns ``count .. count+N-1``.
            metadata: list of N JSON-serialisable dicts (or None), e.g. ``{"path": ..., "label": ...}``.

        Returns:
            int64 (N,) the ids of the added vectors.

        Raises:
            ValueError: dimension/dtype/NaN problems, wrong ids or metadata length, duplicate ids,
                metadata that is not JSON-serialisable.
        """
        data = self._prepare(embeddings, "embeddings")
        n = data.shape[0]
        new_ids = self._check_ids(ids, n)
        new_meta = self._check_metadata(metadata, n)
        if not self.is_trained:
            logger.info("training IVF index on the %d vectors of the first add()", n)
            self.train(data)
        self._faiss_index.add(data)
        self._ids = np.concatenate([self._ids, new_ids])
        self._id_set.update(new_ids.tolist())
        self._metadata.extend(new_meta)
        if n and self._all_unit_norm:
            self._all_unit_norm = bool(np.all(np.abs(np.linalg.norm(data, axis=1) - 1) < _UNIT_NORM_TOL))
        return new_ids

    def _check_ids(self, ids: Any, n: int) -> np.ndarray:
        if ids is None:
            start = int(self._ids.max()) + 1 if len(self) else 0
            return np.arange(start, start + n, dtype=np.int64)
        ids = np.asarray(ids)
        if ids.ndim != 1 or ids.shape[0] != n:
            raise ValueError(f"ids must have shape ({n},) to match the embeddings, got {tuple(ids.shape)}")
        if n and not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"ids must be integers, got dtype {ids.dtype}; use np.int64 ids")
        ids = ids.astype(np.int64)
        if (ids < 0).any():
            raise ValueError(f"ids must be >= 0 (-1 marks empty result slots), got {int(ids.min())}")
        unique = np.unique(ids)
        if unique.size != n:
            raise ValueError("ids contain duplicates; every vector needs its own id")
        clash = [int(i) for i in unique if int(i) in self._id_set]
        if clash:
            raise ValueError(f"ids already in the index: {clash[:5]}; ids must be unique")
        return ids

    @staticmethod
    def _check_metadata(metadata: Any, n: int) -> list[dict[str, Any] | None]:
        if metadata is None:
            return [None] * n
        if not isinstance(metadata, list | tuple) or len(metadata) != n:
            got = len(metadata) if isinstance(metadata, list | tuple) else type(metadata).__name__
            raise ValueError(f"metadata must be a list of {n} dicts (one per vector), got {got}")
        for i, item in enumerate(metadata):
            if item is not None and not isinstance(item, dict):
                raise ValueError(f"metadata[{i}] must be a dict or None, got {type(item).__name__}")
        try:
            json.dumps(list(metadata), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"metadata must be JSON-serialisable (str, numbers, lists, dicts): {exc}"
            ) from exc
        # a JSON round trip stores plain copies, so later edits to the caller's dicts don't leak in
        return json.loads(json.dumps(list(metadata)))

    # ---------------------------------------------------------------------------------- querying
    def search(self, queries: Any, k: int = 10) -> SearchResult:
        """Find the k nearest stored vectors of each query.

        Args:
            queries: (Q, D) or (D,) floating array.
            k: neighbours per query; clipped to ``count`` when larger, so the result has
                ``min(k, count)`` columns.

        Returns:
            SearchResult with scores/ids of shape (Q, min(k, count)) and the hits' metadata.

        Raises:
            ValueError: empty index, bad k, or bad queries (dimension, dtype, NaN).
        """
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if len(self) == 0:
            raise ValueError("the index is empty; add() embeddings before searching")
        data = self._prepare(queries, "queries")
        k_eff = min(int(k), len(self))
        if k_eff < k:
            logger.info("k=%d exceeds the %d stored vectors; returning %d neighbours", k, len(self), k_eff)
        scores, positions = self._faiss_index.search(data, k_eff)
        filled = positions >= 0
        ids = np.where(filled, self._ids[np.where(filled, positions, 0)], -1).astype(np.int64)
        # FAISS pads with -/+FLT_MAX; infinities say "no hit" unambiguously
        scores = np.where(filled, scores, -np.inf if self.metric == "ip" else np.inf).astype(np.float32)
        metadata = [[self._metadata[p] if p >= 0 else None for p in row] for row in positions.tolist()]
        return SearchResult(scores=scores, ids=ids, metadata=metadata)

    def get_metadata(self, ids: Any) -> list[dict[str, Any] | None]:
        """Metadata stored with the given ids (None for -1 or ids without metadata).

        Raises:
            KeyError: an id that is not in the index.
        """
        position = {int(i): p for p, i in enumerate(self._ids.tolist())}
        out = []
        for i in np.asarray(ids, dtype=np.int64).reshape(-1).tolist():
            if i == -1:
                out.append(None)
            elif i not in position:
                raise KeyError(f"id {i} is not in the index")
            else:
                out.append(self._metadata[position[i]])
        return out

    # --------------------------------------------------------------------------- persistence
    def save(self, folder: str | Path) -> Path:
        """Write the index to ``folder``: FAISS index, ids.npy, metadata.json and a checksummed manifest.

        See :mod:`visreg_hub.retrieval.storage` for the layout. Existing index files are replaced.

        Returns:
            the folder path.
        """
        return save_index(self, folder)

    @classmethod
    def load(cls, folder: str | Path) -> EmbeddingIndex:
        """Load a folder written by :meth:`save`, verifying the manifest and every checksum first.

        Raises:
            FileNotFoundError: the folder or one of its files is missing.
            CheckpointError: unknown format version, checksum mismatch (tampered or corrupt file), or
                files that disagree with the manifest (dim, count, metric, kind).
        """
        return load_index(cls, folder)

    def __repr__(self) -> str:
        return (
            f"EmbeddingIndex(dim={self.dim}, metric={self.metric!r}, kind={self.kind!r}, count={len(self)}, "
            f"model_name={self.model_name!r})"
        )
