"""Stable ids, remove and metadata by id, for every index kind, checked against exact numpy search."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from visreg_hub.errors import CheckpointError
from visreg_hub.retrieval import EmbeddingIndex

pytest.importorskip("faiss")

KIND_ARGS = {
    "flat": {},
    "ivf": {"nlist": 16, "nprobe": 2},
    "ivfsq8": {"nlist": 16, "nprobe": 2},
    "ivfpq": {"nlist": 16, "nprobe": 2, "pq_m": 8},
    "hnsw": {"m": 16, "ef_search": 16},
}


def exact_ids(database: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    scores = queries.astype(np.float64) @ database.astype(np.float64).T
    return ids[np.argsort(-scores, axis=1, kind="stable")[:, :k]]


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return rng.standard_normal((3000, 32)).astype(np.float32), rng.standard_normal((40, 32)).astype(
        np.float32
    )


@pytest.mark.parametrize("kind", list(KIND_ARGS))
def test_removed_ids_never_come_back_and_slots_are_never_empty(tmp_path, data, kind):
    database, queries = data
    index = EmbeddingIndex(32, kind=kind, **KIND_ARGS[kind])
    ids = index.add(database, metadata=[{"row": i} for i in range(len(database))])
    np.testing.assert_array_equal(ids, np.arange(3000))
    # remove the exact top-5 of every query: the hits an index is most likely to return
    gone = np.unique(exact_ids(database, ids, queries, 5))
    assert index.remove(gone) == gone.size and index.remove(gone) == 0
    assert len(index) == 3000 - gone.size
    for candidate in (index, EmbeddingIndex.load(index.save(tmp_path / kind))):
        result = candidate.search(queries, k=50)
        assert result.ids.shape == (40, 50)
        assert (result.ids >= 0).all(), "no -1 slots, even with nprobe=2 of 16 cells"
        assert not np.isin(result.ids, gone).any()
        assert all(len(set(row)) == len(row) for row in result.ids.tolist())
        assert [[m["row"] for m in row] for row in result.metadata] == result.ids.tolist()
        with pytest.raises(KeyError, match="not in the index"):
            candidate.get_metadata(gone[:1])
    if kind == "flat":  # exact kind: after removal, results equal exact search over the rest
        keep = np.setdiff1d(ids, gone)
        np.testing.assert_array_equal(result.ids, exact_ids(database[keep], keep, queries, 50))


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_auto_ids_are_monotone_and_never_reused(tmp_path, data, kind):
    database, _ = data
    index = EmbeddingIndex(32, kind=kind, **KIND_ARGS[kind])
    first = index.add(database[:1000])
    index.remove(first[-10:])  # the largest ids: a max()+1 counter would hand them out again
    second = index.add(database[1000:1010])
    assert second.tolist() == list(range(1000, 1010))
    loaded = EmbeddingIndex.load(index.save(tmp_path / "idx"))
    loaded.remove(second)
    assert loaded.add(database[1010:1012]).tolist() == [1010, 1011]
    assert loaded.next_id == 1012
    explicit = loaded.add(database[1012:1013], ids=[10**15])
    assert explicit.tolist() == [10**15] and loaded.add(database[1013:1014]).tolist() == [10**15 + 1]


def test_removed_id_can_be_reused_explicitly_except_in_hnsw(data):
    database, _ = data
    flat = EmbeddingIndex(32)
    flat.add(database[:10], ids=np.arange(10) + 100)
    flat.remove([105])
    flat.add(database[10:11], ids=[105], metadata=[{"new": True}])
    assert flat.get_metadata([105]) == [{"new": True}]
    assert flat.search(database[10], k=1).ids[0, 0] == 105
    graph = EmbeddingIndex(32, kind="hnsw")
    graph.add(database[:10])
    graph.remove([3])
    with pytest.raises(ValueError, match=r"removed from this HNSW index.*build a new index"):
        graph.add(database[:1], ids=[3])


def test_metadata_lookup_time_does_not_grow_with_the_index():
    """10 vs 100k items: the old implementation rebuilt an id->position table per call (100k x slower)."""
    timings = {}
    for n in (10, 100_000):
        index = EmbeddingIndex(4)
        index.add(np.random.default_rng(n).standard_normal((n, 4)).astype(np.float32),
                  metadata=[{"path": f"{i}.jpg"} for i in range(n)])  # fmt: skip
        probe = list(range(10))
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for i in probe * 50:
                index.get_metadata([i])
            best = min(best, time.perf_counter() - start)
        timings[n] = best
    assert timings[100_000] < 3 * timings[10] + 1e-3, timings


def test_metadata_is_copied_and_round_trips(tmp_path):
    index = EmbeddingIndex(4)
    meta = [{"path": "a.jpg", "tags": ["x"]}, None]
    index.add(np.eye(4, dtype=np.float32)[:2], metadata=meta)
    meta[0]["tags"].append("leak")
    got = index.get_metadata([0, 1])
    assert got == [{"path": "a.jpg", "tags": ["x"]}, None]
    got[0]["path"] = "changed"
    assert index.get_metadata([0])[0]["path"] == "a.jpg"
    loaded = EmbeddingIndex.load(index.save(tmp_path / "idx"))
    assert loaded.get_metadata([0, 1]) == [{"path": "a.jpg", "tags": ["x"]}, None]
    assert (tmp_path / "idx" / "metadata.jsonl").read_text().splitlines() == [
        '{"path":"a.jpg","tags":["x"]}',
        "null",
    ]


def test_numpy_scalars_in_metadata_are_stored_as_the_numbers_they_hold_and_ids_iterate(tmp_path):
    """Probe: {"label": labels[i]} with a numpy array of labels was refused ("int64 is not JSON
    serializable", though the message allowed numbers); and an index with len() and `in` over its ids could
    not be iterated."""
    index = EmbeddingIndex(4)
    labels, scores = np.array([3, 7]), np.array([0.5, 0.25], dtype=np.float32)
    meta = [{"label": labels[i], "score": scores[i], "ok": np.bool_(i == 0)} for i in range(2)]
    ids = index.add(np.eye(4, dtype=np.float32)[:2], metadata=meta)
    want = [{"label": 3, "score": 0.5, "ok": True}, {"label": 7, "score": 0.25, "ok": False}]
    assert index.get_metadata(ids) == want
    assert EmbeddingIndex.load(index.save(tmp_path / "idx")).get_metadata(ids) == want
    assert type(index.get_metadata(ids)[0]["label"]) is int
    with pytest.raises(ValueError, match="JSON-serialisable"):  # a value JSON cannot hold is still refused
        index.add(np.eye(4, dtype=np.float32)[:1], metadata=[{"bad": np.float32("nan")}])
    with pytest.raises(ValueError, match="JSON-serialisable"):
        index.add(np.eye(4, dtype=np.float32)[:1], metadata=[{"array": np.arange(3)}])
    index.remove([ids[0]])
    index.add(np.eye(4, dtype=np.float32)[2:3])
    assert list(index) == index.ids.tolist() == [1, 2] and all(type(i) is int for i in index)
    assert all(i in index for i in index) and len(list(index)) == len(index)


@pytest.mark.parametrize("meta", [{1: "a"}, {"nested": [{"ok": 1, None: 2}]}, {(1, 2): "t"}])
def test_metadata_keys_json_would_change_are_refused(meta):
    """JSON turns {1: "a"} into {"1": "a"}: what get_metadata returned differed from what was added."""
    index = EmbeddingIndex(4)
    with pytest.raises(ValueError, match="use string keys"):
        index.add(np.eye(4, dtype=np.float32)[:1], metadata=[meta])
    assert len(index) == 0 and index.next_id == 0  # nothing half-added


def test_tuples_in_metadata_come_back_as_lists(tmp_path):
    index = EmbeddingIndex(4)
    index.add(np.eye(4, dtype=np.float32)[:1], metadata=[{"box": (1, 2)}])
    assert EmbeddingIndex.load(index.save(tmp_path / "i")).get_metadata([0]) == [{"box": [1, 2]}]


def test_index_folders_may_be_bytes_or_pathlike(tmp_path):
    index = EmbeddingIndex(4)
    index.add(np.eye(4, dtype=np.float32), metadata=[{"i": i} for i in range(4)])
    index.save(os.fsencode(tmp_path / "b"))
    assert EmbeddingIndex.load(os.fsencode(tmp_path / "b")).get_metadata([3]) == [{"i": 3}]
    with pytest.raises(TypeError, match=r"must be a str, bytes or os\.PathLike path, got int"):
        EmbeddingIndex.load(3)


def test_ivfpq_on_few_vectors_logs_one_warning_instead_of_faiss_lines(capfd, caplog):
    """FAISS printed one raw C++ "please provide at least N training points" line per sub-quantizer
    (dozens per add) straight to stderr, out of reach of logging."""
    vectors = np.random.default_rng(0).standard_normal((309, 64)).astype(np.float32)
    with caplog.at_level("WARNING", logger="visreg_hub.retrieval.index"):
        index = EmbeddingIndex(64, kind="ivfpq", pq_m=16)
        index.add(vectors)
    assert "please provide at least" not in capfd.readouterr().err
    assert [r.getMessage() for r in caplog.records] == [
        "training IVF-PQ codebooks (256 codes each) on only 309 vectors; recall may suffer"
    ]
    exact = exact_ids(vectors, np.arange(309), vectors[:20], 1)[:, 0]
    assert (index.search(vectors[:20], k=1).ids[:, 0] == exact).mean() >= 0.5  # still trained


def test_sparse_inverted_lists_round_trip(tmp_path, data):
    """Few vectors in many cells: FAISS writes the sparse list layout, which the file check must accept."""
    database, queries = data
    index = EmbeddingIndex(32, kind="ivf", nlist=64)
    index.train(database)
    index.add(database[:5], ids=[7, 70, 700, 7000, 70000])
    loaded = EmbeddingIndex.load(index.save(tmp_path / "idx"))
    np.testing.assert_array_equal(loaded.search(queries, k=5).ids, index.search(queries, k=5).ids)


def test_format_1_folder_is_refused_with_a_rebuild_hint(tmp_path):
    index = EmbeddingIndex(4)
    index.add(np.eye(4, dtype=np.float32))
    folder = index.save(tmp_path / "idx")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["format_version"] = 1
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"format 1 index.*rebuild it with `visreg-hub index build`"):
        EmbeddingIndex.load(folder)


def test_lookups_refuse_what_is_not_an_integer_id():
    """get_metadata([1.7]) answered id 1's metadata (numpy truncated it); remove refused floats but with
    another check. Both now share one parser: integers only, bools and beyond-int64 values refused."""
    index = EmbeddingIndex(4)
    index.add(np.eye(4, dtype=np.float32), metadata=[{"n": i} for i in range(4)])
    assert index.get_metadata([1, np.int32(2)]) == [{"n": 1}, {"n": 2}]
    assert index.get_metadata(3) == [{"n": 3}]
    for bad in ([1.7], [True], [2**70], ["1"]):
        with pytest.raises(ValueError, match="ids must be integers"):
            index.get_metadata(bad)
        with pytest.raises(ValueError, match="ids must be integers"):
            index.remove(bad)
    assert len(index) == 4
    assert index.remove([1, 1, 99]) == 1 and len(index) == 3


def test_metadata_errors_are_not_hidden_by_an_exhausted_id_counter():
    from visreg_hub.retrieval.records import MAX_ID

    index = EmbeddingIndex(4)
    index.add(np.eye(4, dtype=np.float32)[:1], ids=[MAX_ID])
    with pytest.raises(ValueError, match="metadata must be a list of 2"):
        index.add(np.eye(4, dtype=np.float32)[:2], metadata=[{}])
    with pytest.raises(ValueError, match=r"automatic ids are used up: they continue after the largest id"):
        index.add(np.eye(4, dtype=np.float32)[:2])
    assert index.add(np.eye(4, dtype=np.float32)[1:2], ids=[5]).tolist() == [5]
