"""File names that are not valid UTF-8, in one place: paths handed to libraries with their own (C++/Rust)
file I/O, and names stored in JSON metadata.

A file name that is not valid UTF-8 (a Linux file system allows any bytes but ``/`` and NUL) reaches Python
as a ``str`` holding surrogate escapes (PEP 383). Python's own ``open`` round-trips those to the exact bytes,
but safetensors' ``load_file``, pyarrow, FAISS and ONNX Runtime encode the path as UTF-8 and fail, and some
say so misleadingly (safetensors' failure used to read as a corrupt file to delete). So every such call goes
through here: a UTF-8 path is handed over as a string (the libraries' fast native path), any other path is
opened by Python and handed over as an open file or its bytes.

FAISS is always given a Python file: the loader then reads the very bytes its structure check walked
(one open file, no second lookup by name), which also covers the non-UTF-8 case.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from visreg_hub.errors import UserInputError

__all__ = [
    "library_source",
    "load_safetensors",
    "name_fields",
    "onnx_model_source",
    "read_faiss",
    "split_name",
    "utf8_path",
    "write_faiss",
    "write_parquet",
]


def split_name(name: str | None) -> tuple[str | None, bytes | None]:
    """(UTF-8-safe text, exact bytes or None) of a file or member name from the file system.

    A name that is valid UTF-8 is returned as is, with no bytes. One holding surrogate escapes (bytes
    that are not UTF-8) is returned with each such byte written ``\\xNN`` (readable, not unique) and
    its exact bytes, so ``os.fsdecode(raw)`` gives back the name that opens the file.
    """
    if name is None:
        return None, None
    try:
        name.encode("utf-8")
        return name, None
    except UnicodeEncodeError:
        try:
            raw = name.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # a surrogate no file system decode makes; keep it reversible anyway
            raw = name.encode("utf-8", "surrogatepass")
        return raw.decode("utf-8", "backslashreplace"), raw


def name_fields(name: str, field: str = "path") -> dict[str, str]:
    """JSON-safe metadata for a file name: ``{field: text}``, plus ``{field}_bytes_hex`` (its exact bytes)
    when the name is not valid UTF-8, as :func:`split_name` splits it (the layout embed folders use).

    Index metadata must be valid UTF-8 JSON; ``os.fsdecode(bytes.fromhex(m["path_bytes_hex"]))`` gives back
    the name that opens the file.
    """
    text, raw = split_name(name)
    return {field: text} if raw is None else {field: text, f"{field}_bytes_hex": raw.hex()}


def utf8_path(path: str | os.PathLike[str] | bytes) -> str | None:
    """``path`` as a string native libraries accept, or None when its name is not valid UTF-8."""
    text = os.fsdecode(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return text


@contextlib.contextmanager
def library_source(path: str | os.PathLike[str]) -> Iterator[str | IO[bytes]]:
    """The path as a string when native libraries can take it, else the file opened for reading.

    For readers that accept either (pyarrow): ``with library_source(p) as src: pq.ParquetFile(src)``; what
    reads ``src`` must finish inside the ``with``.
    """
    text = utf8_path(path)
    if text is not None:
        yield text
        return
    with open(path, "rb") as handle:
        yield handle


def write_parquet(table: Any, path: str | os.PathLike[str]) -> None:
    """``pyarrow.parquet.write_table(table, path)`` through a Python file (any file name)."""
    import pyarrow.parquet as pq

    with open(path, "wb") as handle:
        pq.write_table(table, handle)


def load_safetensors(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``safetensors.torch.load_file(path, device="cpu")``; a non-UTF-8 name is read by Python first."""
    from safetensors.torch import load, load_file

    text = utf8_path(path)
    if text is not None:
        return load_file(text, device="cpu")
    return load(Path(path).read_bytes())


def write_faiss(index: Any, path: str | os.PathLike[str]) -> None:
    """``faiss.write_index(index, path)`` through a Python file (any file name)."""
    import faiss

    with open(path, "wb") as handle:
        writer = faiss.PyCallbackIOWriter(handle.write)
        faiss.write_index(index, writer)
        del writer  # flushes FAISS's buffer into ``handle`` before it closes


def read_faiss(handle: IO[bytes]) -> Any:
    """``faiss.read_index`` of an open binary file, from its current position."""
    import faiss

    reader = faiss.PyCallbackIOReader(handle.read)
    try:
        return faiss.read_index(reader)
    finally:
        del reader


def onnx_model_source(path: str | os.PathLike[str]) -> str | bytes:
    """What ``onnxruntime.InferenceSession`` is given for ``path``: the path, or the file's bytes.

    ONNX Runtime takes only UTF-8 paths. Bytes work for any name, but a model with external data (weights
    in side files, for models over 2 GB) needs its path to find them, so that case names the fix instead.
    """
    text = utf8_path(path)
    if text is not None:
        return text
    data = Path(path).read_bytes()
    if b"location" in data and _has_external_data(data):
        raise UserInputError(
            f"{os.fsdecode(path)!r}: ONNX Runtime cannot open a model with external weight files from a "
            "folder whose name is not valid UTF-8; rename the folder (or move the model) and load it again"
        )
    return data


def _has_external_data(data: bytes) -> bool:
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load_from_string(data, load_external_data=False)
    return any(uses_external_data(tensor) for tensor in model.graph.initializer)
