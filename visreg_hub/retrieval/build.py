"""``index build``: an EmbeddingIndex from embedding shards, streamed, sized to a memory budget.

``kind="auto"`` (the idea of autofaiss, with FAISS directly) takes the most accurate kind whose FAISS
memory (:func:`~visreg_hub.retrieval.factory.estimate_bytes`) fits ``max_memory``, in the order flat
(exact), IVF-Flat, IVF-SQ8, IVF-PQ with 64/32/16/8/4 bytes per vector. Every build then measures
recall@10 on held-out queries against exact search and, for the approximate kinds, raises the search
effort (IVF ``nprobe``, HNSW ``ef_search``) until ``target_recall`` is met or search is exhaustive.
The factory string, the estimated memory, the measured recall and the query ids are written into the
index manifest's ``build`` block, so anyone can recompute the recall.

Recall protocol: Q rows of the data (seeded choice) are the queries; for each, the exact top-10 among
all *other* rows is the truth (the query's own row is dropped from both lists: a query finding
itself says nothing), and recall@10 is the mean overlap of the index's top-10 with it, where rows
tied with the exact 10th neighbour (up to float32 round-off) count as true neighbours.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from visreg_hub.errors import ConfigError, UserInputError
from visreg_hub.retrieval.arrays import l2_normalize
from visreg_hub.retrieval.factory import IVF_KINDS, KINDS, default_nlist, default_pq_m, estimate_bytes
from visreg_hub.retrieval.index import EmbeddingIndex
from visreg_hub.retrieval.limits import check_param
from visreg_hub.retrieval.sources import EmbeddingSources, iter_batches, open_sources
from visreg_hub.retrieval.storage import check_index_output

logger = logging.getLogger(__name__)

RECALL_K = 10
MAX_TRAIN = 100_000
_TRUTH_BLOCK = 8192
_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "m": 2**20, "mb": 2**20, "g": 2**30, "gb": 2**30,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "t": 2**40, "tb": 2**40}  # fmt: skip


def parse_bytes(text: str | int) -> int:
    """``"2GB"``, ``"256MB"``, ``"512MiB"``, ``1000000`` -> bytes (binary units: 1 GB = 2**30 bytes)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
        if not match or match.group(2).lower() not in _UNITS:
            raise ConfigError(f"memory size {text!r} is not a number with a unit like 256MB or 2GB")
        value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if value <= 0:
        raise ConfigError(f"memory size must be positive, got {text!r}")
    return value


def candidates(n: int, dim: int) -> list[dict[str, Any]]:
    """Index plans from most to least accurate (see the module docstring)."""
    plans: list[dict[str, Any]] = [{"kind": "flat"}]
    if n >= 2 * 39:  # too few vectors for even two stable IVF cells: exact search is all there is
        nlist = default_nlist(n)
        plans += [{"kind": "ivf", "nlist": nlist}, {"kind": "ivfsq8", "nlist": nlist}]
        if n >= 256:
            plans += [{"kind": "ivfpq", "nlist": nlist, "pq_m": m} for m in (64, 32, 16, 8, 4)
                      if m <= dim // 2 and dim % m == 0]  # fmt: skip
    return plans


def choose_plan(
    n: int, dim: int, metric: str, kind: str, max_memory: int | None, *, nlist: int | None = None,
    pq_m: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The plan for ``kind`` (``"auto"``: the most accurate that fits ``max_memory``), with its bytes."""
    if kind == "auto":
        plans = candidates(n, dim)
    elif kind in KINDS:
        plan: dict[str, Any] = {"kind": kind}
        if kind in IVF_KINDS:
            plan["nlist"] = nlist or default_nlist(n)
        if kind == "ivfpq":
            plan["pq_m"] = pq_m or default_pq_m(dim)
        plans = [plan]
    else:
        raise ConfigError(f"kind must be 'auto' or one of {KINDS}, got {kind!r}")
    for plan in plans:
        plan["estimated_bytes"] = estimate_bytes(plan["kind"], n=n, dim=dim, nlist=plan.get("nlist"),
                                                 pq_m=plan.get("pq_m"), metric=metric)  # fmt: skip
        if max_memory is None or plan["estimated_bytes"] <= max_memory:
            return plan
    smallest = min(plans, key=lambda p: p["estimated_bytes"])
    raise ConfigError(
        f"no index over {n} x {dim} vectors fits --max-memory {max_memory} bytes; the smallest "
        f"({smallest['kind']}{', pq_m=' + str(smallest['pq_m']) if 'pq_m' in smallest else ''}) needs about "
        f"{smallest['estimated_bytes']} bytes: raise the budget"
        + (" or use --kind auto" if kind != "auto" else "")
    )


def _top_k_merge(scores: np.ndarray, ids: np.ndarray, new_scores: np.ndarray, new_ids: np.ndarray, k: int,
                 larger_is_better: bool):  # fmt: skip
    all_scores = np.concatenate([scores, new_scores], axis=1)
    all_ids = np.concatenate([ids, np.broadcast_to(new_ids, new_scores.shape)], axis=1)
    key = -all_scores if larger_is_better else all_scores
    keep = np.argsort(key, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(all_scores, keep, axis=1), np.take_along_axis(all_ids, keep, axis=1)


def recall_without_self(
    found: np.ndarray, truth: np.ndarray, truth_scores: np.ndarray, query_ids: np.ndarray, k: int,
    larger_is_better: bool = True, found_scores: np.ndarray | None = None,
) -> float:  # fmt: skip
    """recall@k: the mean fraction of the first k hits (the query's own id dropped) that are true top-k.

    A hit counts when its exact score is at least as good as the k-th exact neighbour's (the query's
    own row excluded), up to float32 round-off: near-duplicates tie, and any of them is right. Tied
    rows beyond the depth of ``truth`` are judged by ``found_scores`` (see :func:`truth_overflows`).

    Args:
        found: (Q, >= k + 1) ids from the index, best first.
        truth, truth_scores: (Q, depth) exact ids and scores, best first, depth >= k + 1.
        query_ids: (Q,) the queries' own row ids.
        found_scores: (Q, found width) exact scores of the ``found`` ids, NaN where not computed; needed
            only for the rows where :func:`truth_overflows`.
    """
    total, possible = 0, 0
    exact = np.full(found.shape, np.nan) if found_scores is None else found_scores
    rows = zip(found.tolist(), exact.tolist(), truth.tolist(), truth_scores.tolist(), query_ids.tolist(),
               strict=True)  # fmt: skip
    for row_found, row_exact, row_truth, row_scores, own in rows:
        want = [(i, s) for i, s in zip(row_truth, row_scores, strict=True) if i != own and i >= 0]
        if not want:  # a one-vector index: nothing to find
            continue
        # with fewer than k other vectors, finding all of them is full recall (not len(want) / k)
        kth = want[min(k, len(want)) - 1][1]
        accepted = {i for i, s in want if _ties_or_beats(s, kth, larger_is_better)}
        got = [(i, s) for i, s in zip(row_found, row_exact, strict=True) if i != own and i >= 0][:k]
        hits = {i for i, s in got if i in accepted or (s == s and _ties_or_beats(s, kth, larger_is_better))}
        total += min(len(hits), k)
        possible += min(k, len(want))
    return total / possible if possible else 1.0


def _ties_or_beats(score: float, kth: float, larger_is_better: bool) -> bool:
    """Whether an exact ``score`` is as good as the k-th neighbour's, up to float32 round-off."""
    slack = 1e-5 * max(1.0, abs(kth))
    return score >= kth - slack if larger_is_better else score <= kth + slack


def truth_overflows(truth_scores: np.ndarray, query_ids: np.ndarray, truth: np.ndarray, k: int,
                    larger_is_better: bool = True) -> np.ndarray:  # fmt: skip
    """(Q,) bool: the rows whose kept truth ends in a tie with the k-th neighbour.

    why: ``truth`` keeps a fixed number of exact neighbours; when more rows than that tie with the k-th
    (many exact duplicates), the index's correct tied hits can lie beyond it and must be judged by
    their exact scores instead, or an exact index measures a recall below 1.
    """
    rows = zip(truth.tolist(), truth_scores.tolist(), query_ids.tolist(), strict=True)
    flags = []
    for row_truth, row_scores, own in rows:
        want = [s for i, s in zip(row_truth, row_scores, strict=True) if i != own and i >= 0]
        full = len(want) >= truth.shape[1] - 1  # every kept slot but the own row's holds a neighbour
        flags.append(full and _ties_or_beats(want[-1], want[min(k, len(want)) - 1], larger_is_better))
    return np.array(flags, dtype=bool)


def build_index(
    paths: list[str | Path],
    output: str | Path,
    *,
    kind: str = "auto",
    max_memory: str | int | None = None,
    target_recall: float = 0.95,
    metric: str = "ip",
    normalize: bool = False,
    model_name: str | None = None,
    num_queries: int = 1000,
    seed: int = 0,
    paths_file: str | Path | None = None,
    overwrite: bool = True,
    **index_args: Any,
) -> EmbeddingIndex:
    """Build, measure and save an index over embedding shards/files; see the module docstring.

    Args:
        paths: ``visreg-hub embed`` output folders and/or .parquet/.npy files.
        output: the index folder to write (new, empty, or holding an earlier index, which is replaced).
        kind: ``"auto"`` or one of ``flat``, ``ivf``, ``ivfsq8``, ``ivfpq``, ``hnsw``.
        max_memory: FAISS memory budget (``"2GB"``, bytes); None: unlimited (auto then picks flat).
        target_recall: recall@10 the search effort is raised to reach (approximate kinds).
        metric, normalize, model_name: as :class:`EmbeddingIndex`; the model defaults to the embed job's.
        num_queries: held-out queries for the recall measurement (at most a tenth of the rows).
        seed: chooses the queries and the training sample.
        paths_file: names the rows of a single .npy file (instead of its sidecar).
        overwrite: replace an earlier index in ``output`` (False: refuse, also one that another build
            finished there while this one ran).
        index_args: fixed parameters of an explicit kind (``nlist``, ``nprobe``, ``pq_m``, ``m``,
            ``ef_search``); a given ``nprobe``/``ef_search`` is measured, not tuned.

    Returns:
        the saved index (its ``build_info`` holds the plan, memory and measured recall).
    """
    start = time.perf_counter()
    budget = None if max_memory is None else parse_bytes(max_memory)
    if not 0 < target_recall <= 1:
        raise ConfigError(f"target_recall must be in (0, 1], got {target_recall!r}")
    if isinstance(num_queries, bool) or not isinstance(num_queries, int) or num_queries < 1:
        raise ConfigError(f"num_queries (--queries) must be an integer >= 1, got {num_queries!r}")
    check_index_output(output)  # before the slow part: never over an embed folder or unrelated files
    unknown = set(index_args) - {"nlist", "nprobe", "pq_m", "m", "ef_search"}
    if unknown or (index_args and kind == "auto"):
        raise ConfigError(f"index parameters {sorted(index_args)} need an explicit kind (not auto)")
    for name, value in index_args.items():  # in range even where the kind ignores it (--nprobe 0 on flat)
        check_param(name, value)
    sources = open_sources(list(paths), paths_file=paths_file)
    if metric == "ip" and not normalize and sources.info.get("normalized") is False:
        logger.warning(
            "these embeddings were written unnormalised (embed --no-normalize) and metric 'ip' ranks them by "
            "raw inner product, not cosine; pass --normalize for cosine scores"
        )
    n, dim = sources.count, sources.dim
    plan = choose_plan(
        n, dim, metric, kind, budget, **{k: v for k, v in index_args.items() if k in ("nlist", "pq_m")}
    )
    logger.info("index plan for %d x %d: %s", n, dim, plan)
    rng = np.random.default_rng(seed)
    query_ids = np.sort(rng.choice(n, size=max(1, min(num_queries, n // 10 or 1)), replace=False))
    train_ids = None
    if plan["kind"] in IVF_KINDS:
        size = min(n, max(40 * plan["nlist"], 10_000), MAX_TRAIN)
        train_ids = np.sort(rng.choice(n, size=size, replace=False))
    queries, train = _sample(sources, query_ids, train_ids, normalize)
    index = EmbeddingIndex(
        dim,
        metric=metric,
        kind=plan["kind"],
        nlist=plan.get("nlist"),
        pq_m=plan.get("pq_m"),
        **{k: v for k, v in index_args.items() if k in ("nprobe", "m", "ef_search")},
        normalize=normalize,
        model_name=model_name or sources.info.get("model"),
        pooling=sources.info.get("pooling"),
    )
    if train is not None:
        index.train(train)
    del train
    depth = 2 * RECALL_K + 1  # deeper than k + 1 so that ties with the k-th neighbour are seen
    truth_scores = np.full((len(query_ids), depth), -np.inf if metric == "ip" else np.inf, np.float32)
    truth = np.full((len(query_ids), depth), -1, np.int64)
    row = 0
    for vectors, metadata in iter_batches(sources):
        ids = np.arange(row, row + len(vectors), dtype=np.int64)
        index.add(vectors, metadata=metadata, ids=ids)
        data = l2_normalize(vectors) if normalize else vectors
        for lo in range(0, len(data), _TRUTH_BLOCK):  # (Q, block) scores: bounded temporary memory
            block = data[lo : lo + _TRUTH_BLOCK]
            scores = _exact_scores(queries, block, metric)
            truth_scores, truth = _top_k_merge(
                truth_scores, truth, scores, ids[None, lo : lo + len(block)], depth, metric == "ip"
            )
        row += len(vectors)
    tune = not ({"nprobe", "ef_search"} & set(index_args))
    judge = _Judge(sources, queries, truth, truth_scores, query_ids, normalize)
    recall = _tune(index, judge, target_recall if tune else 0.0)
    index.build_info = {
        "factory": index.factory,
        # the embed job's weights (None for sidecar-less arrays): search warns when its model's differ
        "weights_sha256": sources.info.get("weights_sha256"),
        "kind": plan["kind"],
        "requested_kind": kind,
        "estimated_bytes": plan["estimated_bytes"],
        "max_memory": budget,
        "target_recall": target_recall,
        f"recall_at_{RECALL_K}": recall,
        "recall_protocol": "held-out queries from the data, own row dropped, exact search as truth",
        "query_ids": query_ids.tolist(),
        "nprobe": index.nprobe,
        "ef_search": index.ef_search if plan["kind"] == "hnsw" else None,
        "train_size": None if train_ids is None else len(train_ids),
        "seconds": round(time.perf_counter() - start, 3),
    }
    if recall < target_recall:
        # the fix depends on who chose the kind: auto chose it to fit a memory budget; an explicit kind
        # was the user's, with its own parameters
        fix = (
            "raise --max-memory"
            if kind == "auto"
            else "choose a less compressed kind (--kind ivfsq8, ivf or flat), or a larger --pq-m"
            if plan["kind"] == "ivfpq"
            else "choose a less compressed kind (--kind ivf or flat)"
        )
        logger.warning(
            "recall@%d is %.3f, below the target %.3f, even with exhaustive search: the %s index is too "
            "compressed; %s", RECALL_K, recall, target_recall, plan["kind"], fix,
        )  # fmt: skip
    index.save(output, overwrite=overwrite)
    return index


def _sample(sources: EmbeddingSources, query_ids: np.ndarray, train_ids: np.ndarray | None, normalize: bool):
    """One streaming pass collecting the query rows and the training rows (float32, normalised if asked)."""
    queries, train = _gather(sources, query_ids, train_ids)
    if normalize:
        zero = np.flatnonzero(~queries.any(axis=1))
        if zero.size:  # l2_normalize would name the row's place in this sample, not in the embeddings
            raise UserInputError(
                f"cannot L2-normalise a zero vector (row {int(query_ids[zero[0]])}); remove it or build "
                "without --normalize"
            )
        queries = l2_normalize(queries)
    return queries, train


def _gather(sources: EmbeddingSources, *wanted: np.ndarray | None) -> list[np.ndarray | None]:
    """The rows of each sorted id array in ``wanted`` (None stays None), from one streaming pass."""
    out = [None if ids is None else np.zeros((len(ids), sources.dim), np.float32) for ids in wanted]
    row = 0
    for vectors, _ in iter_batches(sources):
        end = row + len(vectors)
        for ids, target in zip(wanted, out, strict=True):
            if ids is None:
                continue
            lo, hi = np.searchsorted(ids, [row, end])
            target[lo:hi] = vectors[ids[lo:hi] - row]
        row = end
    return out


def _exact_scores(queries: np.ndarray, block: np.ndarray, metric: str) -> np.ndarray:
    """(Q, B) exact inner products or squared L2 distances (one formula for the truth and the judging)."""
    if metric == "ip":
        return queries @ block.T
    return (queries**2).sum(1, keepdims=True) - 2 * queries @ block.T + (block**2).sum(1)[None, :]


class _Judge:
    """Measures recall@10 of an index's answers against the exact truth gathered during the build."""

    def __init__(self, sources, queries, truth, truth_scores, query_ids, normalize: bool):
        self.sources, self.queries, self.normalize = sources, queries, normalize
        self.truth, self.truth_scores, self.query_ids = truth, truth_scores, query_ids
        self.overflows: np.ndarray | None = None

    def recall(self, found: np.ndarray, metric: str) -> float:
        """recall@10 of ``found`` (Q, >= 11) ids; exact scores of the hits only where ties overflow."""
        larger = metric == "ip"
        if self.overflows is None:
            self.overflows = truth_overflows(self.truth_scores, self.query_ids, self.truth, RECALL_K, larger)
        scores = self._found_scores(found, metric) if self.overflows.any() else None
        return recall_without_self(found, self.truth, self.truth_scores, self.query_ids, RECALL_K, larger,
                                   found_scores=scores)  # fmt: skip

    def _found_scores(self, found: np.ndarray, metric: str) -> np.ndarray:
        """Exact scores of the found ids of the overflowing queries (NaN elsewhere): one pass over the data.

        why: only these queries need it, and the pass happens only when some query has more tied
        neighbours than the truth keeps (many exact duplicates), so ordinary builds read the data as before.
        """
        rows = np.flatnonzero(self.overflows)
        ids = np.unique(found[rows])
        ids = ids[ids >= 0]
        (vectors,) = _gather(self.sources, ids)
        if self.normalize:
            vectors = l2_normalize(vectors)
        exact = _exact_scores(self.queries[rows], vectors, metric)  # (R, U)
        scores = np.full(found.shape, np.nan, np.float64)
        picked = found[rows]
        where = np.searchsorted(ids, np.maximum(picked, 0)).clip(max=max(len(ids) - 1, 0))
        values = np.take_along_axis(exact, where, axis=1) if len(ids) else np.full(picked.shape, np.nan)
        scores[rows] = np.where(picked >= 0, values, np.nan)
        return scores


def _tune(index: EmbeddingIndex, judge: _Judge, target: float) -> float:
    """The least nprobe / ef_search, doubling from 1 / 16, whose recall@10 >= target (or the exhaustive
    search); returns its recall. ``target`` 0 measures the index's current setting as it is.

    why from the least: a lower target must buy faster searches; starting at FAISS-style defaults (16
    cells, ef 64) searched every cell of a 16-cell index whatever the target.
    """
    k = min(RECALL_K + 1, len(index))
    if target > 0:
        if index.kind in IVF_KINDS:
            index.nprobe = 1
        elif index.kind == "hnsw":
            index.ef_search = 16
    while True:
        found = index.search(judge.queries, k=k).ids
        recall = judge.recall(found, index.metric)
        logger.info(
            "recall@%d = %.4f (nprobe=%s, ef_search=%s)", RECALL_K, recall, index.nprobe, index.ef_search
        )
        if recall >= target:
            return recall
        if index.kind in IVF_KINDS and index.nprobe < index.nlist:
            index.nprobe = min(2 * index.nprobe, index.nlist)
        elif index.kind == "hnsw" and index.ef_search < 4096:
            index.ef_search = 2 * index.ef_search
        else:
            return recall
