"""An ONNX file's ``metadata_props``, read from the protobuf wire format without the ``onnx`` package.

Running a cached graph needs only its metadata (preprocessing, pooling, outputs); ``import onnx`` costs
about 1.5 s of CPU here and ``onnx.load`` parses every weight, so a process that starts on ONNX Runtime
(``visreg-hub search``, ``serve``, the demo) spent that on every start. This scan visits the top-level
fields of ``ModelProto`` through a read-only memory map and skips each length-delimited field it does not
need by its length, so a 1 GB graph costs a few page reads.

Wire format (protobuf encoding spec): a field is a varint key ``number << 3 | wire_type`` and a value;
wire type 0 is a varint, 1 eight bytes, 2 a varint length then that many bytes, 5 four bytes (3 and 4,
groups, are not used by onnx.proto). Field numbers from onnx.proto: ``ModelProto.graph`` = 7,
``ModelProto.metadata_props`` = 14, ``GraphProto.node`` = 1, ``StringStringEntryProto.key`` = 1 and
``.value`` = 2.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from pathlib import Path

from visreg_hub.errors import CheckpointError

MODEL_GRAPH, MODEL_METADATA_PROPS = 7, 14
GRAPH_NODE = 1
ENTRY_KEY, ENTRY_VALUE = 1, 2
VARINT, FIXED64, LENGTH_DELIMITED, FIXED32 = 0, 1, 2, 5
_FIXED_SIZES = {FIXED64: 8, FIXED32: 4}
MAX_VARINT_BYTES = 10  # a 64-bit value
Buffer = bytes | mmap.mmap  # both index to ints and slice to bytes


class WireFormatError(CheckpointError):
    """The bytes are not a well-formed protobuf message (truncated, or not protobuf at all)."""


def _varint(data: Buffer, pos: int, end: int) -> tuple[int, int]:
    """(value, position after it) of the varint at ``pos``."""
    value = shift = 0
    for i in range(pos, min(end, pos + MAX_VARINT_BYTES)):
        byte = data[i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i + 1
        shift += 7
    raise WireFormatError(f"truncated or overlong varint at byte {pos}")


def fields(data: Buffer, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """The fields of the message in ``data[start:end]``: (number, wire type, value start, value end).

    A varint's value span is its bytes; a length-delimited field's is its payload (a string, or a nested
    message to pass to this function again).

    Raises:
        WireFormatError: a key or value runs past ``end``, or a wire type onnx.proto does not use.
    """
    pos = start
    while pos < end:
        key, pos = _varint(data, pos, end)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise WireFormatError(f"field number 0 at byte {pos}")
        if wire_type == VARINT:
            _, after = _varint(data, pos, end)
        elif wire_type == LENGTH_DELIMITED:
            length, pos = _varint(data, pos, end)
            after = pos + length
        elif wire_type in _FIXED_SIZES:
            after = pos + _FIXED_SIZES[wire_type]
        else:
            raise WireFormatError(f"wire type {wire_type} (field {number}) at byte {pos}")
        if after > end:
            raise WireFormatError(f"field {number} runs past the end of its message (byte {end})")
        yield number, wire_type, pos, after
        pos = after


def _text(data: Buffer, start: int, end: int) -> str:
    try:
        return data[start:end].decode("utf-8")
    except UnicodeDecodeError as exc:
        where = start + exc.start
        raise WireFormatError(f"a metadata string is not UTF-8 ({exc.reason} at byte {where})") from None


def scan_model(data: Buffer) -> tuple[dict[str, str], bool]:
    """(``metadata_props`` as a dict, whether the graph has nodes) of a serialised ``ModelProto``.

    A key given twice keeps its last value, as ``{p.key: p.value for p in proto.metadata_props}`` does.
    """
    metadata: dict[str, str] = {}
    has_nodes = False
    for number, wire_type, start, end in fields(data, 0, len(data)):
        if wire_type != LENGTH_DELIMITED:
            continue
        if number == MODEL_GRAPH:
            has_nodes = has_nodes or any(f == GRAPH_NODE for f, *_ in fields(data, start, end))
        elif number == MODEL_METADATA_PROPS:
            entry = {ENTRY_KEY: "", ENTRY_VALUE: ""}  # proto defaults
            for field, kind, value_start, value_end in fields(data, start, end):
                if field in entry and kind == LENGTH_DELIMITED:
                    entry[field] = _text(data, value_start, value_end)
            metadata[entry[ENTRY_KEY]] = entry[ENTRY_VALUE]
    return metadata, has_nodes


def read_model_metadata(path: str | Path) -> tuple[dict[str, str], bool]:
    """:func:`scan_model` of the file at ``path`` (memory-mapped, read-only; weights are not read).

    Raises:
        OSError: the file cannot be opened.
        WireFormatError: it is not a well-formed protobuf message.
    """
    with open(path, "rb") as file:
        size = file.seek(0, 2)
        if size == 0:  # mmap refuses empty files; an empty message has no fields
            return {}, False
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return scan_model(mapped)
