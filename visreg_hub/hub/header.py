"""Reading a safetensors header (names, dtypes, shapes, offsets) without reading any tensor data.

Layout of a ``.safetensors`` file: 8 bytes little-endian header length N, N bytes of UTF-8 JSON
``{"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {str: str}}``,
then the data buffer; offsets are relative to the buffer. Every field is untrusted: the header is
checked against the file's real size before any of it is believed, so a hostile header can neither
make the loader allocate what the file does not hold nor raise anything but a :class:`CheckpointError`.
"""

from __future__ import annotations

import itertools
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from visreg_hub.errors import CheckpointError
from visreg_hub.jsonio import parse_json

# A ViT-G/14's header is about 100 KB (some 600 tensors); these bounds are far above any real encoder and
# keep parsing a hostile header at a fraction of a second (the safetensors library allows 100 MB).
MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_TENSORS = 65_536
MAX_DIMS = 8
ITEM_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8,
}  # fmt: skip
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")  # torch zip, pickle 2-5


def _pickle_start(head: bytes, size: int) -> bool:
    """Whether the first 9 bytes ``head`` of a ``size``-byte file start a pickle rather than a safetensors
    file. A safetensors header length whose low bytes are ``80 02`` .. ``80 05`` (640, 896, 1152 or 1408
    bytes, common for small models) reads like a pickle's protocol marker, so a file whose length field
    fits the file and whose header then opens with ``{`` is safetensors."""
    if not head.startswith(_PICKLE_MAGIC):
        return False
    if len(head) >= 9:
        (length,) = struct.unpack("<Q", head[:8])
        if length <= size - 8 and head[8:9] == b"{":
            return False
    return True


def looks_like_pickle(path: str | Path) -> bool:
    """Whether ``path`` starts like a pickled PyTorch file (torch's zip, or pickle protocol 2-5); never
    unpickles. Error messages use it to say why a ``.safetensors`` file does not load."""
    try:
        with open(path, "rb") as handle:
            return _pickle_start(handle.read(9), os.fstat(handle.fileno()).st_size)
    except OSError:
        return False


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's declaration: dtype (safetensors code), shape and byte range in the data buffer."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def read_header(path: str | Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and check the header of ``path``; no tensor data is read.

    Returns:
        (tensors by name, the ``__metadata__`` strings).

    Raises:
        CheckpointError: not a safetensors file, or a header inconsistent with itself or the file size.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(9)
            if len(prefix) < 8:
                raise _invalid(path, f"{size} bytes, too short")
            if _pickle_start(prefix, size):
                raise CheckpointError(
                    f"{path} is not a valid safetensors file: it looks like a pickled PyTorch file "
                    "(.pt/.pth/.bin) renamed to .safetensors; visreg_hub never unpickles weights. Convert it "
                    "with `visreg-hub convert` instead."
                )
            (length,) = struct.unpack("<Q", prefix[:8])
            if length > size - 8:
                # why not print the length: from a file that is no safetensors (a symlink to a secret, a
                # text file) these 8 bytes are its content, and an error message is no place for that
                raise _invalid(path, f"its header length field exceeds the file's {size} bytes")
            if length > MAX_HEADER_BYTES:
                raise _invalid(path, f"a {length}-byte header is declared (cap {MAX_HEADER_BYTES})")
            handle.seek(8)
            raw = handle.read(length)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        header = parse_json(raw, "header", error=CheckpointError, max_depth=4)
    except CheckpointError as exc:
        raise _invalid(path, str(exc)) from None
    if not isinstance(header, dict):
        raise _invalid(path, "the header is not a JSON object")
    count = len(header) - ("__metadata__" in header)
    if count > MAX_TENSORS:
        raise _invalid(path, f"{count:,} tensors, more than the {MAX_TENSORS:,} any encoder has")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _invalid(path, "__metadata__ must map strings to strings")
    data_size = size - 8 - length
    tensors = {name: _tensor_info(path, name, entry, data_size) for name, entry in header.items()}
    spans = sorted((info.begin, info.end, name) for name, info in tensors.items() if info.end > info.begin)
    for (_, end, first), (begin, _, second) in itertools.pairwise(spans):
        if begin < end:
            raise _invalid(path, f"tensors {first!r} and {second!r} overlap in the data buffer")
    return tensors, metadata


def _tensor_info(path: Path, name: str, entry: object, data_size: int) -> TensorInfo:
    where = f"tensor {name!r}"
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise _invalid(path, f"{where} should declare exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in ITEM_BYTES:
        raise _invalid(path, f"{where} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_count(d) for d in shape):
        raise _invalid(path, f"{where} has shape {shape!r}; expected up to {MAX_DIMS} non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_count(o) for o in offsets):
        raise _invalid(path, f"{where} has data_offsets {offsets!r}; expected [begin, end]")
    begin, end = offsets
    nbytes = math.prod(shape) * ITEM_BYTES[dtype]
    if not begin <= end <= data_size or end - begin != nbytes:
        raise _invalid(
            path,
            f"{where} declares {shape} {dtype} ({nbytes} bytes) at [{begin}, {end}) of a "
            f"{data_size}-byte buffer",
        )
    return TensorInfo(dtype, tuple(shape), begin, end)


def _invalid(path: Path, detail: str) -> CheckpointError:
    return CheckpointError(
        f"{path} is not a valid safetensors file ({detail}); it is corrupt, truncated or not safetensors: "
        "delete it (or its cache entry) and download or export it again"
    )


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
