"""An ONNX file's metadata read from the protobuf wire format (``proto_scan``), against the ``onnx``
package's own parse of the same bytes: real exported graphs, hand-built edge cases, every truncation of a
real file and random bytes; and the process that reads it never imports ``onnx``."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from tests.fixtures_models import tiny_encoder
from visreg_hub.errors import CheckpointError

onnx = pytest.importorskip("onnx")

from visreg_hub.inference.onnx import export_onnx, read_onnx_metadata  # noqa: E402
from visreg_hub.inference.onnx.proto_scan import WireFormatError, read_model_metadata, scan_model  # noqa: E402

# the dynamo export of one model runs once per session (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("export_each_graph_once")


def onnx_reads(data: bytes) -> tuple[dict[str, str], bool] | None:
    """What ``onnx`` parses from ``data`` (None: it refuses the bytes), in scan_model's form."""
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception:  # protobuf's DecodeError, or a RuntimeWarning-like error on garbage
        return None
    return {p.key: p.value for p in proto.metadata_props}, bool(proto.graph.node)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Two real exports of one tiny model: the plain graph and the one with uint8 preprocessing baked in."""
    model, root = tiny_encoder(seed=0), tmp_path_factory.mktemp("scan")
    export_onnx(model, root / "plain.onnx")
    export_onnx(model, root / "baked.onnx", with_preprocessing=True)
    return [root / "plain.onnx", root / "baked.onnx"]


def test_real_exports_read_as_onnx_reads_them(exported):
    for path in exported:
        expected = onnx_reads(path.read_bytes())
        assert read_model_metadata(path) == expected
        assert expected[1] and any(key.startswith("visreg_hub.") for key in expected[0])
        assert read_onnx_metadata(path).model_name == "tiny-test"


def test_edge_cases_read_as_onnx_reads_them():
    """A key given twice keeps its last value; empty keys and values, non-ASCII text; no graph nodes."""
    proto = onnx.helper.make_model(onnx.helper.make_graph([], "empty", [], []))
    for key, value in (("a", ""), ("", "empty key"), ("ü名", "värde ✓"), ("a", "second")):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    data = proto.SerializeToString()
    assert scan_model(data) == onnx_reads(data) == ({"a": "second", "": "empty key", "ü名": "värde ✓"}, False)
    assert scan_model(b"") == ({}, False)


def test_every_truncation_is_refused_or_read_as_onnx_reads_it(exported):
    """Cut a real file at every byte up to the end of its metadata, and at sampled points inside its
    weights: the scan either refuses (WireFormatError) or agrees with onnx's parse of the same bytes."""
    data = exported[0].read_bytes()
    rng = np.random.default_rng(0)
    cuts = sorted(set(range(len(data) - 4096, len(data))) | set(rng.integers(1, len(data), 300).tolist()))
    refused = 0
    for cut in cuts:
        head = data[:cut]
        try:
            got = scan_model(head)
        except WireFormatError:
            refused += 1
            continue
        expected = onnx_reads(head)
        assert expected is None or got == expected, cut
    assert refused > len(cuts) // 2  # most cuts land inside a field


def test_random_bytes_are_refused_or_read_as_onnx_reads_them(tmp_path):
    rng = np.random.default_rng(1)
    for size in rng.integers(1, 4000, 200):
        data = rng.integers(0, 256, int(size), dtype=np.uint8).tobytes()
        try:
            got = scan_model(data)
        except WireFormatError:
            continue
        expected = onnx_reads(data)
        assert expected is None or got == expected
    (tmp_path / "photo.onnx").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)
    with pytest.raises(CheckpointError, match=r"photo\.onnx"):
        read_onnx_metadata(tmp_path / "photo.onnx")


def test_reading_metadata_does_not_import_onnx(exported):
    """``import onnx`` is about 1.5 s of a process start; a cached graph's metadata needs none of it."""
    code = (
        "import sys\n"
        "from visreg_hub.inference.onnx.runtime import read_onnx_metadata\n"
        f"meta = read_onnx_metadata({str(exported[1])!r})\n"
        "assert meta.has_preprocessing, meta\n"
        "print(sorted(name for name in sys.modules if name == 'onnx' or name.startswith('onnx.')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
