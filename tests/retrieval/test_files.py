"""Embedding files (.npy/.parquet + JSON sidecar): round trips and refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from visreg_hub.retrieval import read_embeddings, write_embeddings
from visreg_hub.retrieval.files import read_paths_file


@pytest.mark.parametrize("suffix", [".npy", ".parquet"])
def test_round_trip(tmp_path, suffix):
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    embeddings = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    paths = [f"/data/{i}.png" for i in range(5)]
    sidecar = write_embeddings(
        tmp_path / f"emb{suffix}", embeddings, paths=paths, failures=[("/data/bad.png", "truncated")],
        model="tiny", pooling="cls", normalized=False,
    )  # fmt: skip
    assert sidecar == tmp_path / f"emb{suffix}.json"
    loaded = read_embeddings(tmp_path / f"emb{suffix}")
    np.testing.assert_array_equal(loaded.embeddings, embeddings)
    assert loaded.paths == paths
    assert loaded.info["model"] == "tiny" and loaded.info["failures"] == [
        {"path": "/data/bad.png", "reason": "truncated"}
    ]
    if suffix == ".parquet":  # the parquet file names its rows even without the sidecar
        sidecar.unlink()
        assert read_embeddings(tmp_path / f"emb{suffix}").paths == paths


def test_refusals(tmp_path):
    with pytest.raises(ValueError, match=r"must end with \.npy or \.parquet"):
        write_embeddings(tmp_path / "emb.csv", np.zeros((1, 2), np.float32), paths=["a"])
    with pytest.raises(ValueError, match="got 1 paths for 2 embeddings"):
        write_embeddings(tmp_path / "emb.npy", np.zeros((2, 2), np.float32), paths=["a"])
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="not a plain numeric"):
        read_embeddings(tmp_path / "objects.npy")  # would need pickle: refused
    np.save(tmp_path / "nan.npy", np.array([[1.0, np.nan]], dtype=np.float32))
    with pytest.raises(ValueError, match="NaN"):
        read_embeddings(tmp_path / "nan.npy")
    with pytest.raises(FileNotFoundError, match="embeddings file not found"):
        read_embeddings(tmp_path / "missing.npy")


def test_paths_files(tmp_path):
    (tmp_path / "p.txt").write_text("a.png\n\nb.png\n")
    assert read_paths_file(tmp_path / "p.txt") == (["a.png", "b.png"], {})
    (tmp_path / "p.json").write_text(json.dumps({"paths": ["x"], "model": "m"}))
    assert read_paths_file(tmp_path / "p.json") == (["x"], {"model": "m"})
    (tmp_path / "bad.json").write_text(json.dumps({"files": ["x"]}))
    with pytest.raises(ValueError, match="JSON list of file paths"):
        read_paths_file(tmp_path / "bad.json")


def test_paths_files_that_are_not_utf8(tmp_path):
    """Probe 20: both raised a bare UnicodeDecodeError naming no file. A line list keeps a non-UTF-8 name
    as the name that opens the file (as embed's .txt lists); a JSON sidecar must be UTF-8."""
    import os

    from visreg_hub.errors import VisregHubError

    (tmp_path / "p.txt").write_bytes(b"\xef\xbb\xbfa.png\r\ncaf\xe9.png\n")
    names, _ = read_paths_file(tmp_path / "p.txt")
    assert names == ["a.png", os.fsdecode(b"caf\xe9.png")]
    (tmp_path / "p.json").write_bytes(b'{"paths": ["\xff\xfe"]}')
    with pytest.raises(VisregHubError, match=r"p.json is not UTF-8 text .*at byte 12"):
        read_paths_file(tmp_path / "p.json")


def test_npy_and_parquet_of_one_name_keep_their_own_sidecars(tmp_path):
    pytest.importorskip("pyarrow")
    a = np.ones((2, 3), np.float32)
    b = np.zeros((3, 3), np.float32)
    write_embeddings(tmp_path / "emb.npy", a, paths=["a1", "a2"], model="first")
    write_embeddings(tmp_path / "emb.parquet", b, paths=["b1", "b2", "b3"], model="second")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb.npy", "emb.npy.json", "emb.parquet",
                                                          "emb.parquet.json"]  # fmt: skip
    assert read_embeddings(tmp_path / "emb.npy").paths == ["a1", "a2"]
    assert read_embeddings(tmp_path / "emb.parquet").info["model"] == "second"
    # a folder written by an earlier version (emb.json) still reads
    (tmp_path / "emb.npy.json").rename(tmp_path / "emb.json")
    assert read_embeddings(tmp_path / "emb.npy").info["model"] == "first"


@pytest.mark.parametrize("suffix", [".npy", ".parquet"])
def test_a_write_that_fails_half_way_keeps_the_earlier_pair(tmp_path, monkeypatch, suffix):
    """Probe 12: a full disk during `embed -o emb.npy --overwrite` left a truncated emb.npy beside the old
    sidecar (2,887 rows against 123 paths), and a failed first write blocked the re-run as "exists"."""
    import errno

    from visreg_hub.retrieval import files

    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    out = tmp_path / f"emb{suffix}"
    rng = np.random.default_rng(1)
    first = rng.standard_normal((3, 4)).astype(np.float32)
    write_embeddings(out, first, paths=["a", "b", "c"])

    def half_then_full(handle):  # what a full disk does: some bytes land, then the write fails
        handle.write(b"\x93NUMPY half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    def npy_on_full_disk(handle, _array, **_kwargs):
        half_then_full(handle)

    def parquet_on_full_disk(_table, target):
        with open(target, "wb") as handle:
            half_then_full(handle)

    monkeypatch.setattr(files.np, "save", npy_on_full_disk)
    monkeypatch.setattr(files, "write_parquet", parquet_on_full_disk)
    with pytest.raises(ValueError, match=rf"cannot write .*emb\{suffix}: No space left on device; free some"):
        write_embeddings(out, rng.standard_normal((5, 4)).astype(np.float32), paths=list("vwxyz"))
    kept = read_embeddings(out)
    np.testing.assert_array_equal(kept.embeddings, first)
    assert kept.paths == ["a", "b", "c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name, f"{out.name}.json"]  # no temporaries


def test_a_link_planted_at_a_predictable_temporary_name_redirects_nothing(tmp_path):
    """Probe 14: the temporary was `.emb.npy.tmp-<pid>`; a link planted there made the write truncate and
    overwrite its target outside the folder, then the link itself became emb.npy."""
    import os

    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("not yours to overwrite")
    for name in ("emb.npy", "emb.npy.json"):
        (out / f".{name}.tmp-{os.getpid()}").symlink_to(victim)
    write_embeddings(out / "emb.npy", np.eye(3, dtype=np.float32), paths=["a", "b", "c"])
    assert victim.read_text() == "not yours to overwrite"
    assert not (out / "emb.npy").is_symlink() and read_embeddings(out / "emb.npy").paths == ["a", "b", "c"]
    assert oct((out / "emb.npy").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    import os

    current = os.umask(0)
    os.umask(current)
    return current
