"""EmbeddingIndex: nearest-neighbour search over image embeddings with FAISS, stable ids, remove.

Kinds (FAISS ``index_factory`` strings in :mod:`visreg_hub.retrieval.factory`; flat and HNSW wrapped
in ``IDMap2``, the IVF kinds keep user ids in their inverted lists): ``"flat"`` (exact, the default;
no training), ``"ivf"`` (inverted lists, float vectors), ``"ivfsq8"`` (inverted lists, 8-bit scalar
codes: 4x smaller), ``"ivfpq"`` (inverted lists, product quantisation: 16-64x smaller) and
``"hnsw"`` (graph). Approximate kinds trade recall for speed and memory; ``visreg-hub index build
--kind auto`` measures recall@10 against exact search and records it.

Persistence (``save``/``load``, checksummed manifest, no pickle) lives in
:mod:`visreg_hub.retrieval.storage`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from visreg_hub.errors import ConfigError, UserInputError, require_extra
from visreg_hub.models.config import POOLINGS
from visreg_hub.retrieval.arrays import as_float32_matrix, l2_normalize
from visreg_hub.retrieval.factory import IVF_KINDS, KINDS, default_nlist, default_pq_m, factory_string
from visreg_hub.retrieval.limits import MAX_DIM, check_bounded_int, check_param
from visreg_hub.retrieval.records import check_new_ids, encode_metadata, lookup_ids
from visreg_hub.retrieval.storage import load_index, save_index

logger = logging.getLogger(__name__)

METRICS = ("ip", "l2")
# Vectors whose norm is within this of 1 count as L2-normalised (float32 round-off of encode()).
_UNIT_NORM_TOL = 1e-3


@dataclass
class SearchResult:
    """Batched search result.

    Attributes:
        scores: float32 (Q, k). Inner products for ``metric="ip"`` (higher is closer); squared L2
            distances for ``metric="l2"`` (lower is closer); approximate for the compressed kinds.
        ids: int64 (Q, k) user ids, best first. Every slot holds a live id: k is clipped to the number
            of stored vectors and approximate kinds widen their search until every slot is filled.
        metadata: (Q, k) nested list of the metadata stored with each hit (``None`` where none was given).
    """

    scores: np.ndarray
    ids: np.ndarray
    metadata: list[list[dict[str, Any] | None]] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.ids.shape[0])


class PendingAdd(NamedTuple):
    """An add that passed every check (:meth:`EmbeddingIndex.validate_add`), not yet applied.

    Attributes:
        vectors: float32 (N, D), normalised when the index normalises.
        ids: int64 (N,).
        metadata: N compact JSON texts (None where no metadata was given).
    """

    vectors: np.ndarray
    ids: np.ndarray
    metadata: list[str | None]


class EmbeddingIndex:
    """A FAISS index over (N, D) embeddings with stable int64 ids, JSON metadata by id, and remove.

    API:
        * ``add(vectors, metadata=None, ids=None) -> ids``: (N, D) vectors; optional N metadata dicts;
          optional N unique int64 ids >= 0. Without ids, ids are assigned from a counter that only
          grows (``next_id``): an id is never handed out twice, not even after ``remove``.
        * ``validate_add(vectors, metadata=None, ids=None) -> PendingAdd``: every check of ``add``,
          without changing the index (for callers that log an add before applying it).
        * ``remove(ids) -> int``: drops vectors and their metadata; returns how many were present.
          Removed ids never appear in ``search`` again (flat/IVF kinds delete from FAISS; HNSW, whose
          graph cannot delete, hides them with a FAISS id selector until the index is rebuilt).
        * ``search(queries, k) -> SearchResult``: (Q, min(k, count)) ids, scores and metadata; no -1.
        * ``get_metadata(ids)``: O(1) per id (a dict keyed by id; no table is rebuilt per call).
        * ``save(folder)`` / ``EmbeddingIndex.load(folder)``: FAISS file + ids + metadata, all covered
          by the sha256 manifest; the loader checks every file against the manifest before FAISS
          parses it (see :mod:`visreg_hub.retrieval.storage`).

    Args:
        dim: embedding dimension D.
        metric: ``"ip"`` (inner product; cosine similarity for L2-normalised vectors, the output of
            ``encode(normalize=True)``) or ``"l2"`` (squared Euclidean distance).
        kind: one of ``"flat"`` (exact, default), ``"ivf"``, ``"ivfsq8"``, ``"ivfpq"`` (trained on the
            first ``add`` or by ``train``) or ``"hnsw"`` (no training).
        nlist: IVF cells; None picks ``round(4 * sqrt(n))`` capped so each cell gets >= 39 training points.
        nprobe: IVF cells visited per query (recall/speed knob); None picks ``min(nlist, 16)``.
        pq_m: IVF-PQ bytes per vector (sub-quantizers, must divide D); None picks up to 64.
        m: HNSW neighbours per node.
        ef_construction: HNSW build-time beam width.
        ef_search: HNSW query-time beam width (recall/speed knob; should be >= k).
        normalize: L2-normalise vectors on ``add`` and queries on ``search`` (makes ``"ip"`` cosine).
        model_name: the model that produced the embeddings; recorded so ``visreg-hub search`` can embed
            queries with the same model.
        pooling: the pooling used to produce the embeddings, recorded likewise (None = model default).

    Example:
        >>> index = EmbeddingIndex(dim=384)
        >>> ids = index.add(embeddings, metadata=[{"path": p} for p in paths])
        >>> index.remove(ids[:2])
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
        pq_m: int | None = None,
        m: int = 32,
        ef_construction: int = 40,
        ef_search: int = 64,
        normalize: bool = False,
        model_name: str | None = None,
        pooling: str | None = None,
    ) -> None:
        check_bounded_int("dim", dim, MAX_DIM)
        if metric not in METRICS:
            raise ConfigError(f"metric must be one of {METRICS}, got {metric!r}")
        if kind not in KINDS:
            raise ConfigError(f"kind must be one of {KINDS}, got {kind!r}")
        for label, value in (("nlist", nlist), ("nprobe", nprobe), ("pq_m", pq_m)):
            if value is not None:
                check_param(label, value)
        for label, value in (("m", m), ("ef_construction", ef_construction), ("ef_search", ef_search)):
            check_param(label, value)
        if pooling is not None and pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {POOLINGS} or None, got {pooling!r}")
        if kind == "ivfpq" and pq_m is not None and dim % pq_m:
            raise ConfigError(f"pq_m={pq_m} must divide dim={dim}")
        self.dim = int(dim)
        self.metric = metric
        self.kind = kind
        self.m = int(m)
        self.ef_construction = int(ef_construction)
        self._ef_search = int(ef_search)
        self._nlist = None if nlist is None else int(nlist)
        self._nprobe = None if nprobe is None else int(nprobe)
        if kind == "ivfpq" and pq_m is None:
            pq_m = default_pq_m(dim)  # chosen now, so the saved manifest records what the file holds
        self.pq_m = None if pq_m is None else int(pq_m)
        self.normalize = bool(normalize)
        self.model_name = model_name
        self.pooling = pooling
        # id -> compact JSON text of its metadata (None without); insertion-ordered, O(1) lookups.
        self._meta: dict[int, str | None] = {}
        self._next_id = 0
        self._tombstones: set[int] = set()  # HNSW only: removed ids still in the graph
        self._selector = None  # cached FAISS selector excluding the tombstones
        self._all_unit_norm = True
        self.build_info: dict[str, Any] = {}  # recorded by index build (factory, memory, recall)
        self._faiss_index = None if kind in IVF_KINDS else self._build(nlist=None)

    # ----------------------------------------------------------------------------------- properties
    def __len__(self) -> int:
        return len(self._meta)

    @property
    def count(self) -> int:
        """Number of stored (live) vectors."""
        return len(self)

    @property
    def next_id(self) -> int:
        """The next auto-assigned id (greater than every id ever added)."""
        return self._next_id

    @property
    def factory(self) -> str | None:
        """The FAISS ``index_factory`` string of the index (None for IVF kinds before training)."""
        if self.kind in IVF_KINDS:
            if self._nlist is None:
                return None
            return factory_string(self.kind, dim=self.dim, nlist=self._nlist, pq_m=self.pq_m, m=self.m)
        return "IDMap2," + factory_string(self.kind, dim=self.dim, nlist=None, pq_m=None, m=self.m)

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
        self._nprobe = check_param("nprobe", value)
        if self.kind in IVF_KINDS and self._faiss_index is not None:
            self._nprobe = min(self._nprobe, self._nlist)

    @property
    def ef_search(self) -> int:
        return self._ef_search

    @ef_search.setter
    def ef_search(self, value: int) -> None:
        self._ef_search = check_param("ef_search", value)

    @property
    def ids(self) -> np.ndarray:
        """int64 (count,) live ids in insertion order (a copy)."""
        return np.fromiter(self._meta.keys(), dtype=np.int64, count=len(self._meta))

    def __contains__(self, item: object) -> bool:
        return isinstance(item, int | np.integer) and int(item) in self._meta

    def __iter__(self) -> Iterator[int]:
        """The live ids in insertion order, as Python ints (``len`` and ``in`` count and test the same)."""
        return iter(self.ids.tolist())

    # --------------------------------------------------------------------------------- building
    def _faiss_metric(self, faiss):
        return faiss.METRIC_INNER_PRODUCT if self.metric == "ip" else faiss.METRIC_L2

    def _build(self, nlist: int | None):
        faiss = require_extra("faiss", "index")
        description = factory_string(self.kind, dim=self.dim, nlist=nlist, pq_m=self.pq_m, m=self.m)
        # IVF lists store user ids natively; IDMap2 over IVF would break on remove (FAISS renumbers
        # its id map but not the lists' stored positions), so only flat and HNSW get the wrapper
        if self.kind not in IVF_KINDS:
            description = "IDMap2," + description
        index = faiss.index_factory(self.dim, description, self._faiss_metric(faiss))
        if self.kind == "hnsw":
            faiss.downcast_index(index.index).hnsw.efConstruction = self.ef_construction
        return index

    def _prepare(self, vectors: Any, name: str) -> np.ndarray:
        array = as_float32_matrix(vectors, name=name, dim=self.dim)
        return l2_normalize(array) if self.normalize else array

    def _check_training_size(self, n: int) -> None:
        """Raise ValueError when n vectors are too few to train this IVF index."""
        nlist = self._nlist if self._nlist is not None else default_nlist(n)
        needed = max(nlist, 256 if self.kind == "ivfpq" else 1)
        if n < needed:
            why = (  # PQ trains 256 centroids per sub-vector: a smaller nlist cannot lower that
                "256 for the product quantiser's codebooks"
                if needed == 256 and nlist < 256
                else f"nlist={nlist}; pass a smaller nlist"
            )
            instead = "'flat' or 'ivf'" if self.kind == "ivfpq" else "'flat' or 'hnsw' (no training)"
            raise UserInputError(
                f"{self.kind} training needs at least {needed} vectors ({why}), got {n}; "
                f"add more training vectors, or use kind {instead}"
            )

    def train(self, embeddings: Any) -> None:
        """Train the IVF coarse quantizer (k-means) and codebooks on representative vectors.

        Args:
            embeddings: (N, D) floating array with N >= nlist (ideally >= 39 * nlist); IVF-PQ also
                needs N >= 256 (one k-means of 256 codes per sub-quantizer).

        Raises:
            ValueError: already trained, or too few vectors (the message says how many are needed).
        """
        if self.kind not in IVF_KINDS:
            logger.info("kind=%r needs no training; train() ignored", self.kind)
            return
        if self.is_trained:
            raise UserInputError("this IVF index is already trained; create a new EmbeddingIndex to retrain")
        data = self._prepare(embeddings, "embeddings")
        n = data.shape[0]
        self._check_training_size(n)
        if self._nlist is None:
            self._nlist = default_nlist(n)
        if n < 39 * self._nlist:
            logger.warning("training %d IVF cells on only %d vectors; recall may suffer", self._nlist, n)
        if self.kind == "ivfpq" and n < 39 * 256:
            logger.warning(
                "training IVF-PQ codebooks (256 codes each) on only %d vectors; recall may suffer", n
            )
        index = self._build(self._nlist)
        _quiet_faiss_clustering(require_extra("faiss", "index"), index)
        index.train(data)
        self._nprobe = min(self._nprobe if self._nprobe is not None else 16, self._nlist)
        self._faiss_index = index

    def validate_add(
        self, vectors: Any, metadata: list[dict[str, Any] | None] | None = None, ids: Any = None
    ) -> PendingAdd:
        """Every check :meth:`add` makes, without changing the index.

        Callers that must record an add before applying it (the server's write-ahead log) call this
        first, so a record that :meth:`add` would refuse is never written.

        Returns:
            the add as it would be stored: prepared float32 (N, D) vectors, int64 (N,) ids (given, or
            ``next_id ..``) and the metadata's JSON texts.

        Raises:
            ValueError: as :meth:`add`.
        """
        data = self._prepare(vectors, "vectors")
        n = data.shape[0]
        texts = encode_metadata(metadata, n)  # before the ids: an exhausted counter must not hide this
        new_ids = check_new_ids(ids, n, next_id=self._next_id, live=self._meta, tombstones=self._tombstones)
        if not self.is_trained:
            self._check_training_size(n)
        return PendingAdd(data, new_ids, texts)

    def add(
        self, vectors: Any, metadata: list[dict[str, Any] | None] | None = None, ids: Any = None
    ) -> np.ndarray:
        """Add vectors with optional JSON metadata and int64 ids.

        Args:
            vectors: (N, D) floating array (numpy or torch); cast to float32.
            metadata: list of N JSON-serialisable dicts (or None), e.g. ``{"path": ..., "label": ...}``.
            ids: (N,) integer ids in ``[0, 2**63 - 2]``, unique and not live in the index; None assigns
                ``next_id .. next_id + N - 1``.

        Returns:
            int64 (N,) the ids of the added vectors.

        Raises:
            ValueError: dimension/dtype/NaN problems, an all-zero vector when normalising, wrong ids or
                metadata length, duplicate ids, metadata that is not JSON-serialisable, too few vectors
                to train an IVF index. A failed add leaves the index unchanged.
        """
        data, new_ids, texts = self.validate_add(vectors, metadata, ids)
        n = data.shape[0]
        if not self.is_trained:
            logger.info("training IVF index on the %d vectors of the first add()", n)
            self.train(data)
        if n:
            self._faiss_index.add_with_ids(data, new_ids)
            self._meta.update(zip(new_ids.tolist(), texts, strict=True))
            self._next_id = max(self._next_id, int(new_ids.max()) + 1)
            if self._all_unit_norm:
                self._all_unit_norm = bool(np.all(np.abs(np.linalg.norm(data, axis=1) - 1) < _UNIT_NORM_TOL))
        return new_ids

    def remove(self, ids: Any) -> int:
        """Remove vectors by id; ids not in the index are ignored.

        Args:
            ids: int or (K,) integers.

        Returns:
            the number of vectors removed.
        """
        wanted = sorted(set(lookup_ids(ids)))
        present = np.asarray([i for i in wanted if i in self._meta], dtype=np.int64)
        if not present.size:
            return 0
        if self.kind == "hnsw":
            self._tombstones.update(present.tolist())
            self._selector = None
        else:
            removed = int(self._faiss_index.remove_ids(present))
            if removed != present.size:  # would mean FAISS and the id table disagree
                raise RuntimeError(
                    f"FAISS removed {removed} of {present.size} ids; the index is inconsistent"
                )
        for i in present.tolist():
            del self._meta[i]
        return int(present.size)

    # ---------------------------------------------------------------------------------- querying
    def _search_params(self, faiss, *, nprobe: int | None = None, ef: int | None = None):
        if self._tombstones and self._selector is None:
            batch = faiss.IDSelectorBatch(np.fromiter(self._tombstones, np.int64, len(self._tombstones)))
            self._selector = (faiss.IDSelectorNot(batch), batch)  # keep the inner selector alive
        selector = self._selector[0] if self._tombstones else None
        if self.kind in IVF_KINDS:
            return faiss.SearchParametersIVF(sel=selector, nprobe=nprobe or self._nprobe)
        if self.kind == "hnsw":
            return faiss.SearchParametersHNSW(sel=selector, efSearch=ef or self._ef_search)
        return None

    def search(self, queries: Any, k: int = 10) -> SearchResult:
        """Find the k nearest stored vectors of each query.

        Args:
            queries: (Q, D) or (D,) floating array.
            k: neighbours per query; clipped to ``count``, so the result has ``min(k, count)`` columns.

        Returns:
            SearchResult with scores/ids of shape (Q, min(k, count)) and the hits' metadata.

        Raises:
            ValueError: empty index, bad k, or bad queries (dimension, dtype, NaN).
        """
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise UserInputError(f"k must be a positive integer, got {k!r}")
        if len(self) == 0:
            raise UserInputError("the index is empty; add() embeddings before searching")
        faiss = require_extra("faiss", "index")
        data = self._prepare(queries, "queries")
        k_eff = min(int(k), len(self))
        scores, ids = self._faiss_index.search(data, k_eff, params=self._search_params(faiss))
        short = np.flatnonzero((ids < 0).any(axis=1))
        if short.size:  # too few candidates probed: widen to exhaustive for those rows
            wide = self._search_params(faiss, nprobe=self._nlist, ef=max(self._faiss_index.ntotal, k_eff))
            scores[short], ids[short] = self._faiss_index.search(data[short], k_eff, params=wide)
            short = short[(ids[short] < 0).any(axis=1)]
        if short.size:  # an HNSW graph can still leave hidden corners: exact search over live vectors
            scores[short], ids[short] = self._exact_search(data[short], k_eff)
        metadata = [[self._decode(i) for i in row] for row in ids.tolist()]
        return SearchResult(scores=scores.astype(np.float32), ids=ids.astype(np.int64), metadata=metadata)

    def _exact_search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        live = self.ids
        vectors = np.stack([self._faiss_index.reconstruct(int(i)) for i in live]).astype(np.float32)
        scores = queries @ vectors.T if self.metric == "ip" else (
            (queries**2).sum(1, keepdims=True) - 2 * queries @ vectors.T + (vectors**2).sum(1)[None, :]
        )  # fmt: skip
        order = np.argsort(-scores if self.metric == "ip" else scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, axis=1), live[order]

    def _decode(self, i: int) -> dict[str, Any] | None:
        text = self._meta[i]
        return None if text is None else json.loads(text)

    def get_metadata(self, ids: Any) -> list[dict[str, Any] | None]:
        """Metadata stored with the given ids (None for ids stored without metadata); O(1) per id.

        Raises:
            KeyError: an id that is not in the index (never added, or removed).
        """
        out = []
        for i in lookup_ids(ids):
            if i not in self._meta:
                raise KeyError(f"id {i} is not in the index")
            out.append(self._decode(i))
        return out

    # --------------------------------------------------------------------------- persistence
    def save(self, folder: str | Path, *, overwrite: bool = True) -> Path:
        """Write the index to ``folder``: FAISS index, ids.npy, metadata.jsonl and a checksummed manifest.

        See :mod:`visreg_hub.retrieval.storage` for the layout. An earlier index there is replaced, unless
        ``overwrite=False``, which raises :class:`~visreg_hub.errors.UserInputError` instead.

        Returns:
            the folder path.
        """
        return save_index(self, folder, overwrite=overwrite)

    @classmethod
    def load(cls, folder: str | Path) -> EmbeddingIndex:
        """Load a folder written by :meth:`save`, verifying the manifest, every checksum and the files'
        structure before FAISS parses anything.

        Raises:
            FileNotFoundError: the folder or one of its files is missing.
            CheckpointError: unknown format version, checksum mismatch (tampered or corrupt file), or
                files that disagree with the manifest (dim, count, metric, kind, ids, metadata).
        """
        return load_index(cls, folder)

    def __repr__(self) -> str:
        return (
            f"EmbeddingIndex(dim={self.dim}, metric={self.metric!r}, kind={self.kind!r}, count={len(self)}, "
            f"model_name={self.model_name!r})"
        )


def _quiet_faiss_clustering(faiss, index) -> None:
    """Silence FAISS's per-k-means "please provide at least N training points" lines on stderr.

    FAISS prints one per clustering (IVF-PQ: one per sub-quantizer, dozens of raw C++ lines that logging
    cannot catch). ``min_points_per_centroid`` only gates that message, not the training, and
    :meth:`EmbeddingIndex.train` already logs one warning in its place.
    """
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    ivf.cp.min_points_per_centroid = 1
    if hasattr(ivf, "pq"):
        ivf.pq.cp.min_points_per_centroid = 1
