"""Bulk embedding: folders, file lists and tar shards into parquet shards, against in-process encode()."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest

from tests.bulk.helpers import failures, read_output, tiles, write_tar, write_tile_folder
from tests.fixtures_models import tiny_encoder
from visreg_hub.bulk import embed_dataset, run_embedding
from visreg_hub.bulk.output import OutputMismatchError
from visreg_hub.inference import encode

pytest.importorskip("pyarrow")


@pytest.fixture(scope="module")
def model():
    return tiny_encoder()


def test_folder_list_and_tar_inputs_equal_encode(tmp_path, model):
    folder_paths = write_tile_folder(tmp_path / "tiles", 40)
    (tmp_path / "tiles" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    listed = write_tile_folder(tmp_path / "listed", 6, nested=False)
    (tmp_path / "list.txt").write_text("# a comment\n\n" + "\n".join(f"listed/{p.name}" for p in listed)
                                       + "\nlisted/missing.png\n")  # fmt: skip
    images = list(tiles(12))
    keys = write_tar(tmp_path / "shard.tar", images, corrupt={4})
    out = embed_dataset([tmp_path / "tiles", tmp_path / "list.txt", tmp_path / "shard.tar"], tmp_path / "out",
                        model=model, shard_size=16, batch_size=8)  # fmt: skip
    assert out == tmp_path / "out"
    rows, vectors, records = read_output(out)
    in_sub = [(str(p), None) for p in folder_paths if p.parent.name == "sub"]
    expected = (in_sub + [(str(p), None) for p in folder_paths if p.parent.name != "sub"]
                + [(str(p), None) for p in listed]
                + [(str(tmp_path / "shard.tar"), k) for i, k in enumerate(keys) if i != 4])  # fmt: skip
    assert rows == expected  # listing order: sub/ before the files (entries sorted by name), list, tar
    # every row's embedding equals in-process encode() of the same image
    reference = encode(model, [path for path, _ in rows[:46]], convert_to_numpy=True)
    np.testing.assert_allclose(vectors[:46], reference, atol=1e-6)
    with tarfile.open(tmp_path / "shard.tar") as tar:  # the tar rows embed the member bytes exactly
        raw = [tar.extractfile(f"{key}.jpg").read() for _, key in rows[46:]]
    np.testing.assert_allclose(vectors[46:], encode(model, raw, convert_to_numpy=True), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # side metadata travels with each tar row
    tar_records = records[46:]
    assert [json.loads(r["json"])["i"] for r in tar_records] == [i for i in range(12) if i != 4]
    assert [r["cls"] for r in tar_records] == [str(i % 3) for i in range(12) if i != 4]
    # three per-item failures, no crash: a broken file, a missing listed file, a corrupt tar member
    reasons = {(f["path"].rsplit("/", 1)[-1], f["key"]): f["reason"] for f in failures(out)}
    assert set(reasons) == {("broken.png", None), ("missing.png", None), ("shard.tar", "sample0004")}
    assert "shard.tar#sample0004" in reasons[("shard.tar", "sample0004")]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["shards_done"] == list(range(manifest["num_shards"]))
    assert manifest["num_shards"] == -(-(41 + 7 + 12) // 16) == manifest["inputs"]["count"] // 16 + 1
    assert manifest["model"]["dim"] == 32 and manifest["model"]["normalize"] is True


def test_damaged_tar_keeps_the_readable_members(tmp_path, model):
    write_tar(tmp_path / "good.tar", list(tiles(6)))
    data = (tmp_path / "good.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2 + 100])  # cut inside a member
    out = tmp_path / "out"
    summary = run_embedding([tmp_path / "cut.tar"], out, model=model, shard_size=4)
    rows, _, _ = read_output(out)
    assert summary.complete and summary.embedded == len(rows) >= 2
    assert all(key.startswith("sample") for _, key in rows)
    assert any("cut.tar" in f["path"] for f in failures(out))


def test_rerun_is_a_no_op_and_other_jobs_are_refused(tmp_path, model):
    write_tile_folder(tmp_path / "a", 20)
    first = run_embedding(tmp_path / "a", tmp_path / "out", model=model, shard_size=8)
    assert (first.embedded, first.shards_written) == (20, 3)
    again = run_embedding(tmp_path / "a", tmp_path / "out", model=model, shard_size=8)
    assert (again.embedded, again.shards_written, again.shards_skipped, again.complete) == (0, 0, 3, True)
    with pytest.raises(OutputMismatchError, match=r"different model setup.*weights_sha256"):
        run_embedding(tmp_path / "a", tmp_path / "out", model=tiny_encoder(seed=1), shard_size=8)
    with pytest.raises(OutputMismatchError, match=r"different model setup.*normalize"):
        run_embedding(tmp_path / "a", tmp_path / "out", model=model, shard_size=8, normalize=False)
    write_tile_folder(tmp_path / "a", 21)  # one more input: another listing
    with pytest.raises(OutputMismatchError, match=r"different input set.*20 -> 21"):
        run_embedding(tmp_path / "a", tmp_path / "out", model=model, shard_size=8)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(OutputMismatchError, match=r"not empty and has no manifest.json"):
        run_embedding(tmp_path / "a", tmp_path / "other", model=model)
