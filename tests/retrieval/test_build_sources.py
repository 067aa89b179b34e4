"""index build reads exactly one embed job's shards, from one model setup, and never writes over non-index
files; a non-UTF-8 metadata.jsonl is a CheckpointError."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

from tests.bulk.helpers import read_output, write_tile_folder
from tests.fixtures_models import tiny_encoder
from visreg_hub.cli import main
from visreg_hub.errors import CheckpointError, ConfigError
from visreg_hub.retrieval import EmbeddingIndex
from visreg_hub.retrieval.build import build_index
from visreg_hub.retrieval.sources import EmbeddingSourceError, open_sources

pytest.importorskip("faiss")
pytest.importorskip("pyarrow")


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """Embed jobs of one 10-image folder (3 shards): the tiny model, other weights, unnormalised."""
    from visreg_hub.bulk import embed_dataset

    root = tmp_path_factory.mktemp("jobs")
    write_tile_folder(root / "imgs", 10, nested=False)
    made = {}
    for name, model, options in (("base", tiny_encoder(), {}), ("other", tiny_encoder(seed=1), {}),
                                 ("raw", tiny_encoder(), {"normalize": False})):  # fmt: skip
        made[name] = embed_dataset(root / "imgs", root / name, model=model, shard_size=4, **options)
    return made


def _copy(job, tmp_path, name="copy"):
    return shutil.copytree(job, tmp_path / name)


def _edit_manifest(folder, **changes):
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    for key, value in changes.items():
        if key.startswith("model_"):
            manifest["model"][key[len("model_") :]] = value
        else:
            manifest[key] = value
    path.write_text(json.dumps(manifest))


def test_every_listed_row_maps_to_its_own_vector(jobs, tmp_path):
    rows, vectors, _ = read_output(jobs["base"])
    sources = open_sources([jobs["base"]])
    assert [p.name for p in sources.files] == [f"part-0000{n}.parquet" for n in range(3)]
    index = build_index([jobs["base"]], tmp_path / "idx", num_queries=1)
    result = index.search(vectors, k=1)
    assert result.ids[:, 0].tolist() == list(range(len(rows)))
    assert [m[0]["path"] for m in result.metadata] == [path for path, _ in rows]


@pytest.mark.parametrize(("other", "field"), [("other", "weights_sha256"), ("raw", "normalized")])
def test_sources_of_different_model_setups_are_refused(jobs, tmp_path, other, field):
    with pytest.raises(ConfigError, match=rf"cannot build one index from .*base and .*{other}.*{field}"):
        build_index([jobs["base"], jobs[other]], tmp_path / "idx")
    assert not (tmp_path / "idx").exists()


def test_pooling_and_model_name_differences_are_refused_and_the_same_setup_is_merged(jobs, tmp_path):
    pooled = _copy(jobs["base"], tmp_path, "pooled")
    _edit_manifest(pooled, model_pooling="mean_patch")
    with pytest.raises(ConfigError, match=r"different pooling \('cls' vs 'mean_patch'\)"):
        open_sources([jobs["base"], pooled])
    np.save(tmp_path / "e.npy", np.eye(32, dtype=np.float32)[:12])
    (tmp_path / "e.npy.json").write_text(json.dumps({"paths": [f"{i}.png" for i in range(12)],
                                                    "model": "another-model"}))  # fmt: skip
    with pytest.raises(ConfigError, match=r"different model \('tiny-test' vs 'another-model'\)"):
        open_sources([jobs["base"], tmp_path / "e.npy"])
    renamed = _copy(jobs["base"], tmp_path, "renamed")  # same weights under another name: one model
    _edit_manifest(renamed, model_name="/models/tiny-test")
    merged = open_sources([jobs["base"], renamed])
    assert merged.count == 20 and merged.info["model"] == "tiny-test" and merged.info["pooling"] == "cls"


def test_missing_stray_and_unfinished_shards_are_refused(jobs, tmp_path):
    hole = _copy(jobs["base"], tmp_path, "hole")
    (hole / "part-00001.parquet").unlink()
    with pytest.raises(EmbeddingSourceError, match=r"missing shard\(s\) part-00001.parquet of the 3"):
        open_sources([hole])
    stray = _copy(jobs["base"], tmp_path, "stray")
    shutil.copy(jobs["other"] / "part-00000.parquet", stray / "part-00099.parquet")
    shutil.copy(jobs["other"] / "part-00000.parquet", stray / "part-000001.parquet")
    with pytest.raises(EmbeddingSourceError, match=r"not shards of its job \(part-000001.parquet, part-0009"):
        open_sources([stray])
    unfinished = _copy(jobs["base"], tmp_path, "unfinished")
    _edit_manifest(unfinished, complete=False)
    with pytest.raises(EmbeddingSourceError, match=r"unfinished embed job"):
        open_sources([unfinished])
    for bad in (0, "3", True, None):
        broken = _copy(jobs["base"], tmp_path, f"n{bad}")
        _edit_manifest(broken, num_shards=bad)
        with pytest.raises(EmbeddingSourceError, match=r"num_shards must be a positive integer"):
            open_sources([broken])
    bare = _copy(jobs["base"], tmp_path, "bare")
    (bare / "manifest.json").unlink()
    with pytest.raises(EmbeddingSourceError, match=r"has no manifest.json.*pass the .parquet files"):
        open_sources([bare])


@pytest.mark.parametrize("name", ["manifest.json", "part-00001.parquet", ".failures/part-00000.jsonl"])
def test_a_file_of_an_embed_folder_that_links_outside_it_is_refused(jobs, tmp_path, name):
    """Probe 20: a `.failures` record linked to a file outside the folder was read (its lines counted, and
    copied into failures.jsonl on resume); the manifest and shards are read the same way."""
    folder = _copy(jobs["base"], tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    target = outside / "secret"
    if (folder / name).exists():
        shutil.move(folder / name, target)
    else:
        target.write_text("SECRET-TOKEN\n")
    (folder / name).parent.mkdir(exist_ok=True)
    (folder / name).symlink_to(target)
    with pytest.raises(EmbeddingSourceError, match=r"symlink to a file outside the embed output folder"):
        open_sources([folder])
    inside = _copy(jobs["base"], tmp_path, "inside")  # a link that stays inside the folder is fine
    shutil.move(inside / "part-00001.parquet", inside / "kept.parquet.bak")
    (inside / "part-00001.parquet").symlink_to("kept.parquet.bak")
    assert open_sources([inside]).count == open_sources([jobs["base"]]).count


def test_index_output_over_an_embed_job_or_other_files_is_refused(jobs, tmp_path):
    job = _copy(jobs["base"], tmp_path, "job")
    before = {p.name: p.read_bytes() for p in job.iterdir() if p.is_file()}
    with pytest.raises(ConfigError, match=r"holds files that are not an index \(.*part-0000\d.parquet"):
        build_index([job], job)
    (tmp_path / "only").mkdir()
    shutil.copy(job / "manifest.json", tmp_path / "only" / "manifest.json")
    with pytest.raises(ConfigError, match=r"is not an index manifest .*embed. output folder"):
        build_index([job], tmp_path / "only")
    assert {p.name: p.read_bytes() for p in job.iterdir() if p.is_file()} == before
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"notes.txt"):
        EmbeddingIndex(4).save(tmp_path / "notes")
    first = build_index([job], tmp_path / "idx", num_queries=1)  # an earlier index is replaced
    again = build_index([job, jobs["base"]], tmp_path / "idx", num_queries=1)
    assert (len(first), len(EmbeddingIndex.load(tmp_path / "idx"))) == (10, len(again)) == (10, 20)


def test_non_utf8_metadata_is_a_checkpoint_error_naming_the_file(tmp_path):
    index = EmbeddingIndex(4)
    index.add(np.eye(4, dtype=np.float32)[:2], metadata=[{"path": "a"}, {"path": "b"}])
    folder = index.save(tmp_path / "idx")
    metadata = folder / "metadata.jsonl"
    metadata.write_bytes(b'{"path": "a"}\n{"path": "b\xe9"}\n')
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["metadata.jsonl"] = hashlib.sha256(metadata.read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"metadata.jsonl line 2 is not valid UTF-8"):
        EmbeddingIndex.load(folder)


@pytest.mark.parametrize("queries", ["0", "-3"])
def test_queries_below_one_are_refused(jobs, tmp_path, capsys, queries):
    code = main(["index", "build", str(jobs["base"]), "-o", str(tmp_path / "idx"), "--queries", queries])
    err = capsys.readouterr().err  # an argparse usage error, before anything is read (probe 19)
    assert code == 2 and f"--queries: expected an integer at least 1, got '{queries}'" in err


def test_a_shard_swapped_for_another_jobs_file_or_emptied_is_refused(jobs, tmp_path):
    """The same name and width, other rows (a part file copied from a job on other inputs, a truncated
    copy): indexed silently before, with every later row id shifted (probe 2)."""
    from visreg_hub.bulk import embed_dataset
    from visreg_hub.bulk.output import FAILURES_DIR
    from visreg_hub.retrieval import sources

    assert sources.FAILURES_DIR == FAILURES_DIR  # the two packages name the same folder
    write_tile_folder(tmp_path / "few", 2, nested=False)
    small = embed_dataset(tmp_path / "few", tmp_path / "small", model=tiny_encoder(), shard_size=4)
    swapped = _copy(jobs["base"], tmp_path, "swapped")
    shutil.copy(small / "part-00000.parquet", swapped / "part-00001.parquet")  # 2 rows where 4 belong
    expected = r"part-00001.parquet holds 2 rows, but this shard of the job had 4 inputs and 0 failures"
    with pytest.raises(EmbeddingSourceError, match=expected):
        open_sources([swapped])
    emptied = _copy(jobs["base"], tmp_path, "emptied")
    (emptied / "part-00002.parquet").write_bytes(b"")
    with pytest.raises(EmbeddingSourceError, match=r"not a readable parquet file .*delete it and re-run"):
        open_sources([emptied])
    assert open_sources([jobs["base"]]).count == 10  # the intact job: 4 + 4 + 2 rows as its manifest says


def test_a_shard_of_another_job_with_the_same_rows_is_refused_naming_the_file(jobs, tmp_path, capsys):
    """A part file of a job on the same images with other weights has the right name, width and row
    count: it was indexed, mixing two models in one index (probe 6, F4). Each shard now carries its job's
    id (and its shard number), which index build checks against the job's manifest."""
    base_rows, base_vectors, _ = read_output(jobs["base"])
    other_rows, other_vectors, _ = read_output(jobs["other"])
    assert base_rows == other_rows and not np.allclose(base_vectors, other_vectors)  # same rows, other model
    mixed = _copy(jobs["base"], tmp_path, "mixed")
    shutil.copy(jobs["other"] / "part-00001.parquet", mixed / "part-00001.parquet")
    with pytest.raises(EmbeddingSourceError, match=r"part-00001.parquet is not shard 1 of the embed job"):
        open_sources([mixed])
    code = main(["index", "build", str(mixed), "-o", str(tmp_path / "idx")])
    assert code == 1 and "part-00001.parquet is not shard 1" in capsys.readouterr().err
    assert not (tmp_path / "idx").exists()
    renamed = _copy(jobs["base"], tmp_path, "renamed")  # this job's own shards 0 and 1, swapped (4 rows each)
    (renamed / "part-00000.parquet").rename(renamed / "tmp.parquet")
    (renamed / "part-00001.parquet").rename(renamed / "part-00000.parquet")
    (renamed / "tmp.parquet").rename(renamed / "part-00001.parquet")
    swapped_name = r"part-00000.parquet is not shard 0 .*written as shard '1'"
    with pytest.raises(EmbeddingSourceError, match=swapped_name):
        open_sources([renamed])
    base_id, other_id = (
        json.loads((jobs[n] / "manifest.json").read_text())["job_id"] for n in ("base", "other")
    )
    assert len(base_id) == 64 and base_id != other_id


def test_an_older_job_without_job_ids_still_builds_and_refuses_a_newer_jobs_shard(jobs, tmp_path):
    """Folders embedded before job ids existed record none: they still build, from their own shards."""
    import pyarrow.parquet as pq

    older = _copy(jobs["base"], tmp_path, "older")
    manifest = json.loads((older / "manifest.json").read_text())
    del manifest["job_id"]
    (older / "manifest.json").write_text(json.dumps(manifest))
    for part in sorted(older.glob("part-*.parquet")):  # as an older embed wrote them: no schema metadata
        pq.write_table(pq.read_table(part).replace_schema_metadata(None), part)
    _, vectors, _ = read_output(jobs["base"])
    index = build_index([older], tmp_path / "idx", kind="flat", num_queries=1)
    brute = np.argmax(vectors @ vectors.T, axis=1)  # each row's own vector, by numpy
    assert (index.search(vectors, k=1).ids[:, 0] == brute).all()
    shutil.copy(jobs["other"] / "part-00002.parquet", older / "part-00002.parquet")
    with pytest.raises(EmbeddingSourceError, match=r"part-00002.parquet is not shard 2"):
        open_sources([older])


def test_a_source_named_twice_is_refused_not_indexed_twice(jobs, tmp_path):
    shard = jobs["base"] / "part-00000.parquet"
    for paths in ([jobs["base"], jobs["base"]], [jobs["base"], shard], [shard, shard]):
        with pytest.raises(EmbeddingSourceError, match="is given twice"):
            open_sources(paths)
    np.save(tmp_path / "e.npy", np.eye(4, dtype=np.float32))
    with pytest.raises(EmbeddingSourceError, match=r"e\.npy.* is given twice"):
        build_index([tmp_path / "e.npy", tmp_path / "." / "e.npy"], tmp_path / "idx")
    assert not (tmp_path / "idx").exists()


def test_unnormalised_embeddings_in_an_ip_index_get_a_warning(jobs, tmp_path, caplog):
    build_index([jobs["raw"]], tmp_path / "raw-ip", num_queries=1)
    assert "raw inner product, not cosine; pass --normalize" in caplog.text
    caplog.clear()
    build_index([jobs["raw"]], tmp_path / "raw-normalised", num_queries=1, normalize=True)
    build_index([jobs["base"]], tmp_path / "base", num_queries=1)
    assert "raw inner product" not in caplog.text


def test_shards_filtered_with_pandas_and_written_back_build_the_same_index(jobs, tmp_path):
    """docs/bulk.md reads the shards with pandas; written back with to_parquet, the embedding column is a
    plain list<float> (no fixed size), which the build refused with "write it with embed" (probe 15)."""
    import pandas as pd

    frame = pd.concat([pd.read_parquet(p) for p in sorted(jobs["base"].glob("part-*.parquet"))])
    kept = frame.iloc[::2].reset_index(drop=True)  # a user's filter
    kept.to_parquet(tmp_path / "cleaned.parquet")
    expected = np.stack(kept["embedding"].to_list()).astype(np.float32)
    index = build_index([tmp_path / "cleaned.parquet"], tmp_path / "idx", num_queries=1)
    result = index.search(expected, k=1)
    assert result.ids[:, 0].tolist() == list(range(len(kept)))
    assert [m[0]["path"] for m in result.metadata] == kept["path"].to_list()
    ragged = pd.DataFrame({"path": ["a", "b"], "embedding": [np.zeros(4), np.zeros(3)]})
    ragged.to_parquet(tmp_path / "ragged.parquet")
    with pytest.raises(EmbeddingSourceError, match=r"different lengths \(3 to 4\)") as info:
        open_sources([tmp_path / "ragged.parquet"])
    assert "re-run" not in str(info.value)  # not taken for an unreadable shard of an embed job
    kept.iloc[:0].to_parquet(tmp_path / "emptied.parquet")  # a filter that kept nothing (review 17)
    both = open_sources([tmp_path / "cleaned.parquet", tmp_path / "emptied.parquet"])
    assert (both.count, both.dim) == (len(kept), expected.shape[1])
    again = build_index([tmp_path / "emptied.parquet", tmp_path / "cleaned.parquet"], tmp_path / "idx2",
                        num_queries=1)  # fmt: skip
    assert again.search(expected, k=1).ids[:, 0].tolist() == list(range(len(kept)))
    pd.DataFrame({"embedding": [[1, 2], [3, 4]]}).to_parquet(tmp_path / "ints.parquet")  # not floats
    with pytest.raises(EmbeddingSourceError, match="no 'embedding' column of float lists"):
        open_sources([tmp_path / "ints.parquet"])


@pytest.mark.parametrize(("field", "value"), [("model", 7), ("normalized", "yes"), ("weights_sha256", 12)])
def test_a_sidecar_field_of_the_wrong_type_is_refused_before_the_index_is_built(tmp_path, field, value):
    """Probe 19: a sidecar with "model": 7 built an index (exit 0) that `index inspect` and `search` then
    refused; an integer digest was dropped without a word. The build names the sidecar and the field."""
    np.save(tmp_path / "e.npy", np.eye(4, dtype=np.float32))
    sidecar = {"paths": [f"img{i}.png" for i in range(4)], "model": "tiny", field: value}
    (tmp_path / "e.npy.json").write_text(json.dumps(sidecar))
    with pytest.raises(EmbeddingSourceError, match=rf"e\.npy\.json: '{field}' must be .* or null, got"):
        open_sources([tmp_path / "e.npy"])
    assert not (tmp_path / "idx").exists()


@pytest.mark.parametrize("problem", ["nan", "norm"])
def test_a_bad_row_past_the_first_block_is_named_by_its_row_in_the_file(tmp_path, problem):
    """Review of probe 20: files are read 65,536 rows at a time, and the row a refusal named was its row
    within the block (464 for row 66,000)."""
    from visreg_hub.retrieval.sources import BATCH_ROWS, iter_batches

    vectors = np.ones((BATCH_ROWS + 5_000, 4), dtype=np.float32)
    vectors[BATCH_ROWS + 464] = np.nan if problem == "nan" else 1e38
    np.save(tmp_path / "e.npy", vectors)
    with pytest.raises(ValueError, match=rf"first at row {BATCH_ROWS + 464}\b"):
        for _ in iter_batches(open_sources([tmp_path / "e.npy"])):
            pass
