"""training.source_eval: the per-source metrics against float64 references, the baselines on real images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training import source_eval as se
from training import sources

FIXTURE_ROOT = Path(__file__).resolve().parents[1] / "fixtures" / "sources"


def _reference_loo(x, labels, k, temperature):
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = x.astype(np.float64) @ x.astype(np.float64).T
    np.fill_diagonal(sim, -np.inf)
    hits = 0
    for i, row in enumerate(sim):
        top = np.argsort(-row, kind="stable")[:k]
        votes = np.zeros(labels.max() + 1)
        np.add.at(votes, labels[top], np.exp(row[top] / temperature))
        hits += int(votes.argmax() == labels[i])
    return hits / len(labels)


def test_leave_one_out_and_precision_match_float64_references():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 60)
    x = rng.normal(size=(60, 8)) + 1.5 * np.eye(8)[labels]
    assert se.leave_one_out_knn(x, labels, k=5) == pytest.approx(_reference_loo(x, labels, 5, 0.07))
    bank, bank_labels = x[:40], labels[:40]
    queries, query_labels = x[40:], labels[40:]
    a = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    b = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    top = np.argsort(-(b @ a.T), axis=1, kind="stable")[:, :5]
    expected = (bank_labels[top] == query_labels[:, None]).mean()
    assert se.precision_at_k(bank, bank_labels, queries, query_labels, k=5) == pytest.approx(expected)
    # a perfect embedding (one-hot labels) scores 100 %
    onehot = np.eye(4)[labels]
    assert se.leave_one_out_knn(onehot, labels) == 1.0
    assert se.precision_at_k(onehot[:40], bank_labels, onehot[40:], query_labels) == 1.0


def test_pixel_and_histogram_baselines_on_real_photos(monkeypatch):
    monkeypatch.setenv(sources.SOURCES_ENV, str(FIXTURE_ROOT))
    paths = [item.path for item in sources.list_source("endless_sky")]
    raw = se.raw_pixels(8)(paths)
    assert raw.shape == (len(paths), 192)
    np.testing.assert_allclose(raw.mean(axis=1), 0, atol=1e-6)
    hist = se.colour_histogram(bins=4)(paths)
    assert hist.shape == (len(paths), 64)
    np.testing.assert_allclose((hist**2).sum(axis=1), 1, rtol=1e-5)  # square roots of a distribution
    # independent recomputation of one histogram from the decoded centre square
    square = np.asarray(se.load_square(paths[0], 64), np.int64) // 64
    counts = np.zeros(64)
    np.add.at(counts, (square[..., 0] * 16 + square[..., 1] * 4 + square[..., 2]).ravel(), 1)
    np.testing.assert_allclose(hist[0], np.sqrt(counts / counts.sum()), rtol=1e-6)


def test_load_square_composites_transparency_on_white(tmp_path):
    rgba = np.zeros((10, 20, 4), np.uint8)
    rgba[:, :, 0] = 255  # red, fully transparent everywhere except the centre column block
    rgba[:, 8:12, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    square = np.asarray(se.load_square(tmp_path / "a.png", 10))
    assert square.shape == (10, 10, 3)
    assert (square[:, 0] == 255).all() and tuple(square[5, 5]) == (255, 0, 0)  # white edge, red centre


def test_evaluate_source_end_to_end_on_fixture_photos(monkeypatch):
    monkeypatch.setenv(sources.SOURCES_ENV, str(FIXTURE_ROOT))
    items = [i for i in sources.list_source("endless_sky") if i.label is not None]
    bank, test = items[::2], items[1::2]
    result = se.evaluate_source(se.raw_pixels(8), bank, test)
    assert result["n_test"] == len(test) and result["n_bank"] == len(bank) and result["n_classes"] == 2
    assert 0 <= result["knn"] <= 100 and 0 <= result["p@5"] <= 100 and 0 <= result["loo"] <= 100
