"""Fixtures of the serving tests: a tiny saved model and one shared in-process server per module."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.fixtures_models import tiny_encoder

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random ViT (28 px, 3 channels) saved in the hub format."""
    folder = tmp_path_factory.mktemp("serve_model") / "tiny"
    tiny_encoder(seed=5, name="serve-test").save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def fmnist_images() -> np.ndarray:
    """40 real Fashion-MNIST test images, uint8 (40, 28, 28)."""
    return np.load(FIXTURES / "fmnist_test_200.npz")["images"][::5]


@pytest.fixture(scope="session")
def photo_bytes() -> list[bytes]:
    """The four real colour JPEG photos of tests/fixtures/photos, as bytes."""
    return [p.read_bytes() for p in sorted((FIXTURES / "photos").glob("*.jpg"))]
