"""Property-based fuzzing of what a model folder holds: config.json values/types/nesting and safetensors
headers (JSON, lengths, offsets, dtypes, shapes). Properties: the readers return a consistent result or
raise a VisregHubError, never anything else; and the header reader never refuses a file the safetensors
library itself accepts (a differential check against the reference implementation)."""

from __future__ import annotations

import contextlib
import json
import math
import struct
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import strategies as st

from tests.fixtures_models import tiny_config
from tests.fuzzing import dumps, fuzz_tests, json_values, nested
from visreg_hub.errors import VisregHubError
from visreg_hub.hub.format import config_from_json, config_to_json, read_config
from visreg_hub.hub.header import ITEM_BYTES, read_header
from visreg_hub.models.limits import FIELD_BOUNDS, ModelLimits, check_budget

BASE = config_to_json(tiny_config(), embedding_dim=32)
SECTIONS = ("model_args", "pretrained_cfg", "visreg")
KEYS = sorted({k for s in SECTIONS for k in BASE[s]} | {"architecture", "depth", "extra", "format_version"})


# ------------------------------------------------------------------------------------------ config.json
@st.composite
def mutated_configs(draw) -> dict:
    config = json.loads(json.dumps(BASE))
    for _ in range(draw(st.integers(1, 4))):
        section = draw(st.sampled_from((None, *SECTIONS)))
        target = config if section is None else config.get(section)
        if not isinstance(target, dict):
            target = config
        key = draw(st.sampled_from(KEYS) | st.text(max_size=6))
        action = draw(st.sampled_from(("set", "set", "delete", "nest", "replace-section")))
        if action == "delete":
            target.pop(key, None)
        elif action == "nest":
            target[key] = json.loads(nested(draw(st.integers(1, 200))))
        elif action == "replace-section" and section is not None:
            config[section] = draw(json_values)
        else:
            target[key] = draw(json_values | st.integers(-(2**40), 2**40))
    return config


def _config_property(config: dict) -> None:
    try:
        parsed = config_from_json(config, source="fuzzed config.json")
    except VisregHubError:
        return
    for name, bound in FIELD_BOUNDS.items():  # whatever is accepted is inside the documented bounds
        assert getattr(parsed, name) <= bound
    assert parsed.architecture.startswith("vit_") and ":" not in parsed.architecture
    with contextlib.suppress(VisregHubError):  # over budget is a fine answer; only the type matters
        check_budget(parsed, ModelLimits())


test_config_json_values, test_config_json_values_long = fuzz_tests(mutated_configs(), _config_property)


@st.composite
def config_bytes(draw) -> bytes:
    raw = dumps(draw(mutated_configs()))
    choice = draw(st.sampled_from(("as-is", "truncate", "flip", "random", "deep")))
    if choice == "truncate":
        raw = raw[: draw(st.integers(0, len(raw)))]
    elif choice == "flip":
        position = draw(st.integers(0, len(raw) - 1))
        raw = raw[:position] + bytes([raw[position] ^ draw(st.integers(1, 255))]) + raw[position + 1 :]
    elif choice == "random":
        raw = draw(st.binary(max_size=300))
    elif choice == "deep":
        raw = b'{"architecture": "vit_tiny_patch16_224", "visreg": ' + nested(50_000).encode() + b"}"
    return raw


def _config_file_property(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.json"
        path.write_bytes(raw)
        try:
            read_config(path)
        except VisregHubError as exc:
            assert "\n" not in str(exc)


test_config_json_bytes, test_config_json_bytes_long = fuzz_tests(config_bytes(), _config_file_property)


# ---------------------------------------------------------------------------------- safetensors headers
DTYPES = sorted(ITEM_BYTES)
JUNK_DTYPES = ["", "f32", "FLOAT", "F33", "I128"]


@st.composite
def safetensors_files(draw) -> bytes:
    """Either a real file (numpy tensors through safetensors.numpy) damaged a little, or a hostile header."""
    if draw(st.booleans()):
        from safetensors.numpy import save

        tensors = {}
        for i in range(draw(st.integers(0, 3))):
            shape = draw(st.lists(st.integers(0, 4), max_size=3))
            dtype = draw(st.sampled_from(("float32", "float16", "int64", "uint8", "bool")))
            tensors[f"t{i}"] = np.zeros(shape, dtype=dtype)
        raw = save(
            tensors, metadata=draw(st.none() | st.dictionaries(st.text(max_size=4), st.text(max_size=4)))
        )
        damage = draw(st.sampled_from(("none", "truncate", "flip", "grow")))
        if damage == "truncate":
            raw = raw[: draw(st.integers(0, len(raw)))]
        elif damage == "flip" and raw:
            position = draw(st.integers(0, len(raw) - 1))
            raw = raw[:position] + bytes([raw[position] ^ draw(st.integers(1, 255))]) + raw[position + 1 :]
        elif damage == "grow":
            raw += draw(st.binary(max_size=16))
        return raw
    header: dict = {}
    for i in range(draw(st.integers(0, 4))):
        entry = {
            "dtype": draw(st.sampled_from(DTYPES + JUNK_DTYPES)),
            "shape": draw(st.lists(st.integers(-2, 2**62), max_size=4) | json_values),
            "data_offsets": draw(st.lists(st.integers(-2, 2**63), min_size=0, max_size=3) | json_values),
        }
        if draw(st.integers(0, 9)) == 0:
            entry[draw(st.text(max_size=4))] = draw(json_values)
        header[f"t{i}"] = entry
    if draw(st.booleans()):
        header["__metadata__"] = draw(json_values)
    body = dumps(header) if draw(st.integers(0, 9)) else draw(st.binary(max_size=64))
    declared = len(body) if draw(st.booleans()) else draw(st.integers(0, 2**64 - 1))
    return struct.pack("<Q", declared) + body + draw(st.binary(max_size=64))


def _reference(path: Path):
    """What the safetensors library makes of the file: {name: (dtype, shape)}, or None if it refuses it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as handle:
            return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}  # noqa: SIM118
    except Exception:  # the reference refusing is fine; only its acceptance is compared
        return None


def _header_property(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.safetensors"
        path.write_bytes(raw)
        reference = _reference(path)
        try:
            tensors, metadata = read_header(path)
        except VisregHubError as exc:
            assert reference is None, f"refused a file safetensors accepts: {exc}"
            return
        data_size = len(raw) - 8 - struct.unpack("<Q", raw[:8])[0]
        for info in tensors.values():
            assert 0 <= info.begin <= info.end <= data_size
            assert info.end - info.begin == math.prod(info.shape) * ITEM_BYTES[info.dtype]
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
        if reference is not None:
            assert {name: info.shape for name, info in tensors.items()} == reference


test_safetensors_headers, test_safetensors_headers_long = fuzz_tests(safetensors_files(), _header_property)
