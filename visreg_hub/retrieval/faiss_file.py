"""Walk an ``index.faiss`` file and check it against the manifest before FAISS reads it.

FAISS trusts its files: a length field is allocated before it is read (a crafted 1 KB file can make
it allocate gigabytes), and graph links or inverted-list ids index arrays without bounds checks. So
the loader walks the file's structure here first, for exactly the layouts :class:`EmbeddingIndex`
writes (``IDMap2`` over Flat or HNSW-Flat; IVF-Flat, IVF-SQ8 or IVF-PQ with their own ids; FAISS's
``index_write.cpp``),
and checks that every length fits in the file and matches what the manifest declares (kind, dim,
count, metric, nlist, pq_m), that list ids and graph links point inside the index, and that the file
ends where the structure does. Only then does FAISS read it, from the same open file
(``storage.load_index``), so the bytes checked are the bytes loaded.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from visreg_hub.errors import CheckpointError

_METRIC = {"ip": 0, "l2": 1}
_METRIC_NAMES = {code: name for name, code in _METRIC.items()}
_CHUNK = 1 << 22  # elements per chunk when range-checking large int arrays


class _Reader:
    """Bounds-checked little-endian reads; every failure names the file and the field."""

    def __init__(self, handle: BinaryIO, path: Path) -> None:
        self.path = path
        self.handle = handle
        self.size = os.fstat(handle.fileno()).st_size
        self.pos = 0

    def fail(self, message: str) -> CheckpointError:
        return CheckpointError(
            f"{self.path} is not a valid index for its manifest: {message}; rebuild the index"
        )

    def raw(self, n: int, field: str) -> bytes:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"{field} needs {n} bytes at offset {self.pos}, the file has {self.size}")
        data = self.handle.read(n)
        self.pos += n
        return data

    def scalar(self, fmt: str, field: str):
        return struct.unpack("<" + fmt, self.raw(struct.calcsize(fmt), field))[0]

    def fourcc(self, field: str) -> str:
        return self.raw(4, field).decode("latin-1")

    def length(self, item_size: int, field: str, expected: int | None = None) -> int:
        """A FAISS vector's element count, checked against the bytes left (and ``expected``)."""
        n = self.scalar("Q", f"{field} length")
        if expected is not None and n != expected:
            raise self.fail(f"{field} has {n} elements, expected {expected}")
        if n * item_size > self.size - self.pos:
            raise self.fail(
                f"{field} declares {n} elements ({n * item_size} bytes), only {self.size - self.pos} left"
            )
        return n

    def skip(self, n: int, field: str) -> None:
        if self.pos + n > self.size:
            raise self.fail(f"{field} runs past the end of the file")
        self.handle.seek(n, 1)
        self.pos += n

    def array(self, dtype: str, n: int, field: str) -> np.ndarray:
        return np.frombuffer(self.raw(n * np.dtype(dtype).itemsize, field), dtype=dtype)

    def check_range(self, dtype: str, n: int, low: int, high: int, field: str) -> None:
        """Stream n integers and require low <= v < high, without holding them all."""
        done = 0
        while done < n:
            part = self.array(dtype, min(_CHUNK, n - done), field)
            if part.size and (int(part.min()) < low or int(part.max()) >= high):
                raise self.fail(f"{field} holds values outside [{low}, {high})")
            done += part.size


def _header(r: _Reader, dim: int, ntotal: int, metric: str, what: str) -> None:
    d = r.scalar("i", f"{what} dim")
    n = r.scalar("q", f"{what} ntotal")
    r.skip(16, f"{what} header")
    trained = r.scalar("B", f"{what} is_trained")
    metric_type = r.scalar("i", f"{what} metric")
    if trained != 1:
        raise r.fail(f"{what} is not marked trained")
    if (d, n, metric_type) != (dim, ntotal, _METRIC[metric]):
        raise r.fail(
            f"{what} has dim {d}, {n} vectors, metric {_METRIC_NAMES.get(metric_type, metric_type)!r}; "
            f"the manifest says {dim}, {ntotal}, {metric!r}"
        )


def _flat(r: _Reader, dim: int, ntotal: int, metric: str, what: str) -> None:
    want = "IxFI" if metric == "ip" else "IxF2"
    if (tag := r.fourcc(what)) != want:
        raise r.fail(f"{what} is {tag!r}, expected a flat {want!r} index")
    _header(r, dim, ntotal, metric, what)
    count = r.length(4, f"{what} vectors", dim * ntotal)  # stored as float-sized units
    r.skip(4 * count, f"{what} vectors")


def _inverted_lists(r: _Reader, nlist: int, code_size: int, ntotal: int) -> np.ndarray:
    if r.fourcc("inverted lists") != "ilar":
        raise r.fail("inverted lists are not FAISS array lists ('ilar')")
    if r.scalar("Q", "lists nlist") != nlist or r.scalar("Q", "lists code_size") != code_size:
        raise r.fail(f"inverted lists do not have nlist={nlist}, code_size={code_size}")
    layout = r.fourcc("lists layout")
    n = r.length(8, "list sizes")
    sizes = r.array("<u8", n, "list sizes").astype(object)
    if layout == "full" and n == nlist:
        lengths = list(sizes)
    elif layout == "sprs" and n % 2 == 0 and n <= 2 * nlist:
        numbers, lengths = list(sizes[0::2]), list(sizes[1::2])
        if any(k >= nlist for k in numbers) or len(set(numbers)) != len(numbers):
            raise r.fail("sparse inverted lists name lists outside 0..nlist-1 or twice")
    else:
        raise r.fail(f"inverted lists have an unknown layout {layout!r} or {n} sizes for nlist={nlist}")
    if sum(lengths) != ntotal:
        raise r.fail(f"inverted lists hold {sum(lengths)} vectors, the manifest says {ntotal}")
    ids = []
    for size in lengths:
        if size:
            r.skip(size * code_size, "list codes")
            ids.append(r.array("<i8", size, "list ids"))
    ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    if ids.size and ids.min() < 0:
        raise r.fail("inverted lists hold negative ids")
    return ids


def _ivf(r: _Reader, tag: str, dim: int, ntotal: int, metric: str, params: dict[str, Any]) -> np.ndarray:
    _header(r, dim, ntotal, metric, "IVF index")
    nlist = r.scalar("Q", "nlist")
    if nlist != params["nlist"]:
        raise r.fail(f"nlist is {nlist}, the manifest says {params['nlist']}")
    r.scalar("Q", "nprobe")
    _flat(r, dim, nlist, metric, "coarse quantizer")
    if r.scalar("b", "direct map type") != 0 or r.length(8, "direct map", 0) != 0:
        raise r.fail("IVF direct map must be empty")
    if tag == "IwFl":
        code_size = 4 * dim
    elif tag == "IwSq":
        qtype, rangestat = r.scalar("i", "SQ type"), r.scalar("i", "SQ range statistic")
        r.skip(4, "SQ range argument")
        if qtype != 0 or not 0 <= rangestat <= 3:  # QT_8bit; RS_minmax .. RS_optim
            raise r.fail(f"scalar quantizer type {qtype} / range statistic {rangestat} is not SQ8")
        if r.scalar("Q", "SQ dim") != dim or r.scalar("Q", "SQ code size") != dim:
            raise r.fail("scalar quantizer is not 8-bit over the manifest's dim")
        r.skip(4 * r.length(4, "SQ ranges", 2 * dim), "SQ ranges")
        code_size = r.scalar("Q", "SQ code size")
        r.scalar("B", "by_residual")
        if code_size != dim:
            raise r.fail(f"SQ8 code size {code_size} != dim {dim}")
    else:
        r.scalar("B", "by_residual")
        code_size = r.scalar("Q", "PQ code size")
        pq = (r.scalar("Q", "PQ dim"), r.scalar("Q", "PQ M"), r.scalar("Q", "PQ nbits"))
        if pq != (dim, params["pq_m"], 8) or code_size != params["pq_m"]:
            raise r.fail(f"PQ (dim, M, nbits) is {pq}, the manifest says ({dim}, {params['pq_m']}, 8)")
        r.skip(4 * r.length(4, "PQ centroids", 256 * dim), "PQ centroids")
    return _inverted_lists(r, nlist, code_size, ntotal)


def _hnsw(r: _Reader, dim: int, ntotal: int, metric: str) -> None:
    _header(r, dim, ntotal, metric, "HNSW index")
    levels_n = r.length(8, "level probabilities")
    if not 1 <= levels_n <= 64:
        raise r.fail(f"HNSW has {levels_n} levels")
    r.skip(8 * levels_n, "level probabilities")
    cum = r.array("<i4", r.length(4, "neighbours per level", levels_n + 1), "neighbours per level").astype(
        np.int64
    )
    if cum[0] != 0 or (np.diff(cum) < 0).any():
        raise r.fail("HNSW neighbour counts per level are not cumulative")
    levels = r.array("<i4", r.length(4, "node levels", ntotal), "node levels").astype(np.int64)
    if levels.size and (levels.min() < 1 or levels.max() > levels_n):
        raise r.fail("HNSW node levels are out of range")
    offsets = r.array("<u8", r.length(8, "offsets", ntotal + 1), "offsets").astype(np.int64)
    if offsets[0] != 0 or not np.array_equal(np.diff(offsets), cum[levels]):
        raise r.fail("HNSW offsets do not match the node levels")
    r.check_range("<i4", r.length(4, "links", int(offsets[-1])), -1, ntotal, "HNSW links")
    entry, max_level = r.scalar("i", "entry point"), r.scalar("i", "max level")
    if not (-1 <= entry < ntotal) or (ntotal and (entry < 0 or max_level != levels.max() - 1)):
        raise r.fail("HNSW entry point or max level is inconsistent")
    r.skip(12, "HNSW search parameters")
    _flat(r, dim, ntotal, metric, "HNSW storage")


def check_faiss_file(
    handle: BinaryIO, path: Path, *, kind: str, dim: int, ntotal: int, metric: str, params: dict[str, Any]
) -> np.ndarray:
    """Validate the open index file against the manifest; return its int64 (ntotal,) ids (id map or list ids).

    Reads ``handle`` from its start; ``path`` only names the file in messages. The caller rewinds the
    handle to hand the same bytes to FAISS.

    Raises:
        CheckpointError: any structural problem or disagreement with the manifest.
    """
    handle.seek(0)
    r = _Reader(handle, Path(path))
    tag = r.fourcc("index type")
    expected = {"flat": "IxM2", "hnsw": "IxM2", "ivf": "IwFl", "ivfsq8": "IwSq", "ivfpq": "IwPQ"}[kind]
    if tag != expected:
        raise r.fail(f"the index is {tag!r}, the manifest's kind {kind!r} needs {expected!r}")
    if kind in ("flat", "hnsw"):
        _header(r, dim, ntotal, metric, "id map")
        if kind == "flat":
            _flat(r, dim, ntotal, metric, "flat index")
        elif (inner := r.fourcc("inner index type")) != "IHNf":
            raise r.fail(f"the inner index is {inner!r}, kind 'hnsw' needs 'IHNf'")
        else:
            _hnsw(r, dim, ntotal, metric)
        ids = r.array("<i8", r.length(8, "id map", ntotal), "id map")
    else:
        ids = _ivf(r, tag, dim, ntotal, metric, params)
    if r.pos != r.size:
        raise r.fail(f"{r.size - r.pos} unexpected bytes after the index")
    return ids.astype(np.int64)
