"""Validation of the ids and metadata handed to :meth:`EmbeddingIndex.add`.

Ids are int64 in ``[0, MAX_ID]`` (``-1`` is FAISS's "no result" marker, never a user id). ``MAX_ID``
is one below int64's largest value so that ``next_id`` (one above every id ever added) is itself an
int64: an index holding the largest id can still be saved, loaded and grown. Metadata is stored as
compact JSON text per id: a plain copy (later edits to the caller's dicts don't leak in) that costs
one string per vector instead of a tree of Python objects.
"""

from __future__ import annotations

import json
from collections.abc import Container
from typing import Any

import numpy as np

from visreg_hub.errors import UserInputError, VisregHubError
from visreg_hub.retrieval.limits import MAX_METADATA_BYTES, MAX_METADATA_DEPTH

MAX_ID = int(np.iinfo(np.int64).max) - 1


class IdConflictError(VisregHubError, ValueError):
    """An id given for a new vector is already live in the index (the server answers 409)."""


class IdsExhaustedError(UserInputError):
    """Automatic ids would pass ``MAX_ID`` (the server answers 409): they continue after the largest id the
    index ever held, so one explicit id near ``MAX_ID`` uses them up."""


def ids_exhausted(next_id: int, n: int) -> IdsExhaustedError | None:
    """The error for ``n`` automatic ids from ``next_id`` when they would pass ``MAX_ID``, else None."""
    if next_id + n - 1 <= MAX_ID:
        return None
    return IdsExhaustedError(
        f"automatic ids are used up: they continue after the largest id this index ever held "
        f"({next_id - 1}), and {n} more would pass the largest id {MAX_ID}; pass explicit ids (unused ones "
        f"in [0, {MAX_ID}]), or build a new index from the embeddings"
    )


def check_new_ids(
    ids: Any, n: int, *, next_id: int, live: Container[int], tombstones: Container[int]
) -> np.ndarray:
    """The int64 (n,) ids of n new vectors: ``ids`` validated, or ``next_id .. next_id + n - 1``.

    Raises:
        IdConflictError: an id is already live (a ValueError).
        IdsExhaustedError: no ``ids`` given and ``n`` automatic ids would pass ``MAX_ID`` (a ValueError).
        ValueError: wrong shape or dtype, out of range, duplicate, or removed from an HNSW graph that
            still holds them (``tombstones``).
    """
    if ids is None:
        exhausted = ids_exhausted(next_id, n)
        if exhausted is not None:
            raise exhausted
        return np.arange(next_id, next_id + n, dtype=np.int64)
    try:
        ids = np.asarray(ids)
    except (OverflowError, ValueError, TypeError):
        raise UserInputError(f"ids must be integers in [0, {MAX_ID}]") from None
    if ids.ndim != 1 or ids.shape[0] != n:
        raise UserInputError(f"ids must have shape ({n},) to match the vectors, got {tuple(ids.shape)}")
    if n and (ids.dtype == np.bool_ or not np.issubdtype(ids.dtype, np.integer)):
        raise UserInputError(f"ids must be integers, got dtype {ids.dtype}; use np.int64 ids")
    if n and (int(ids.min()) < 0 or int(ids.max()) > MAX_ID):
        raise UserInputError(f"ids must be in [0, {MAX_ID}], got {int(ids.min())}..{int(ids.max())}")
    ids = ids.astype(np.int64)
    if np.unique(ids).size != n:
        raise UserInputError("ids contain duplicates; every vector needs its own id")
    clash = [i for i in ids.tolist() if i in live]
    if clash:
        raise IdConflictError(f"ids already in the index: {clash[:5]}; use new ids")
    reused = [i for i in ids.tolist() if i in tombstones]
    if reused:
        raise UserInputError(
            f"ids {reused[:5]} were removed from this HNSW index, whose graph still holds them; "
            f"use new ids, or build a new index from the embeddings (a new EmbeddingIndex and add(), or "
            f"`visreg-hub index build`) to reuse them"
        )
    return ids


def lookup_ids(ids: Any) -> list[int]:
    """``ids`` (an int or integers, any shape) as Python ints, for lookups (``get_metadata``, ``remove``).

    Raises:
        ValueError: a non-integer (``1.7`` would otherwise be truncated to id 1), a bool, or an integer
            beyond int64.
    """
    try:
        array = np.asarray(ids)
    except (OverflowError, ValueError, TypeError):
        raise UserInputError(f"ids must be integers in [0, {MAX_ID}]") from None
    if array.size and (array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer)):
        raise UserInputError(f"ids must be integers, got {array.dtype} (e.g. {array.reshape(-1)[0]!r})")
    return [int(i) for i in array.reshape(-1).tolist()]


def _numpy_scalar(value: Any) -> Any:
    """numpy's scalars (``np.int64`` labels, ``np.float32`` scores, ``np.bool_``) as the Python numbers they
    hold, losslessly: ``{"label": labels[i]}`` with a numpy array of labels is the common case."""
    if isinstance(value, np.generic) and value.dtype.kind in "biuf":
        return value.item()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def encode_metadata(metadata: Any, n: int) -> list[str | None]:
    """n metadata dicts (or None) as compact JSON texts.

    Raises:
        ValueError: not a list of n dicts/None, an item :func:`metadata_problem` names (a key that is not a
            string, an unpaired surrogate, nesting deeper than ``MAX_METADATA_DEPTH``), or a value JSON
            cannot represent (NaN, objects, cycles). Tuples are stored, and come back, as lists; numpy
            scalars as the Python numbers they hold.
    """
    if metadata is None:
        return [None] * n
    if not isinstance(metadata, list | tuple) or len(metadata) != n:
        got = len(metadata) if isinstance(metadata, list | tuple) else type(metadata).__name__
        raise UserInputError(f"metadata must be a list of {n} dicts (one per vector), got {got}")
    texts: list[str | None] = []
    for i, item in enumerate(metadata):
        if item is None:
            texts.append(None)
            continue
        if not isinstance(item, dict):
            raise UserInputError(f"metadata[{i}] must be a dict or None, got {type(item).__name__}")
        problem = metadata_problem(item)
        if problem is not None:
            raise UserInputError(f"metadata[{i}] {problem}")
        try:
            text = json.dumps(item, allow_nan=False, separators=(",", ":"), default=_numpy_scalar)
        except (TypeError, ValueError, RecursionError) as exc:
            raise UserInputError(
                f"metadata[{i}] must be JSON-serialisable (str, numbers, lists, dicts): {exc}"
            ) from exc
        if len(text) > MAX_METADATA_BYTES:  # ASCII-escaped JSON: one character is one byte on disk
            raise UserInputError(
                f"metadata[{i}] is {len(text):,} bytes of JSON, over the {MAX_METADATA_BYTES:,} an index "
                "keeps per item; store large content elsewhere and keep its path or key here"
            )
        texts.append(text)
    return texts


def metadata_problem(value: Any) -> str | None:
    """Why ``value`` (one item's metadata) would not come back from JSON as given, or None if it would.

    Checked in one walk: dict keys that are not strings (JSON would turn ``{1: "a"}`` into
    ``{"1": "a"}``), strings holding an unpaired UTF-16 surrogate (not valid UTF-8, so no JSON reader,
    the server's included, can send them back), and nesting deeper than ``MAX_METADATA_DEPTH`` (JSON
    serialisers such as pydantic's refuse deep documents, so such an item would break every search that
    returns it). Lists and tuples both come back as lists, as from any JSON store.
    """
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list | tuple) and depth > MAX_METADATA_DEPTH:
            return f"is nested deeper than {MAX_METADATA_DEPTH} levels; flatten it"
        if isinstance(item, dict):
            for key, child in item.items():
                if not isinstance(key, str):
                    return (
                        f"has the key {key!r} ({type(key).__name__}); metadata is stored as JSON, whose keys "
                        "are strings, so it would come back changed: use string keys"
                    )
                stack.append((key, depth))
                stack.append((child, depth + 1))
        elif isinstance(item, list | tuple):
            stack.extend((child, depth + 1) for child in item)
        elif isinstance(item, str) and not _is_utf8(item):
            return (
                f"holds the text {item[:40]!r} with an unpaired surrogate; send valid UTF-8 text (for a file "
                "name that is not UTF-8, store visreg_hub.native_io.name_fields(name): readable text plus "
                "its exact bytes as hex)"
            )
    return None


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
