"""benchmarks/_doc.write_section: the one writer of docs/benchmarks.md sections for every benchmark script."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MARKER = re.compile(r"<!-- (\S+?):(\S+):(start|end) -->")


@pytest.fixture
def doc_module(monkeypatch):
    # the scripts import their helpers by name, with benchmarks/ on sys.path; do the same here
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return importlib.import_module("_doc")


def _section(script: str, key: str, text: str) -> str:
    return f"<!-- {script}:{key}:start -->\n{text}\n<!-- {script}:{key}:end -->\n"


def test_write_section_replaces_only_its_own_section(doc_module, tmp_path):
    path = tmp_path / "docs" / "benchmarks.md"
    doc_module.write_section(path, "cpu", "## A on cpu\n\nold", script="benchmarks/a.py")
    assert path.read_text() == doc_module.DOC_HEADER.rstrip("\n") + "\n\n" + _section(
        "benchmarks/a.py", "cpu", "## A on cpu\n\nold"
    )
    doc_module.write_section(path, "cpu", "## B on cpu", script="benchmarks/b.py")
    doc_module.write_section(path, "cuda", "## A on cuda", script="benchmarks/a.py")
    before = path.read_text()

    doc_module.write_section(path, "cpu", "## A on cpu\n\nnew\n\n", script="benchmarks/a.py")
    after = path.read_text()
    old_a = _section("benchmarks/a.py", "cpu", "## A on cpu\n\nold")
    new_a = _section("benchmarks/a.py", "cpu", "## A on cpu\n\nnew")
    assert after == before.replace(old_a, new_a)  # same place, neighbours byte for byte unchanged
    assert after.count("benchmarks/a.py:cpu:start") == 1
    # a longer key starting with the same device type is a section of its own
    doc_module.write_section(path, "cpu-onnx-batch1", "## A onnx", script="benchmarks/a.py")
    assert path.read_text().startswith(after.rstrip("\n"))
    assert "## A on cpu\n\nnew" in path.read_text()


def test_every_section_of_the_docs_names_a_script_that_exists():
    # a renamed script must take its section markers along, or its next run appends a duplicate section
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    markers = MARKER.findall(text)
    assert markers, "docs/benchmarks.md has no section markers"
    scripts = {script for script, _, _ in markers}
    assert "benchmarks/onnx_runtime.py" in scripts and "benchmarks/onnx.py" not in scripts
    for script in scripts:
        assert (ROOT / script).is_file(), script
        assert f'"{script}"' in (ROOT / script).read_text() or script == "benchmarks/losses.py", script
    for script, key, _ in markers:
        assert text.count(f"<!-- {script}:{key}:start -->") == 1
        assert text.count(f"<!-- {script}:{key}:end -->") == 1
