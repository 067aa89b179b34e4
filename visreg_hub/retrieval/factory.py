"""Index kinds as FAISS ``index_factory`` strings, and what each costs in memory.

Vectors carry stable int64 user ids: flat and HNSW through an ``IDMap2`` wrapper, the IVF kinds in
their inverted lists (FAISS's own ids; ``IDMap2`` over IVF cannot ``remove`` correctly). The byte
estimates are what FAISS holds in RAM for N vectors of dimension D (codes, list ids, id map and its
reverse hash map, trained tables); :mod:`visreg_hub.retrieval.autoindex` uses them to fit an index
to a memory budget.
"""

from __future__ import annotations

import math

from visreg_hub.errors import ConfigError

KINDS = ("flat", "ivf", "ivfsq8", "ivfpq", "hnsw")
IVF_KINDS = ("ivf", "ivfsq8", "ivfpq")
# IDMap2 keeps id_map (8 B) plus an unordered_map<int64, int64> reverse map (node + bucket, about 40 B
# on glibc); IVF lists store an 8-byte id per vector instead.
IDMAP_BYTES_PER_VECTOR = 48
IVF_ID_BYTES = 8
PQ_NBITS = 8


def default_nlist(n: int) -> int:
    """FAISS's rule of thumb 4*sqrt(n), capped so every cell gets >= 39 k-means training points."""
    return max(1, min(round(4 * math.sqrt(n)), n // 39))


def default_pq_m(dim: int) -> int:
    """PQ sub-quantizers: the largest of 64, 32, 16, ... dividing dim with at least 2 dims per code byte."""
    for m in (64, 32, 16, 8, 4, 2, 1):
        if dim % m == 0 and dim // m >= 2:
            return m
    return 1


def factory_string(kind: str, *, dim: int, nlist: int | None, pq_m: int | None, m: int) -> str:
    """The ``index_factory`` description of ``kind`` (without the ``IDMap2,`` prefix)."""
    if kind == "flat":
        return "Flat"
    if kind == "hnsw":
        return f"HNSW{m},Flat"
    if kind not in IVF_KINDS:
        raise ConfigError(f"kind must be one of {KINDS}, got {kind!r}")
    if nlist is None:
        raise ConfigError(f"kind={kind!r} needs nlist (IVF cells); train() picks one from the data")
    if kind == "ivf":
        return f"IVF{nlist},Flat"
    if kind == "ivfsq8":
        return f"IVF{nlist},SQ8"
    pq_m = default_pq_m(dim) if pq_m is None else pq_m
    if dim % pq_m:
        raise ConfigError(f"pq_m={pq_m} must divide the dimension {dim}; try {default_pq_m(dim)}")
    # "np": no polysemous training (a simulated-annealing code reordering that IVF search does not
    # use; it makes PQ training 40x slower)
    return f"IVF{nlist},PQ{pq_m}x{PQ_NBITS}np"


def estimate_bytes(
    kind: str, *, n: int, dim: int, nlist: int | None = None, pq_m: int | None = None, m: int = 32,
    metric: str = "ip",
) -> int:  # fmt: skip
    """Approximate RAM of a FAISS index of ``kind`` holding ``n`` vectors (what ``load`` will need).

    Args:
        kind: one of :data:`KINDS`.
        n: vectors stored; dim: their dimension D.
        nlist, pq_m, m: the kind's parameters (IVF cells, PQ sub-quantizers, HNSW neighbours).
        metric: ``"l2"`` IVF-PQ also keeps precomputed residual tables (nlist * pq_m * 256 floats).
    """
    per_vector = 0 if kind in IVF_KINDS else IDMAP_BYTES_PER_VECTOR
    fixed = 0
    if kind == "flat":
        per_vector += 4 * dim
    elif kind == "hnsw":
        # storage + level-0 links (2m int32) + offsets/levels; upper levels add about 1/m of that
        per_vector += 4 * dim + 2 * m * 4 + 16 + 4 * m * 4 // max(m, 1)
    else:
        nlist = default_nlist(n) if nlist is None else nlist
        fixed += 4 * nlist * dim  # coarse centroids
        if kind == "ivf":
            per_vector += 4 * dim + IVF_ID_BYTES
        elif kind == "ivfsq8":
            per_vector += dim + IVF_ID_BYTES
            fixed += 2 * 4 * dim
        elif kind == "ivfpq":
            pq_m = default_pq_m(dim) if pq_m is None else pq_m
            per_vector += pq_m + IVF_ID_BYTES
            fixed += 4 * (1 << PQ_NBITS) * dim
            if metric == "l2":
                fixed += 4 * nlist * pq_m * (1 << PQ_NBITS)
        else:
            raise ConfigError(f"kind must be one of {KINDS}, got {kind!r}")
    return int(fixed + per_vector * n)
