"""Shared fixtures: real image fixtures, seeded RNGs, a tiny random ViT.

Every test runs on the CPU with few threads so the default suite stays under 10 minutes on 2 cores.
"""

from __future__ import annotations

import atexit
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
