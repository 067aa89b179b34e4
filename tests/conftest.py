"""Shared fixtures: real image fixtures, seeded RNGs, a tiny random ViT.

Every test runs on the CPU with one torch thread, and ``make test`` runs one pytest-xdist worker per core,
so the default suite keeps both cores of a 2-core machine busy without oversubscribing them.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"

# One intra-op thread: tests spawn ranks and workers of their own, and two threads per process on two
# cores oversubscribe (measured: a resume test 88 s with 2 threads, 5 s with 1 on a busy machine).
torch.set_num_threads(1)

# from_pretrained's default backend on a CPU is ONNX Runtime ("auto"), which exports each new model once
# (seconds per tiny model, about a minute for ViT-S/16 on a busy machine). Tests that are not about the
# backend choice run on torch so the default run stays fast; tests of "auto"/"onnx" ask for them explicitly.
# Exported graphs go to a throw-away cache, never the user's (~/.cache/visreg_hub). Both reach subprocesses.
os.environ.setdefault("VISREG_HUB_BACKEND", "torch")
if "VISREG_HUB_CACHE" not in os.environ:
    os.environ["VISREG_HUB_CACHE"] = tempfile.mkdtemp(prefix="visreg-hub-test-cache-")
    atexit.register(shutil.rmtree, os.environ["VISREG_HUB_CACHE"], True)


def _utf8_safe(text: str) -> str:
    """``text`` with lone surrogates (undecodable file-name bytes from os.fsdecode) as ``\\udcxx``."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Captured output that names non-UTF-8 files holds lone surrogates; pytest-xdist must send each report
    to the controller as UTF-8 (execnet refuses them and the whole run stops), so they are escaped."""
    outcome = yield
    report = outcome.get_result()
    report.sections = [(title, _utf8_safe(content)) for title, content in report.sections]


_EXPORTED_GRAPHS: dict[tuple, bytes] = {}


@pytest.fixture(scope="session")
def export_each_graph_once():
    """Memoise the dynamo export (``export_core``) for the session: one tiny ViT takes ~10 s to export on
    this CPU, and the ONNX tests export the same weights dozens of times to test what happens around the
    export (caching, checks, int8, fp16, failures). Keyed on everything the graph depends on (weights,
    dtypes and shapes through ``weights_digest``, the model config, the export options), and every call
    gets its own copy, so a test sees exactly the graph a fresh export would give it. Tests that replace
    ``export_core`` themselves still can (their monkeypatch is undone back to this one)."""
    import onnx
    import onnx_ir

    from visreg_hub.hub.format import weights_digest
    from visreg_hub.inference.onnx import export as export_module

    real_export = export_module.export_core

    def export_core(encoder, **options):
        config = json.dumps(encoder.config.to_dict(), sort_keys=True)
        key = (type(encoder).__qualname__, weights_digest(encoder), str(encoder.device), config,
               tuple(sorted(options.items())))  # fmt: skip
        if key not in _EXPORTED_GRAPHS:
            graph = real_export(encoder, **options)
            _EXPORTED_GRAPHS[key] = onnx_ir.serde.serialize_model(graph).SerializeToString()
        return onnx_ir.serde.deserialize_model(onnx.ModelProto.FromString(_EXPORTED_GRAPHS[key]))

    patch = pytest.MonkeyPatch()
    patch.setattr(export_module, "export_core", export_core)
    yield
    patch.undo()


@pytest.fixture(autouse=True)
def _restore_root_logging():
    """The CLI's main() configures the root logger (basicConfig, INFO with --verbose); called in-process, it
    would change what later tests of the same worker capture, so each test gets the root logger back."""
    root = logging.getLogger()
    level, before = root.level, set(root.handlers)
    yield
    root.setLevel(level)
    for handler in list(root.handlers):  # pytest's own capture handlers come and go with each phase
        if handler not in before and not type(handler).__module__.startswith("_pytest"):
            root.removeHandler(handler)


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same RNG state, so failures reproduce."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def fmnist_train() -> tuple[np.ndarray, np.ndarray]:
    """500 real Fashion-MNIST training images (50 per class): uint8 (500, 28, 28) and labels (500,)."""
    data = np.load(FIXTURES / "fmnist_train_500.npz")
    return data["images"], data["labels"]


@pytest.fixture(scope="session")
def fmnist_test() -> tuple[np.ndarray, np.ndarray]:
    """200 real Fashion-MNIST test images (20 per class): uint8 (200, 28, 28) and labels (200,)."""
    data = np.load(FIXTURES / "fmnist_test_200.npz")
    return data["images"], data["labels"]


@pytest.fixture(scope="session")
def photo_paths() -> list[Path]:
    """Four real colour photos (scikit-image samples, JPEG, at most 160 px)."""
    return sorted((FIXTURES / "photos").glob("*.jpg"))
