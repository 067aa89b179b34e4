"""EmbeddingIndex save/load: round trip, manifest contents, tamper detection, no pickle."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from visreg_hub.errors import CheckpointError
from visreg_hub.retrieval import EmbeddingIndex, read_manifest

pytest.importorskip("faiss")


def make_index(kind: str, metric: str = "ip") -> tuple[EmbeddingIndex, np.ndarray]:
    rng = np.random.default_rng(0)
    database = rng.standard_normal((800, 16)).astype(np.float32)
    database /= np.linalg.norm(database, axis=1, keepdims=True)
    extra = {"nlist": 8, "nprobe": 3} if kind == "ivf" else {"ef_search": 20} if kind == "hnsw" else {}
    index = EmbeddingIndex(16, metric=metric, kind=kind, model_name="tiny-model", pooling="cls", **extra)
    ids = np.arange(800, dtype=np.int64) * 3 + 5
    index.add(database, ids=ids, metadata=[{"path": f"{i}.png", "label": i % 4} for i in range(800)])
    return index, rng.standard_normal((20, 16)).astype(np.float32)


@pytest.mark.parametrize(("kind", "metric"), [("flat", "ip"), ("flat", "l2"), ("ivf", "ip"), ("hnsw", "l2")])
def test_round_trip_gives_identical_results(tmp_path, kind, metric):
    index, queries = make_index(kind, metric)
    before = index.search(queries, k=7)
    index.save(tmp_path / "idx")
    loaded = EmbeddingIndex.load(tmp_path / "idx")
    after = loaded.search(queries, k=7)
    np.testing.assert_array_equal(after.ids, before.ids)
    np.testing.assert_array_equal(after.scores, before.scores)
    assert after.metadata == before.metadata
    assert (loaded.kind, loaded.metric, loaded.dim, len(loaded)) == (kind, metric, 16, 800)
    assert loaded.model_name == "tiny-model" and loaded.pooling == "cls"
    assert loaded.nprobe == index.nprobe and loaded.ef_search == index.ef_search
    np.testing.assert_array_equal(loaded.ids, index.ids)


def test_manifest_records_format_and_checksums(tmp_path):
    index, _ = make_index("flat")
    folder = index.save(tmp_path / "idx")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["format_version"] == 2
    assert (manifest["dim"], manifest["metric"], manifest["kind"], manifest["count"]) == (
        16,
        "ip",
        "flat",
        800,
    )
    assert manifest["model_name"] == "tiny-model" and manifest["normalized"] is True
    assert sorted(p.name for p in folder.iterdir()) == [
        "ids.npy",
        "index.faiss",
        "manifest.json",
        "metadata.jsonl",
    ]
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest
    assert read_manifest(folder) == manifest
    # the ids file is a plain int64 array, readable without pickle
    np.testing.assert_array_equal(np.load(folder / "ids.npy", allow_pickle=False), index.ids)


@pytest.mark.parametrize("name", ["index.faiss", "ids.npy", "metadata.jsonl"])
def test_tampered_file_is_detected(tmp_path, name):
    index, _ = make_index("flat")
    folder = index.save(tmp_path / "idx")
    payload = bytearray((folder / name).read_bytes())
    payload[-2] ^= 0x01
    (folder / name).write_bytes(bytes(payload))
    with pytest.raises(CheckpointError, match=f"checksum mismatch for .*{name}"):
        EmbeddingIndex.load(folder)


def test_manifest_that_disagrees_with_files_is_rejected(tmp_path):
    index, _ = make_index("flat")
    folder = index.save(tmp_path / "idx")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["dim"] = 32
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"dim 16.*the manifest says 32"):
        EmbeddingIndex.load(folder)
    manifest.update(dim=16, count=799)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="count"):
        EmbeddingIndex.load(folder)


def test_bad_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no manifest\.json"):
        EmbeddingIndex.load(tmp_path)
    (tmp_path / "emb.npy").write_bytes(b"not an index")
    with pytest.raises(FileNotFoundError, match=r"emb\.npy is a file, not an index folder"):
        EmbeddingIndex.load(tmp_path / "emb.npy")
    (tmp_path / "emb.npy").unlink()
    index, _ = make_index("flat")
    folder = index.save(tmp_path / "idx")
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(CheckpointError, match="format_version 99"):
        EmbeddingIndex.load(folder)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "ids.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"ids\.npy"):
        EmbeddingIndex.load(folder)


def test_untrained_ivf_cannot_be_saved(tmp_path):
    with pytest.raises(ValueError, match="untrained"):
        EmbeddingIndex(8, kind="ivf", nlist=2).save(tmp_path / "idx")


def test_loaded_index_keeps_growing(tmp_path):
    index, queries = make_index("flat")
    loaded = EmbeddingIndex.load(index.save(tmp_path / "idx"))
    new_ids = loaded.add(queries[:2])
    assert new_ids.tolist() == [int(index.ids.max()) + 1, int(index.ids.max()) + 2]
    assert loaded.search(queries[:2], k=1).ids[:, 0].tolist() == new_ids.tolist()
    with pytest.raises(ValueError, match="already in the index"):
        loaded.add(queries[:1], ids=[5])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"m": 5000, "kind": "hnsw"},
        {"ef_search": 2**21},
        {"ef_construction": 2**21},
        {"nprobe": 2**25},
        {"nlist": 2**25, "kind": "ivf"},
        {"pq_m": 2**17},
    ],
)
def test_an_index_that_saves_is_an_index_that_loads(tmp_path, kwargs):
    """Every build/search parameter the loader would refuse is refused by the constructor (and by the
    setters), with the same bound, so nothing that saves cannot be loaded again."""
    from visreg_hub.errors import ConfigError
    from visreg_hub.retrieval.limits import PARAM_LIMITS

    (name,) = [key for key in kwargs if key != "kind"]
    with pytest.raises(ConfigError, match=rf"{name} must be an integer in \[1, {PARAM_LIMITS[name]}\]"):
        EmbeddingIndex(16, **kwargs)
    with pytest.raises(ConfigError, match=r"dim must be an integer in \[1, 65536\]"):
        EmbeddingIndex(70_000)
    index, _ = make_index("hnsw")
    for setter in ("ef_search", "nprobe"):
        with pytest.raises(
            ConfigError, match=rf"{setter} must be an integer in \[1, {PARAM_LIMITS[setter]}\]"
        ):
            setattr(index, setter, PARAM_LIMITS[setter] + 1)
    index.ef_search = PARAM_LIMITS["ef_search"]  # the largest allowed value saves and loads
    loaded = EmbeddingIndex.load(index.save(tmp_path / "idx"))
    assert loaded.ef_search == PARAM_LIMITS["ef_search"]


def test_an_interrupted_save_keeps_the_earlier_index(tmp_path, monkeypatch):
    """Saving over an index writes the new one aside and swaps it in: a crash while writing leaves the
    earlier index loadable, a crash between the two renames is named by load(), a finished save
    replaces the index and leaves no hidden folders."""
    import os

    from visreg_hub.retrieval import storage

    index, queries = make_index("flat")
    folder = index.save(tmp_path / "idx")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    bigger, _ = make_index("flat")
    bigger.add(queries)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(storage, "fsync_tree", crash)  # after every file is written, before the swap
        with pytest.raises(OSError, match="disk full"):
            bigger.save(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]
    assert len(EmbeddingIndex.load(folder)) == 800

    real_replace = os.replace

    def crash_on_second_rename(src, dst):  # the staged folder's rename, after the old one moved aside
        if Path(src).name.startswith(".idx.saving-"):
            raise OSError("power cut")
        return real_replace(src, dst)

    with monkeypatch.context() as patch:
        patch.setattr(storage.os, "replace", crash_on_second_rename)
        with pytest.raises(OSError, match="power cut"):
            bigger.save(folder)
    leftover = tmp_path / f".idx.replaced-{os.getpid()}"
    with pytest.raises(FileNotFoundError, match=rf"interrupted: the earlier index is in .*{leftover.name}"):
        EmbeddingIndex.load(folder)
    os.rename(leftover, folder)  # what the message says to do
    assert len(EmbeddingIndex.load(folder)) == 800

    bigger.save(folder)
    assert len(EmbeddingIndex.load(folder)) == 820
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


def test_an_ivfpq_index_with_the_default_pq_m_saves_and_loads(tmp_path):
    """``pq_m=None`` (pick one) reached the manifest as null while the file held PQ64: load refused it."""
    from visreg_hub.retrieval.factory import default_pq_m

    vectors = np.random.default_rng(0).standard_normal((300, 256)).astype(np.float32)
    index = EmbeddingIndex(256, kind="ivfpq", nlist=4)
    assert index.pq_m == default_pq_m(256) == 64
    index.add(vectors)
    index.save(tmp_path / "pq")
    loaded = EmbeddingIndex.load(tmp_path / "pq")
    assert loaded.pq_m == 64 and loaded.factory == index.factory
    np.testing.assert_array_equal(loaded.search(vectors[:5], k=3).ids, index.search(vectors[:5], k=3).ids)


def test_a_rebuild_removes_the_copies_killed_saves_left_beside_the_index(tmp_path):
    """Probe 19: a killed `index build` left .NAME.saving-<pid> (a whole copy of the index) or, between the
    two swap renames, .NAME.replaced-<pid> (the old one) beside the output for good, one more per
    interrupted build; the next successful save removes those of dead processes."""
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()  # fmt: skip
    index = EmbeddingIndex(4, metric="ip", normalize=True)
    index.add(np.eye(4, dtype=np.float32))
    folder = tmp_path / "ix"
    index.save(folder)
    for kind in ("saving", "replaced"):
        (tmp_path / f".ix.{kind}-{dead}").mkdir()
        (tmp_path / f".ix.{kind}-1").mkdir()  # pid 1 is alive: left alone
    (folder / ".manifest.json.tmp-55e1964c46e5cb9b").write_text("{}")  # a killed write inside the folder
    index.save(folder)  # an index folder with a killed write's temporary file is still an index folder
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [".ix.replaced-1", ".ix.saving-1", "ix"]
