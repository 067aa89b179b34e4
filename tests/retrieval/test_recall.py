"""recall_without_self (what `index build` records and warns on) when the index holds fewer than k + 1
vectors: the denominator is the number of neighbours that exist, not k."""

from __future__ import annotations

import numpy as np

from visreg_hub.retrieval.build import recall_without_self


def _exact(vectors: np.ndarray):
    vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)  # each row is its own best hit
    scores = vectors @ vectors.T
    order = np.argsort(-scores, axis=1, kind="stable")
    return order, np.take_along_axis(scores, order, axis=1)


def test_an_exact_search_of_six_vectors_has_full_recall_at_10():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((6, 8)).astype(np.float32)
    truth, scores = _exact(vectors)
    ids = np.arange(6)
    assert recall_without_self(truth, truth, scores, ids, k=10) == 1.0  # was 5 / 10 = 0.5


def test_one_missed_neighbour_costs_one_over_the_neighbours_that_exist():
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((6, 8)).astype(np.float32)
    truth, scores = _exact(vectors)
    found = truth.copy()
    found[0, -1] = -1  # query 0 misses its farthest neighbour (5 exist; k = 10)
    expected = (6 * 5 - 1) / (6 * 5)
    assert abs(recall_without_self(found, truth, scores, np.arange(6), k=10) - expected) < 1e-12
    # with k below the neighbour count the usual definition holds: top-2 of each query
    found2 = truth.copy()
    found2[:, 1], found2[:, 2] = truth[:, 3], truth[:, 4]  # ranks 1-2 replaced by ranks 3-4 (all rows)
    assert recall_without_self(found2, truth, scores, np.arange(6), k=2) == 0.0


def test_a_single_vector_index_is_not_a_division_by_zero():
    vectors = np.ones((1, 4), np.float32)
    truth, scores = _exact(vectors)
    assert recall_without_self(truth, truth, scores, np.arange(1), k=10) == 1.0
