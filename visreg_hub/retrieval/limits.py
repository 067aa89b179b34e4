"""Bounds of an index's dimension, FAISS parameters and metadata: one home for what may be built and what
may load.

The manifest check (:mod:`.manifest`) refuses values outside these bounds in a saved index (the folder is
not trusted); the constructor and setters of :class:`~visreg_hub.retrieval.index.EmbeddingIndex` refuse
the same values up front, so an index that saves is an index that loads.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from visreg_hub.errors import ConfigError

MAX_DIM = 1 << 16
# nesting levels of one item's metadata (dicts and lists); pydantic's JSON serialiser stops at 255
MAX_METADATA_DEPTH = 64
# bytes of one item's metadata as stored (compact, ASCII-escaped JSON: one line of metadata.jsonl). A saved
# line longer than this is refused before it is read whole, so a tampered file cannot make the loader
# allocate gigabytes for one record; add() refuses the same size, so an index that saves is one that loads.
MAX_METADATA_BYTES = 1 << 20
# upper bound of each positive integer build/search parameter
PARAM_LIMITS = {
    "nlist": 1 << 24,
    "nprobe": 1 << 24,
    "pq_m": MAX_DIM,
    "m": 1 << 12,
    "ef_construction": 1 << 20,
    "ef_search": 1 << 20,
}


def check_bounded_int(label: str, value: Any, high: int) -> int:
    """``value`` as an int in ``[1, high]``, else a ConfigError naming the range."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or not 1 <= value <= high:
        raise ConfigError(
            f"{label} must be an integer in [1, {high}] (a saved index with more could not be loaded), "
            f"got {value!r}"
        )
    return int(value)


def check_param(name: str, value: Any) -> int:
    """A build/search parameter within :data:`PARAM_LIMITS`."""
    return check_bounded_int(name, value, PARAM_LIMITS[name])
