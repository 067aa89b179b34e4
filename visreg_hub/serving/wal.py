"""The append-only log of index changes: framed, checksummed records; a torn tail is cut off.

Record layout (little-endian)::

    b"VL"  version:u8  reserved:u8  length:u32  crc32:u32  payload[length]
    payload = JSON header (UTF-8) + b"\\0" + float32 vectors (n * dim * 4 bytes, "add" only)

Header: ``{"op": "add", "ids": [...], "dim": D, "metadata": [...]}`` or ``{"op": "remove", "ids": [...]}``.

A process killed mid-append leaves a partial record at the end of the file. Reading stops at the first
record that is short, has a wrong magic or a wrong checksum, and :meth:`LogWriter.open` truncates the
file there before appending, so later records never hide behind garbage. Only the tail can be torn:
records are appended and fsynced one at a time, and a record is acknowledged only after its fsync. So a
damaged record with an intact one after it is not a crash's tail but damage to the file: reading refuses
it (nothing is cut) and names both offsets.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from visreg_hub.durable import fsync_dir
from visreg_hub.errors import CheckpointError

MAGIC = b"VL"
VERSION = 1
_FRAME = struct.Struct("<2sBBII")
# One record holds one request's items (max_items * dim floats + metadata); 1 GiB is far above any
# valid record and keeps a corrupt length field from allocating without bound.
MAX_RECORD_BYTES = 2**30


@dataclass(frozen=True)
class LogRecord:
    """One logged change. ``vectors`` is (n, dim) float32 for ``add`` and None for ``remove``."""

    op: str
    ids: np.ndarray  # int64 (n,)
    vectors: np.ndarray | None = None
    metadata: list[dict[str, Any] | None] | None = None

    def encode(self) -> bytes:
        header: dict[str, Any] = {"op": self.op, "ids": [int(i) for i in self.ids]}
        body = b""
        if self.op == "add":
            vectors = np.ascontiguousarray(self.vectors, dtype="<f4")
            header["dim"] = int(vectors.shape[1])
            header["metadata"] = self.metadata
            body = vectors.tobytes()
        payload = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8") + b"\0" + body
        return _FRAME.pack(MAGIC, VERSION, 0, len(payload), zlib.crc32(payload)) + payload

    @classmethod
    def decode(cls, payload: bytes) -> LogRecord:
        head, sep, body = payload.partition(b"\0")
        if not sep:
            raise CheckpointError("log record has no header terminator")
        header = json.loads(head.decode("utf-8"))
        if not isinstance(header, dict) or header.get("op") not in ("add", "remove"):
            raise CheckpointError(f"log record has an unknown op: {str(header)[:80]}")
        ids = np.asarray(header.get("ids"), dtype=np.int64).reshape(-1)
        if header["op"] == "remove":
            return cls("remove", ids)
        dim = int(header["dim"])
        vectors = np.frombuffer(body, dtype="<f4")
        if dim < 1 or vectors.size != ids.size * dim:
            raise CheckpointError(f"log record holds {vectors.size} floats, expected {ids.size} x {dim}")
        metadata = header.get("metadata")
        if metadata is not None and (not isinstance(metadata, list) or len(metadata) != ids.size):
            raise CheckpointError("log record metadata does not match its ids")
        return cls("add", ids, vectors.reshape(ids.size, dim).astype(np.float32), metadata)


def read_log(path: Path) -> tuple[list[LogRecord], int]:
    """Every intact record of ``path`` in order, and the byte offset where the intact prefix ends.

    A missing file is an empty log. Reading stops at the first torn or corrupt record (see the module
    docstring); the caller truncates there.
    """
    records: list[LogRecord] = []
    if not path.exists():
        return records, 0
    good = 0
    with path.open("rb") as handle:
        while True:
            frame = handle.read(_FRAME.size)
            if len(frame) < _FRAME.size:
                break
            magic, version, _, length, crc = _FRAME.unpack(frame)
            if magic != MAGIC or version != VERSION or length > MAX_RECORD_BYTES:
                break
            payload = handle.read(length)
            if len(payload) < length or zlib.crc32(payload) != crc:
                break
            try:
                records.append(LogRecord.decode(payload))
            except (CheckpointError, ValueError, TypeError, KeyError, OverflowError, RecursionError):
                break  # a checksummed record we cannot parse: stop, as for a torn one
            good = handle.tell()
        later = _intact_record_after(handle, good)
    if later is not None:
        raise CheckpointError(
            f"{path}: the record at byte {good} is damaged, but an intact record follows at byte {later}: "
            f"not the torn tail a crash leaves, so nothing was cut and acknowledged changes after it are "
            f"kept on disk. Restore the store from a backup, or keep the {len(records)} records before it "
            f"and lose the rest with `truncate -s {good} {path}`"
        )
    return records, good


def _intact_record_after(handle, start: int) -> int | None:
    """Offset of the first intact record (magic, version, length and CRC-32 all right) after ``start``.

    Only the tail can be torn (module docstring), so damage followed by an intact record means the file
    was damaged where it had been written long ago: cutting there would drop acknowledged records.
    """
    size = os.fstat(handle.fileno()).st_size
    if size - start <= _FRAME.size:
        return None
    import mmap

    with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        position = data.find(MAGIC, start + 1)
        while position != -1:
            if position + _FRAME.size <= size:
                _, version, _, length, crc = _FRAME.unpack_from(data, position)
                end = position + _FRAME.size + length
                framed = version == VERSION and length <= MAX_RECORD_BYTES and end <= size
                if framed and zlib.crc32(data[position + _FRAME.size : end]) == crc:
                    return position
            position = data.find(MAGIC, position + 1)
    return None


class LogWriter:
    """Appends records durably: each :meth:`append` returns only after the bytes are fsynced.

    Args:
        path: the log file; created if missing, truncated to ``valid_bytes`` (the intact prefix
            :func:`read_log` found) before the first append.
    """

    def __init__(self, path: Path, valid_bytes: int = 0) -> None:
        self.path = path
        created = not path.exists()
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o644)
        if os.fstat(self._fd).st_size != valid_bytes:
            os.ftruncate(self._fd, valid_bytes)
            os.fsync(self._fd)
        if created:
            fsync_dir(path.parent)
        self.records = 0

    def append(self, record: LogRecord) -> None:
        """Write one record and fsync it; on failure (e.g. disk full) the file is cut back to before it."""
        data = record.encode()
        start = os.fstat(self._fd).st_size
        try:
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            os.fsync(self._fd)
        except OSError:
            os.ftruncate(self._fd, start)  # no half record may precede later ones
            raise
        self.records += 1

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
