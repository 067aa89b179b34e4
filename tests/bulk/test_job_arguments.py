"""Arguments of an embed job: checked before anything is written, equivalent spellings resume the same
job, and the single-file CLI output refuses what only a shard folder can hold."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.bulk.helpers import ROOT, read_output, tiles, write_tar, write_tile_folder
from tests.fixtures_models import tiny_encoder
from visreg_hub.bulk import run_embedding
from visreg_hub.errors import ConfigError, UserInputError

pytest.importorskip("pyarrow")


@pytest.fixture(scope="module")
def model():
    return tiny_encoder()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"normalize": "no"}, "normalize must be True or False"), ({"max_pixels": 0}, "max_pixels must be")],
)
def test_bad_arguments_are_refused_before_the_folder_exists(tmp_path, model, kwargs, message):
    write_tile_folder(tmp_path / "in", 3)
    with pytest.raises(ConfigError, match=message):
        run_embedding(tmp_path / "in", tmp_path / "out", model=model, **kwargs)
    assert not (tmp_path / "out").exists()


def test_the_ray_engine_without_ray_is_refused_before_the_folder_exists(tmp_path, model, monkeypatch):
    """Probe: `embed --engine ray` without ray wrote the folder's manifest, then named the missing extra."""
    from visreg_hub.errors import MissingExtraError

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError, installed or not
    write_tile_folder(tmp_path / "in", 3)
    with pytest.raises(MissingExtraError, match=r"visreg_hub\[ray\]"):
        run_embedding(tmp_path / "in", tmp_path / "out", model=model, engine="ray")
    assert not (tmp_path / "out").exists()


def test_an_output_named_like_a_file_and_overlapping_inputs_are_refused(tmp_path, model, capsys):
    """Probe 12: embed_dataset(..., "x.npy") made a shard folder named x.npy (the CLI writes one file for
    that name); the same folder twice, or a folder and its subfolder, embedded every image twice."""
    from visreg_hub.cli import main

    write_tile_folder(tmp_path / "in" / "sub", 3)
    for name in ("x.npy", "x.parquet"):
        with pytest.raises(ConfigError, match=r"names a file, but this job writes a shard folder.*-o x\.npy"):
            run_embedding(tmp_path / "in", tmp_path / name, model=model)
        assert not (tmp_path / name).exists()
    for inputs, words in (
        ([tmp_path / "in", tmp_path / "in"], "is given twice"),
        ([tmp_path / "in", tmp_path / "in" / "sub"], "is inside"),
        ([tmp_path / "in" / "sub" / "..", tmp_path / "in"], "is given twice"),  # one folder, two spellings
    ):
        with pytest.raises(UserInputError, match=words):
            run_embedding(inputs, tmp_path / "out", model=model)
        assert not (tmp_path / "out").exists()
        assert main(["embed", *map(str, inputs), "-o", str(tmp_path / "one.npy")]) == 1  # single-file output
        assert words in capsys.readouterr().err
    assert run_embedding([tmp_path / "in" / "sub"], tmp_path / "out", model=model).embedded == 3


def test_in_memory_images_as_inputs_are_refused_with_the_way_to_embed_them(tmp_path, model):
    with pytest.raises(ConfigError, match=r"inputs must be paths .* got a Image; embed in-memory images"):
        run_embedding([next(tiles(1))], tmp_path / "out", model=model)
    assert not (tmp_path / "out").exists()


def test_encode_refuses_a_normalize_that_is_not_a_bool(model):
    image = np.asarray(next(tiles(1)))
    for name in ("normalize", "normalize_embeddings"):
        with pytest.raises(UserInputError, match=f"{name} must be True or False, got 'no'"):
            model.encode([image], **{name: "no"})
    flat = model.encode([image], normalize=np.bool_(False), convert_to_numpy=True)
    assert not np.isclose(np.linalg.norm(flat), 1.0)  # a numpy bool is a bool


def test_equivalent_dtype_spellings_resume_the_same_job(tmp_path, model):
    write_tile_folder(tmp_path / "in", 12, nested=False)
    first = run_embedding(tmp_path / "in", tmp_path / "half", model=model, shard_size=4, dtype="fp16")
    assert first.shards_written == 3
    (tmp_path / "half" / "part-00001.parquet").unlink()
    again = run_embedding(tmp_path / "in", tmp_path / "half", model=model, shard_size=4, dtype="float16")
    assert (again.shards_written, again.shards_skipped) == (1, 2)
    assert json.loads((tmp_path / "half" / "manifest.json").read_text())["model"]["dtype"] == "fp16"
    run_embedding(tmp_path / "in", tmp_path / "full", model=model, shard_size=4)  # the model's float32
    same = run_embedding(tmp_path / "in", tmp_path / "full", model=model, shard_size=4, dtype="fp32")
    assert (same.shards_written, same.shards_skipped) == (0, 3)
    with pytest.raises(Exception, match=r"different model setup.*dtype"):
        run_embedding(tmp_path / "in", tmp_path / "full", model=model, shard_size=4, dtype="bf16")


def _cli(*argv):
    # the test run's backend and ONNX cache (tests/conftest.py): an ONNX export per process, into the
    # user's own ~/.cache, took most of this file's time
    names = ("VISREG_HUB_BACKEND", "VISREG_HUB_CACHE")
    inherited = {key: os.environ[key] for key in names if key in os.environ}
    environment = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", **inherited}
    command = [sys.executable, "-m", "visreg_hub.cli", *map(str, argv)]
    return subprocess.run(command, cwd=ROOT, text=True, capture_output=True, env=environment)


def test_single_file_output_refuses_lists_and_tars_and_takes_max_pixels(tmp_path, model):
    model.save_pretrained(tmp_path / "model")
    images = write_tile_folder(tmp_path / "in", 4, nested=False)
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(str(p) for p in images))
    write_tar(tmp_path / "shard.tar", tiles(2))
    for source in (listing, tmp_path / "shard.tar"):
        done = _cli("embed", source, "-o", tmp_path / "emb.npy", "--model", tmp_path / "model")
        assert done.returncode != 0, done.stderr
        assert f"{source.name}: .txt lists and .tar shards" in done.stderr, done.stderr
        assert "pass a folder as -o" in done.stderr and not (tmp_path / "emb.npy").exists()
    large = tmp_path / "in" / "z-large.png"
    Image.new("RGB", (40, 40)).save(large)  # 1,600 pixels, over the cap below; the 20 px tiles are 400
    done = _cli("embed", tmp_path / "in", "-o", tmp_path / "emb.npy", "--model", tmp_path / "model",
                "--on-error", "skip", "--max-pixels", "1000", "--no-progress")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "max_pixels=1,000" in done.stderr and np.load(tmp_path / "emb.npy").shape[0] == 4
    done = _cli("embed", tmp_path / "in", "-o", tmp_path / "shards", "--model", tmp_path / "model",
                "--max-pixels", "1000", "--no-progress")  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows, _, _ = read_output(tmp_path / "shards")
    assert len(rows) == 4 and "max_pixels=1,000" in (tmp_path / "shards" / "failures.jsonl").read_text()


def test_a_model_folder_given_with_a_tilde_is_recorded_as_its_absolute_path(tmp_path, monkeypatch):
    """Review of probe 19's fix: the CLI expanded ~ in --model, but run_embedding(model="~/m") still recorded
    <cwd>/~/m, so `visreg-hub search` on an index of that job could not find the model."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    tiny_encoder().save_pretrained(tmp_path / "home" / "m")
    write_tile_folder(tmp_path / "imgs", 3)
    run_embedding(tmp_path / "imgs", tmp_path / "out", model="~/m")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["model"]["name"] == str(tmp_path / "home" / "m") and not (tmp_path / "~").exists()
