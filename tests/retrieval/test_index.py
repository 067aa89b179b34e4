"""EmbeddingIndex search results against brute-force numpy (float64) nearest neighbours."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from visreg_hub.errors import ConfigError
from visreg_hub.retrieval import EmbeddingIndex, recall_at_k

pytest.importorskip("faiss")


def brute_force(database: np.ndarray, queries: np.ndarray, k: int, metric: str):
    """Exact top-k in float64: (scores, positions), best first."""
    db = database.astype(np.float64)
    q = queries.astype(np.float64)
    if metric == "ip":
        scores = q @ db.T
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    else:
        scores = (q**2).sum(1, keepdims=True) - 2 * q @ db.T + (db**2).sum(1)[None, :]
        order = np.argsort(scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    database = rng.standard_normal((2000, 32)).astype(np.float32)
    queries = rng.standard_normal((50, 32)).astype(np.float32)
    return database, queries


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_flat_equals_brute_force(data, metric):
    database, queries = data
    index = EmbeddingIndex(32, metric=metric)
    index.add(database)
    result = index.search(queries, k=10)
    want_scores, want_positions = brute_force(database, queries, 10, metric)
    assert result.ids.shape == (50, 10) and result.ids.dtype == np.int64
    assert result.scores.dtype == np.float32
    np.testing.assert_array_equal(result.ids, want_positions)  # default ids are positions
    np.testing.assert_allclose(result.scores, want_scores, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_ivf_with_all_cells_probed_equals_exact(data, metric):
    database, queries = data
    index = EmbeddingIndex(32, metric=metric, kind="ivf", nlist=16)
    index.add(database)  # trains on the first add
    assert index.is_trained
    index.nprobe = 16
    result = index.search(queries, k=10)
    want_scores, want_positions = brute_force(database, queries, 10, metric)
    np.testing.assert_array_equal(result.ids, want_positions)
    np.testing.assert_allclose(result.scores, want_scores, rtol=1e-4, atol=1e-3)


def test_ivf_few_probes_is_approximate_but_not_exact(data):
    """Guards the test above: with nprobe=1 of 16 cells, results differ, so nprobe really reaches FAISS."""
    database, queries = data
    index = EmbeddingIndex(32, kind="ivf", nlist=16, nprobe=1)
    index.add(database)
    _, want = brute_force(database, queries, 10, "ip")
    recall = recall_at_k(index.search(queries, k=10).ids, want)
    assert 0.05 < recall < 0.9


def test_ivf_explicit_train_and_errors(data):
    database, _ = data
    index = EmbeddingIndex(32, kind="ivf", nlist=8)
    assert not index.is_trained
    index.train(database[:1000])
    index.add(database[1000:])
    assert len(index) == 1000 and index.nlist == 8
    small = EmbeddingIndex(32, kind="ivf", nlist=64)
    with pytest.raises(ValueError, match="nlist=64"):
        small.add(database[:10])


def test_ivf_default_nlist_keeps_39_points_per_cell(data):
    database, _ = data
    index = EmbeddingIndex(32, kind="ivf")
    index.add(database)
    assert index.nlist == min(round(4 * np.sqrt(2000)), 2000 // 39)


def test_hnsw_recall_at_10_vs_exact():
    rng = np.random.default_rng(1)
    database = rng.standard_normal((5000, 32)).astype(np.float32)
    queries = rng.standard_normal((200, 32)).astype(np.float32)
    database /= np.linalg.norm(database, axis=1, keepdims=True)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    index = EmbeddingIndex(32, kind="hnsw", m=32, ef_search=128)
    index.add(database)
    _, want = brute_force(database, queries, 10, "ip")
    assert recall_at_k(index.search(queries, k=10).ids, want) >= 0.95


def test_user_ids_and_metadata_follow_the_hits(data):
    database, queries = data
    rng = np.random.default_rng(2)
    user_ids = rng.choice(10**12, size=len(database), replace=False).astype(np.int64)
    metadata = [{"path": f"img_{i}.png", "label": int(i % 7)} for i in range(len(database))]
    index = EmbeddingIndex(32)
    index.add(database[:1500], ids=user_ids[:1500], metadata=metadata[:1500])
    index.add(database[1500:], ids=user_ids[1500:], metadata=metadata[1500:])  # two batches
    result = index.search(queries, k=5)
    _, positions = brute_force(database, queries, 5, "ip")
    np.testing.assert_array_equal(result.ids, user_ids[positions])
    assert result.metadata == [[metadata[p] for p in row] for row in positions.tolist()]
    assert index.get_metadata(result.ids[0]) == result.metadata[0]
    with pytest.raises(KeyError, match="not in the index"):
        index.get_metadata([12345678901234])


def test_k_larger_than_count_is_clipped():
    vectors = np.eye(4, dtype=np.float32)
    index = EmbeddingIndex(4)
    index.add(vectors)
    result = index.search(vectors[:2], k=10)
    assert result.ids.shape == (2, 4)
    assert result.ids[0, 0] == 0 and result.ids[1, 0] == 1
    assert set(result.ids[0].tolist()) == {0, 1, 2, 3}


def test_normalize_makes_ip_cosine():
    rng = np.random.default_rng(3)
    database = rng.standard_normal((100, 8)).astype(np.float32) * rng.uniform(0.1, 10, (100, 1))
    queries = rng.standard_normal((5, 8)).astype(np.float32) * 7
    index = EmbeddingIndex(8, normalize=True)
    index.add(database)
    assert index.normalized
    unit_db = database / np.linalg.norm(database, axis=1, keepdims=True)
    unit_q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    want_scores, want_positions = brute_force(unit_db, unit_q, 3, "ip")
    result = index.search(queries, k=3)
    np.testing.assert_array_equal(result.ids, want_positions)
    np.testing.assert_allclose(result.scores, want_scores, atol=1e-5)
    raw = EmbeddingIndex(8)
    raw.add(database)
    assert not raw.normalized  # norms far from 1 are detected


def test_accepts_torch_and_float64_and_1d_query(data):
    database, queries = data
    index = EmbeddingIndex(32)
    index.add(torch.from_numpy(database).half())
    single = index.search(queries[0].astype(np.float64), k=3)
    assert single.ids.shape == (1, 3)
    _, want = brute_force(database.astype(np.float16).astype(np.float32), queries[:1], 3, "ip")
    np.testing.assert_array_equal(single.ids, want)


def test_bad_inputs_give_clear_errors(data):
    database, _ = data
    index = EmbeddingIndex(32)
    with pytest.raises(ValueError, match="dimension 16 but the index holds 32"):
        index.add(database[:, :16])
    with pytest.raises(ValueError, match="floating-point"):
        index.add(database.astype(np.int32))
    bad = database[:5].copy()
    bad[3, 4] = np.nan
    with pytest.raises(ValueError, match=r"NaN or infinite values in 1 row.*row 3"):
        index.add(bad)
    with pytest.raises(ValueError, match="empty"):
        index.search(database[:1], k=1)
    index.add(database[:10])
    with pytest.raises(ValueError, match="dimension 31"):
        index.search(database[:1, :31], k=1)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        index.search(database[:1], k=0)
    with pytest.raises(ValueError, match="already in the index"):
        index.add(database[:2], ids=[0, 1])
    with pytest.raises(ValueError, match="duplicates"):
        index.add(database[:2], ids=[100, 100])
    with pytest.raises(ValueError, match="metadata must be a list of 2"):
        index.add(database[:2], metadata=[{"a": 1}])
    with pytest.raises(ValueError, match="JSON-serialisable"):
        index.add(database[:1], metadata=[{"a": object()}])
    assert len(index) == 10  # failed adds leave the index unchanged
    with pytest.raises(ConfigError, match="metric"):
        EmbeddingIndex(32, metric="cosine")
    with pytest.raises(ConfigError, match="kind"):
        EmbeddingIndex(32, kind="pq")
    with pytest.raises(ConfigError, match=r"dim must be an integer in \[1, 65536\]"):
        EmbeddingIndex(0)


def test_input_problems_are_named_in_the_index_terms():
    """Ragged rows, float64 values that overflow float32, and too few vectors for IVF-PQ each get a
    message saying what is wrong in the index's terms (not numpy's, and not a fix that cannot help)."""
    index = EmbeddingIndex(3)
    with pytest.raises(ValueError, match=r"vectors must be .* its rows have different lengths"):
        index.add([[1.0, 2.0, 3.0], [1.0, 2.0]])
    big = np.ones((2, 3))
    big[1, 2] = 1e300
    with pytest.raises(ValueError, match=r"beyond float32's range .* first at row 1"):
        index.add(big)
    assert len(index) == 0
    # probe 20: finite float32 rows of 1e38 were stored, and every search of an l2 (or unnormalised ip)
    # index over them scored inf (JSON null in the API, whose schema says a number)
    for metric in ("l2", "ip"):
        raw = EmbeddingIndex(3, metric=metric, normalize=False)
        huge = np.full((2, 3), 1e38, dtype=np.float32)
        huge[0] = 1.0
        with pytest.raises(
            ValueError, match=r"a row of norm 1.73e\+38 \(first at row 1\), too long for finite"
        ):
            raw.add(huge)
        limit = np.float32(np.sqrt(np.finfo(np.float32).max / 4) / np.sqrt(3) * 0.999)
        edge = np.full((2, 3), limit, dtype=np.float32)
        edge[1] *= -1  # the farthest pair at the bound: still a finite score
        raw.add(edge)
        result = raw.search(edge, k=2)
        assert np.isfinite(result.scores).all()
    pq = EmbeddingIndex(8, kind="ivfpq", nlist=4, pq_m=2)
    with pytest.raises(ValueError, match="256 for the product quantiser's codebooks") as info:
        pq.add(np.random.default_rng(0).standard_normal((100, 8)).astype(np.float32))
    assert "smaller nlist" not in str(info.value)
