"""`visreg-hub` end to end on real images with a tiny saved model, plus help, exit codes and messages."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.fixtures_models import tiny_encoder
from visreg_hub import __version__
from visreg_hub.cli import main

pytest.importorskip("faiss")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine two OpenMP threads make
    timm's weight init 20x slower (measured 4 s vs 0.2 s), so these tests run single-threaded."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model") / "tiny"
    tiny_encoder().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gallery(tmp_path_factory) -> Path:
    """4 real photos (JPEG) + 12 real Fashion-MNIST images written as PNG, in a nested folder."""
    folder = tmp_path_factory.mktemp("gallery")
    photos = sorted((ROOT / "tests" / "fixtures" / "photos").glob("*.jpg"))
    for photo in photos:
        shutil.copy(photo, folder / photo.name)
    images = np.load(ROOT / "tests" / "fixtures" / "fmnist_test_200.npz")["images"]
    (folder / "fmnist").mkdir()
    for i in range(12):
        Image.fromarray(images[i * 10], mode="L").save(folder / "fmnist" / f"item_{i:02d}.png")
    return folder


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_embed_index_search_end_to_end(tmp_path, capsys, model_dir, gallery):
    emb = tmp_path / "emb.npy"
    code, out, err = run(capsys, "embed", gallery, "-o", emb, "--model", model_dir, "--no-progress")
    assert code == 0, err
    embeddings = np.load(emb, allow_pickle=False)
    sidecar = json.loads((tmp_path / "emb.npy.json").read_text())
    assert embeddings.shape == (16, 32) and embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    assert len(sidecar["paths"]) == 16 and sidecar["failures"] == []
    assert sidecar["model"] == os.path.abspath(model_dir)
    assert "16 x 32" in out

    # the CLI must give what the library gives for the same files
    import torch

    from visreg_hub.hub import from_pretrained

    model = from_pretrained(str(model_dir))
    with torch.no_grad():
        direct = model.encode(sidecar["paths"], convert_to_numpy=True)
    np.testing.assert_allclose(embeddings, direct, atol=1e-5)

    index_dir = tmp_path / "index"
    code, out, err = run(capsys, "index", "build", emb, "-o", index_dir)
    assert code == 0, err
    manifest = json.loads((index_dir / "manifest.json").read_text())
    assert manifest["model_name"] == os.path.abspath(model_dir) and manifest["count"] == 16

    queries = [gallery / "chelsea.jpg", gallery / "fmnist" / "item_03.png"]
    code, out, err = run(capsys, "search", index_dir, *queries, "-k", 5, "--json", "--no-progress")
    assert code == 0, err
    report = json.loads(out)
    for query, entry in zip(queries, report, strict=True):
        top = entry["results"][0]
        assert top["metadata"]["path"] == os.path.abspath(query)  # the query finds itself first
        assert top["score"] == pytest.approx(1.0, abs=1e-4)
        # ranks and scores equal brute-force cosine over the stored embeddings
        row = sidecar["paths"].index(os.path.abspath(query))
        sims = embeddings @ embeddings[row]
        want = np.argsort(-sims, kind="stable")[:5]
        assert [hit["id"] for hit in entry["results"]] == want.tolist()
        np.testing.assert_allclose([hit["score"] for hit in entry["results"]], sims[want], atol=1e-4)

    code, out, _ = run(capsys, "search", index_dir, queries[0], "-k", 3, "--no-progress")
    assert code == 0 and "chelsea.jpg" in out.splitlines()[2] and len(out.splitlines()) == 5


def test_embed_skips_broken_images_and_records_them(tmp_path, capsys, model_dir, gallery):
    folder = tmp_path / "imgs"
    shutil.copytree(gallery / "fmnist", folder)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    out_file = tmp_path / "emb.npy"
    code, _, err = run(capsys, "embed", folder, "-o", out_file, "--model", model_dir, "--on-error", "raise")
    assert code == 1 and "broken.png" in err and "Traceback" not in err
    assert "pass --on-error skip" in err and "on_error=" not in err  # the CLI's own flag, not the API's
    code, _, err = run(capsys, "embed", folder, "-o", out_file, "--model", model_dir, "--on-error", "skip")
    assert code == 0, err
    sidecar = json.loads((tmp_path / "emb.npy.json").read_text())
    assert np.load(out_file).shape == (12, 32)
    assert [Path(f["path"]).name for f in sidecar["failures"]] == ["broken.png"]
    assert "broken.png" not in " ".join(sidecar["paths"])
    assert "1 image(s) failed" in err
    # a named file that is missing is one more failure under skip, not the end of the job
    gone = tmp_path / "gone.png"
    flags = ("--model", model_dir, "--on-error", "skip", "--overwrite")
    code, _, err = run(capsys, "embed", folder, gone, "-o", out_file, *flags)
    assert code == 0 and "2 image(s) failed" in err, err
    failures = json.loads((tmp_path / "emb.npy.json").read_text())["failures"]
    assert [Path(f["path"]).name for f in failures] == ["broken.png", "gone.png"]
    assert "not found" in failures[1]["reason"]


def test_parquet_output_and_index_from_parquet(tmp_path, capsys, model_dir, gallery):
    pytest.importorskip("pyarrow")
    out_file = tmp_path / "emb.parquet"
    code, _, err = run(capsys, "embed", gallery / "fmnist", "-o", out_file, "--model", model_dir)
    assert code == 0, err
    code, _, err = run(capsys, "index", "build", out_file, "-o", tmp_path / "idx", "--kind", "hnsw")
    assert code == 0, err
    query = gallery / "fmnist" / "item_07.png"
    code, out, err = run(capsys, "search", tmp_path / "idx", query, "-k", 2, "--json")
    assert code == 0, err
    assert json.loads(out)[0]["results"][0]["metadata"]["path"] == os.path.abspath(query)
    assert json.loads(out)[0]["metric"] == "ip"  # says how to read "score" (l2: a squared distance)


def test_parquet_without_pyarrow_names_the_fix(tmp_path, capsys, monkeypatch, gallery):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow` raise ImportError
    code, _, err = run(capsys, "embed", gallery, "-o", tmp_path / "e.parquet")
    assert code == 1 and "pip install 'visreg_hub[parquet]'" in err


def test_index_build_options_and_paths_file(tmp_path, capsys):
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((300, 8)).astype(np.float32)
    np.save(tmp_path / "vectors.npy", emb)
    paths = [f"img_{i}.jpg" for i in range(300)]
    (tmp_path / "paths.json").write_text(json.dumps(paths))
    code, _, err = run(
        capsys, "index", "build", tmp_path / "vectors.npy", "-o", tmp_path / "idx", "--kind", "ivf",
        "--metric", "l2", "--nlist", 4, "--paths", tmp_path / "paths.json", "--model", "some-model",
    )  # fmt: skip
    assert code == 0, err
    assert "search` will need --model" not in err
    from visreg_hub.retrieval import EmbeddingIndex

    index = EmbeddingIndex.load(tmp_path / "idx")
    assert (index.kind, index.metric, index.nlist, index.model_name) == ("ivf", "l2", 4, "some-model")
    index.nprobe = 4
    assert index.search(emb[42], k=1).metadata[0][0] == {"path": "img_42.jpg"}

    (tmp_path / "short.json").write_text(json.dumps(paths[:10]))
    code, _, err = run(capsys, "index", "build", tmp_path / "vectors.npy", "-o", tmp_path / "i2", "--paths",
                       tmp_path / "short.json")  # fmt: skip
    assert code == 1 and "lists 10 paths but" in err and "300 embeddings" in err


@pytest.mark.parametrize(
    "command", [[], ["list"], ["embed"], ["index"], ["index", "build"], ["search"], ["convert"]]
)
def test_help_for_every_subcommand(capsys, command):
    code, out, _ = run(capsys, *command, "--help")
    assert code == 0
    assert out.startswith("usage: visreg-hub " + " ".join(command))


def test_version_and_usage_errors(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"visreg-hub {__version__}"
    code, _, err = run(capsys, "embed", "x.jpg")  # -o missing
    assert code == 2 and "-o/--output" in err
    code, _, err = run(capsys, "index", "build", "e.npy", "-o", "out", "--kind", "pq")
    assert code == 2 and "invalid choice: 'pq'" in err
    assert run(capsys)[0] == 2  # no sub-command: help on stderr, usage exit code
    assert run(capsys, "index")[0] == 2


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["embed", "{tmp}/missing.jpg", "-o", "{tmp}/e.npy"], "input not found: '{tmp}/missing.jpg'"),
        (["embed", "{photo}", "-o", "{tmp}/e.csv"], "must end with .npy or .parquet"),
        (["embed", "{tmp}/empty", "-o", "{tmp}/e.npy"], "contains no image files"),
        (["embed", "{photo}", "-o", "{tmp}/e.npy", "--model", "no-such-model-xyz"], "no-such-model-xyz"),
        (["index", "build", "{tmp}/missing.npy", "-o", "{tmp}/idx"], "embeddings file not found"),
        (["index", "build", "{tmp}/vectors.txt", "-o", "{tmp}/idx"], "must end with .npy or .parquet"),
        (["index", "build", "{tmp}/ints.npy", "-o", "{tmp}/idx"], "floating-point"),
        # numpy's own words named no file (probe 12): an object array, a cut header, missing data
        (["index", "build", "{tmp}/objects.npy", "-o", "{tmp}/idx"], "{tmp}/objects.npy cannot be read as"),
        (["index", "build", "{tmp}/cut.npy", "-o", "{tmp}/idx"], "{tmp}/cut.npy cannot be read as"),
        (["index", "build", "{tmp}/short.npy", "-o", "{tmp}/idx"], "{tmp}/short.npy cannot be read as"),
        (["search", "{tmp}/no-index", "{photo}"], "no manifest.json"),
        (["search", "{tmp}/idx-nomodel", "{photo}"], "records no model; pass --model"),
        (["search", "{tmp}/idx-nomodel", "{tmp}/missing.jpg"], "input not found"),
        (["convert", "{tmp}/missing.pth", "{tmp}/out"], "checkpoint not found"),
        (["convert", "{tmp}/vectors.txt", "{tmp}/out"], "not an official .pth"),
        # an output that cannot be written is refused before the work, not after it (probe 12)
        (["embed", "{photo}", "-o", "{tmp}/vectors.txt/e.npy"], "cannot write {tmp}/vectors.txt/e.npy"),
        (["index", "build", "{tmp}/floats.npy", "-o", "{tmp}/vectors.txt/idx"], "cannot write"),
    ],
)
def test_bad_input_exits_1_with_one_line_naming_the_problem(tmp_path, capsys, argv, needle, photo_paths):
    (tmp_path / "empty").mkdir()
    (tmp_path / "vectors.txt").write_text("1 2 3")
    np.save(tmp_path / "ints.npy", np.arange(12).reshape(3, 4))
    np.save(tmp_path / "floats.npy", np.eye(4, dtype=np.float32))
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    whole = (tmp_path / "floats.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(whole[:20])
    (tmp_path / "short.npy").write_bytes(whole[:-8])
    assert main(["index", "build", str(tmp_path / "floats.npy"), "-o", str(tmp_path / "idx-nomodel")]) == 0
    capsys.readouterr()
    fill = {"tmp": str(tmp_path), "photo": str(photo_paths[0])}
    code, _, err = run(capsys, *[a.format(**fill) for a in argv])
    assert code == 1
    assert needle.format(**fill) in err
    assert err.startswith("visreg-hub: error: ") and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_an_unwritable_output_is_refused_before_any_embedding(tmp_path, capsys, monkeypatch, photo_paths):
    """Probe 12: `embed -o` into a folder it cannot write embedded every image first, then failed."""
    import visreg_hub.cli_embed

    def no_model(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(visreg_hub.cli_embed, "load_model", no_model)
    (tmp_path / "a-file").write_text("not a folder")
    code, _, err = run(capsys, "embed", photo_paths[0], "-o", tmp_path / "a-file" / "e.npy")
    assert code == 1 and f"cannot write {tmp_path / 'a-file' / 'e.npy'}" in err and "choose another" in err


def test_verbose_adds_the_traceback(tmp_path, capsys):
    code, _, err = run(capsys, "index", "build", tmp_path / "nothing.npy", "-o", tmp_path / "i", "--verbose")
    assert code == 1 and "Traceback" in err and "embeddings file not found" in err


def test_list_prints_registry_entries(capsys):
    code, out, _ = run(capsys, "list")
    assert code == 0 and "vit-b16-in1k" in out and "vit-l14-in1k" in out
    code, out, _ = run(capsys, "list", "l14", "--json")
    names = [row["name"] for row in json.loads(out)]
    assert code == 0 and names and all("l14" in n for n in names) and "vit-b16-in1k" not in names


def umask() -> int:
    previous = os.umask(0o022)
    os.umask(previous)
    return previous


def test_convert_writes_a_loadable_folder(tmp_path, capsys):
    import torch
    from safetensors.torch import load_file

    from visreg_hub.models import ModelConfig, VISRegEncoder

    # the meta device skips timm's slow random init; the weights come from a seeded generator instead
    with torch.device("meta"):
        shapes = VISRegEncoder(ModelConfig.from_name("vit-t4-28")).backbone.state_dict()
    generator = torch.Generator().manual_seed(0)
    weights = {key: torch.randn(value.shape, generator=generator) * 0.02 for key, value in shapes.items()}
    torch.save({"model": weights}, tmp_path / "official.pth")
    code, out, err = run(
        capsys, "convert", tmp_path / "official.pth", tmp_path / "out", "--arch", "vit-t4-28"
    )
    assert code == 0, err
    assert "converted" in out
    # probe 19: a second convert into the folder replaced the model silently; now it needs --overwrite
    code, _, err = run(capsys, "convert", tmp_path / "official.pth", tmp_path / "out", "--arch", "vit-t4-28")
    assert code == 1 and "already holds a model; pass --overwrite" in err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep")
    code, _, err = run(
        capsys, "convert", tmp_path / "official.pth", tmp_path / "other", "--arch", "vit-t4-28"
    )
    assert code == 1 and "already holds files" in err and not (tmp_path / "other" / "config.json").exists()
    code, _, err = run(
        capsys, "convert", tmp_path / "official.pth", tmp_path / "out", "--arch", "vit-t4-28", "--overwrite"
    )
    assert code == 0, err
    assert oct((tmp_path / "out" / "model.safetensors").stat().st_mode & 0o777) == oct(0o666 & ~umask())
    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert saved.keys() == weights.keys()
    for key, value in weights.items():
        torch.testing.assert_close(saved[key], value)
    assert (
        json.loads((tmp_path / "out" / "config.json").read_text())["architecture"] == "vit_tiny_patch16_224"
    )


def test_module_entry_point_runs_as_a_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    missing = tmp_path / "nope.npy"
    done = subprocess.run(
        [sys.executable, "-m", "visreg_hub.cli", "index", "build", str(missing), "-o", "idx"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.strip() == f"visreg-hub: error: embeddings file not found: '{missing}'"


def test_hub_library_warnings_print_once():
    """huggingface_hub logs through its own stderr handler: the CLI must not print its warnings twice."""
    script = (
        "import sys\n"
        "from visreg_hub.cli import main\n"
        "main(['list'])\n"
        "from huggingface_hub.utils import logging as hf_logging\n"
        "hf_logging.get_logger('huggingface_hub.utils._http').warning('retry-marker')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.count("retry-marker") == 1, done.stderr


def test_log_lines_escape_terminal_sequences_in_file_names(tmp_path, model_dir, gallery):
    """The CLI escaped names in its own messages but not in log lines: a file named with an escape
    sequence reached the terminal raw through the pipeline's 'could not be decoded' warning (probe 15)."""
    folder = tmp_path / "photos"
    shutil.copytree(gallery / "fmnist", folder)
    (folder / "broken\x1b[2J.png").write_bytes(b"not an image")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "visreg_hub.cli", "embed", str(folder), "--model", str(model_dir),
               "-o", str(tmp_path / "e.npy"), "--on-error", "skip", "--no-progress"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "WARNING visreg_hub" in done.stderr and "broken\\x1b[2J.png" in done.stderr
    assert "\x1b" not in done.stderr


def test_search_warns_about_ignored_options_and_another_model(tmp_path, capsys, model_dir, gallery):
    code, _, err = run(capsys, "embed", gallery / "fmnist", "-o", tmp_path / "e.npy", "--model", model_dir,
                       "--shard-size", 3, "--engine", "ray")  # fmt: skip
    assert code == 0 and "--shard-size and --engine apply to shard-folder outputs only; ignored" in err
    assert run(capsys, "index", "build", tmp_path / "e.npy", "-o", tmp_path / "idx")[0] == 0
    query = gallery / "fmnist" / "item_03.png"
    code, out, err = run(capsys, "search", tmp_path / "idx", query, "--nprobe", 4, "--ef-search", 9, "--json")
    assert code == 0 and json.loads(out)[0]["results"][0]["metadata"]["path"] == os.path.abspath(query)
    assert "--nprobe applies to IVF indexes; this index is 'flat'" in err
    assert "--ef-search applies to HNSW indexes; this index is 'flat'" in err
    code, _, err = run(capsys, "search", tmp_path / "idx", query, "--model", model_dir, "--json")
    assert code == 0 and "warning" not in err  # the recorded model, named the same way
    other = tmp_path / "other-model"
    tiny_encoder(seed=1).save_pretrained(other)
    code, _, err = run(capsys, "search", tmp_path / "idx", query, "--model", other, "--json")
    assert code == 0 and "is not the model the index was built with" in err
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    code, _, err = run(capsys, "search", tmp_path / "idx", tmp_path / "broken.png")
    assert code == 1 and "broken.png" in err
    assert "fix or remove that query image, or pass --on-error skip" in err
    assert "on_error" not in err and "Traceback" not in err
    broken = tmp_path / "broken.png"
    code, out, err = run(capsys, "search", tmp_path / "idx", broken, query, "--on-error", "skip", "--json")
    assert code == 0 and "query skipped" in err and "broken.png" in err
    assert [entry["query"] for entry in json.loads(out)] == [str(query)]
    gone = tmp_path / "gone.jpg"  # a missing query is skipped too, not the end of the whole search
    code, out, err = run(capsys, "search", tmp_path / "idx", gone, query, "--on-error", "skip", "--json")
    assert code == 0 and "query skipped" in err and "gone.jpg" in err and "not found" in err
    assert [entry["query"] for entry in json.loads(out)] == [str(query)]
    assert run(capsys, "search", tmp_path / "idx", gone, query)[0] == 1  # without skip: an error
    code, _, err = run(capsys, "search", tmp_path / "idx", tmp_path / "broken.png", "--on-error", "skip")
    assert code == 1 and "no query image could be decoded" in err


def test_existing_outputs_are_kept_unless_overwrite(tmp_path, capsys, model_dir, gallery):
    """A second `embed -o FILE` or `index build -o FOLDER` onto an earlier result refuses (exit 1, the
    file untouched) and names --overwrite; with --overwrite the new result replaces it."""
    emb = tmp_path / "emb.npy"
    assert run(capsys, "embed", gallery / "fmnist", "-o", emb, "--model", model_dir, "--no-progress")[0] == 0
    before = emb.read_bytes()
    sidecar_before = (tmp_path / "emb.npy.json").read_text()

    code, _, err = run(capsys, "embed", gallery, "-o", emb, "--model", model_dir, "--no-progress")
    assert code == 1 and f"{emb} already exists" in err and "--overwrite" in err
    assert emb.read_bytes() == before and (tmp_path / "emb.npy.json").read_text() == sidecar_before

    # a sidecar left alone (its .npy deleted) is protected too: it names the rows of the file
    other = tmp_path / "other.npy"
    (tmp_path / "other.npy.json").write_text("{}")
    code, _, err = run(capsys, "embed", gallery, "-o", other, "--model", model_dir, "--no-progress")
    assert code == 1 and "other.npy.json already exists" in err and not other.exists()

    index_dir = tmp_path / "index"
    assert run(capsys, "index", "build", emb, "-o", index_dir)[0] == 0
    manifest = (index_dir / "manifest.json").read_text()
    code, _, _ = run(
        capsys, "embed", gallery, "-o", emb, "--model", model_dir, "--overwrite", "--no-progress"
    )
    assert code == 0 and np.load(emb).shape == (16, 32)  # all 16 images now, not the 12 of before

    code, _, err = run(capsys, "index", "build", emb, "-o", index_dir)
    assert code == 1 and "manifest.json already exists" in err and "--overwrite" in err
    assert (index_dir / "manifest.json").read_text() == manifest  # the 12-vector index is untouched
    assert run(capsys, "index", "build", emb, "-o", index_dir, "--overwrite")[0] == 0
    assert json.loads((index_dir / "manifest.json").read_text())["count"] == 16


def test_search_warns_when_the_model_folder_now_holds_other_weights(tmp_path, capsys, model_dir, gallery):
    """The index records the embed job's weights digest: a folder retrained in place keeps its name (the
    name check passes) but not its weights, and search says so."""
    from visreg_hub.hub.format import weights_digest
    from visreg_hub.hub.loading import from_pretrained

    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    assert run(capsys, "embed", gallery / "fmnist", "-o", tmp_path / "e.npy", "--model", folder)[0] == 0
    assert run(capsys, "index", "build", tmp_path / "e.npy", "-o", tmp_path / "idx")[0] == 0
    built = json.loads((tmp_path / "idx" / "manifest.json").read_text())["build"]["weights_sha256"]
    assert built == weights_digest(from_pretrained(str(folder)))
    query = gallery / "fmnist" / "item_03.png"
    code, _, err = run(capsys, "search", tmp_path / "idx", query, "--json")
    assert code == 0 and "warning" not in err

    retrained = tiny_encoder(seed=1)  # same architecture and config name, other weights
    retrained.save_pretrained(folder)  # retrained in place: same folder, same name
    assert weights_digest(from_pretrained(str(folder))) != built
    code, out, err = run(capsys, "search", tmp_path / "idx", query, "--json")
    assert code == 0 and "does not have the weights the index was built with" in err
    assert built[:12] in err and json.loads(out)[0]["results"]  # a warning: results still come back


def test_search_does_not_let_an_index_choose_a_model_to_download(
    tmp_path, capsys, model_dir, gallery, monkeypatch
):
    """An index from someone else records whatever model_name it likes; without --model, search loads a
    registry model or a model folder on this machine, but never downloads the Hub repo an index names."""
    from visreg_hub.hub import loading

    downloads = []
    monkeypatch.setattr(loading, "hub_download", lambda *a, **k: downloads.append(a) or 1 / 0)
    assert run(capsys, "embed", gallery / "fmnist", "-o", tmp_path / "e.npy", "--model", model_dir)[0] == 0
    assert run(capsys, "index", "build", tmp_path / "e.npy", "-o", tmp_path / "idx")[0] == 0
    query = gallery / "fmnist" / "item_03.png"
    code, _, err = run(capsys, "search", tmp_path / "idx", query, "--json")
    assert code == 0 and f"using the model the index records: {os.path.abspath(model_dir)}" in err
    manifest_path = tmp_path / "idx" / "manifest.json"
    for recorded in ("evil-org/evil-model", "hf-hub:evil-org/evil-model"):
        manifest = json.loads(manifest_path.read_text())
        manifest["model_name"] = recorded
        manifest_path.write_text(json.dumps(manifest))
        code, out, err = run(capsys, "search", tmp_path / "idx", query, "--json")
        assert code != 0 and out == "" and downloads == []
        assert f"records the model '{recorded}'" in err and f"pass --model '{recorded}'" in err
    manifest = json.loads(manifest_path.read_text())
    manifest["model_name"] = str(tmp_path / "moved-away")  # a folder that is not there (any more)
    manifest_path.write_text(json.dumps(manifest))
    code, _, err = run(capsys, "search", tmp_path / "idx", query, "--json")
    assert code == 1 and "which does not exist here" in err and "new location" in err
    assert "download" not in err  # the old advice: --model with the same missing path, "to download" it
    code, out, err = run(capsys, "search", tmp_path / "idx", query, "--json", "--model", model_dir)
    assert code == 0 and json.loads(out)[0]["results"][0]["metadata"]["path"] == os.path.abspath(query)


def test_a_reader_that_closes_the_pipe_ends_the_command_quietly():
    """Probe 19: `visreg-hub list | head` printed "error: [Errno 32] Broken pipe" and exited 1 (a CI step
    under pipefail failed with an error line). Now it stops quietly with 141, as a tool SIGPIPE killed."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "visreg_hub.cli", "list"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    process.stdout.close()  # the reader is gone before the first line
    err = process.stderr.read().decode()
    assert process.wait(timeout=120) == 141 and err == ""


def test_tilde_in_path_arguments_means_home(tmp_path, capsys, monkeypatch, model_dir, gallery):
    """Probe 19: the shell leaves ~ alone in --output=~/x and --model=~/m: a folder literally named ~ was
    made in the working folder, and the model was recorded as <cwd>/~/m, which no later search could load.
    Numeric flags are argparse errors (exit 2) before any model loads."""
    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir()
    shutil.copytree(model_dir, home / "m")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    photo = next(gallery.glob("*.jpg"))
    code, _, err = run(capsys, "embed", photo, "--output=~/t.npy", "--model=~/m")
    assert code == 0, err
    assert (home / "t.npy").is_file() and not (work / "~").exists()
    assert json.loads((home / "t.npy.json").read_text())["model"] == str(home / "m")
    code, _, err = run(capsys, "index", "build", "~/t.npy", "-o", "~/idx")
    assert code == 0, err
    code, out, err = run(capsys, "search", "~/idx", photo, "--json")
    assert code == 0 and json.loads(out)[0]["results"][0]["metadata"]["path"] == str(photo), err
    for argv in (["embed", photo, "-o", "x.npy", "--batch-size", "0"], ["search", "~/idx", photo, "-k", "0"]):
        code, _, err = run(capsys, *argv)
        assert code == 2 and "expected an integer at least 1, got '0'" in err


def test_a_model_folder_behind_a_symlink_is_recorded_alike_by_embed_index_and_search(
    tmp_path, capsys, model_dir, gallery
):
    """Review of probe 19's fix: `embed` (shard folder) recorded --model with links resolved, index build and
    search as given, so the same --model warned "not the model the index was built with" at search time
    (and a job resumed from Python with that string was another job)."""
    from visreg_hub.bulk import run_embedding

    (tmp_path / "real").mkdir()
    shutil.copytree(model_dir, tmp_path / "real" / "m")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    model = str(tmp_path / "link" / "m")
    code, _, err = run(capsys, "embed", gallery, "-o", tmp_path / "emb", "--model", model, "--no-progress")
    assert code == 0, err
    assert json.loads((tmp_path / "emb" / "manifest.json").read_text())["model"]["name"] == model
    assert run_embedding(gallery, tmp_path / "emb", model=model).complete  # the same job: nothing to redo
    code, _, err = run(capsys, "index", "build", tmp_path / "emb", "-o", tmp_path / "idx")
    assert code == 0, err
    code, _, err = run(capsys, "search", tmp_path / "idx", next(gallery.glob("*.jpg")), "--model", model)
    assert code == 0 and "not the model" not in err, err


def test_search_json_gives_a_non_utf8_query_name_as_text_and_bytes(tmp_path, capsys, model_dir, gallery):
    """Probe 19: a query file named with non-UTF-8 bytes came out as a lone surrogate (invalid JSON text for
    strict parsers); it is the readable form plus query_bytes_hex, as the index metadata gives names."""
    photo = next(gallery.glob("*.jpg"))
    odd = os.path.join(os.fsencode(tmp_path), b"caf\xe9.jpg")
    shutil.copy(photo, odd)
    run(capsys, "embed", photo, "-o", tmp_path / "e.npy", "--model", model_dir)
    run(capsys, "index", "build", tmp_path / "e.npy", "-o", tmp_path / "idx")
    code, out, err = run(capsys, "search", tmp_path / "idx", os.fsdecode(odd), "--json")
    assert code == 0, err
    (entry,) = json.loads(out)
    assert entry["query"] == os.path.join(str(tmp_path), "caf\\xe9.jpg")
    assert os.fsdecode(bytes.fromhex(entry["query_bytes_hex"])) == os.fsdecode(odd)
    out.encode("utf-8")  # no lone surrogates


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_embed_says_which_backend_embedded(tmp_path, capsys, monkeypatch, model_dir, gallery, backend):
    """Issue 14: "say which one they use". `embed` named no backend, so a user could not tell whether an
    export cache fell back to torch; both outputs (one file, shard folder) now name what ran."""
    if backend == "onnx":
        pytest.importorskip("onnxruntime")
    monkeypatch.setenv("VISREG_HUB_BACKEND", backend)
    monkeypatch.setenv("VISREG_HUB_CACHE", str(tmp_path / "cache"))
    photos = sorted(gallery.glob("*.jpg"))[:2]
    code, out, err = run(capsys, "embed", *photos, "-o", tmp_path / "e.npy", "--model", model_dir)
    assert code == 0, err
    assert out.strip().endswith(f"with {backend} on cpu"), out
    code, out, err = run(capsys, "embed", *photos, "-o", tmp_path / "shards", "--model", model_dir)
    assert code == 0, err
    assert out.startswith(f"this run ({backend} on cpu): embedded 2, failed 0"), out
    code, out, err = run(capsys, "embed", *photos, "-o", tmp_path / "shards", "--model", model_dir)
    assert code == 0 and out.startswith("this run: embedded 0"), out  # resumed, nothing ran: no backend


def test_a_sub_folder_that_cannot_be_listed_is_a_failure_not_fewer_rows(
    tmp_path, capsys, monkeypatch, model_dir
):
    """Probe: `embed folder -o x.npy` left an unlistable sub-folder out with a log warning and exit 0 (the
    sidecar's failures empty), where a shard-folder job recorded it. Now --on-error raise stops on it and
    skip records it; encode(folder) does the same."""
    from visreg_hub.errors import ImageDecodeError
    from visreg_hub.hub import from_pretrained

    root = tmp_path / "photos"
    (root / "locked").mkdir(parents=True)
    photos = sorted((ROOT / "tests" / "fixtures" / "photos").glob("*.jpg"))[:3]
    shutil.copy(photos[0], root / "a.jpg")
    shutil.copy(photos[1], root / "b.jpg")
    shutil.copy(photos[2], root / "locked" / "c.jpg")
    real_scandir = os.scandir

    def scandir(path):  # as root, chmod 000 does not stop listing: refuse this folder instead
        if os.fspath(path) == str(root / "locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    code, _, err = run(capsys, "embed", root, "-o", tmp_path / "e.npy", "--model", model_dir)
    assert code == 1 and not (tmp_path / "e.npy").exists()
    assert "locked: cannot list this folder (Permission denied)" in err and "--on-error skip" in err
    code, _, err = run(capsys, "embed", root, "-o", tmp_path / "e.npy", "--model", model_dir,
                       "--on-error", "skip")  # fmt: skip
    assert code == 0 and "1 image(s) failed" in err, err
    sidecar = json.loads((tmp_path / "e.npy.json").read_text())
    assert sidecar["paths"] == [str(root / "a.jpg"), str(root / "b.jpg")]
    ((path, reason),) = [(f["path"], f["reason"]) for f in sidecar["failures"]]
    assert path == str(root / "locked") and "cannot list this folder (Permission denied)" in reason
    model = from_pretrained(str(model_dir))
    np.testing.assert_allclose(
        np.load(tmp_path / "e.npy"), model.encode(sidecar["paths"], convert_to_numpy=True), atol=1e-6
    )
    with pytest.raises(ImageDecodeError, match="locked: cannot list this folder"):
        model.encode(root)
    result = model.encode(root, on_error="skip")
    assert result.embeddings.shape[0] == 2 and [f.index for f in result.failures] == [2]


def test_a_bulk_job_logs_progress_lines_where_stderr_is_no_terminal(
    tmp_path, capsys, caplog, monkeypatch, model_dir, gallery
):
    """Probe: `embed -o folder 2> log` printed nothing until the job ended (tqdm's bar is off without a
    terminal). It logs a line per PROGRESS_EVERY_S there now, shown by the CLI at its default verbosity,
    and --no-progress turns them off."""
    import logging

    from visreg_hub.bulk import runner

    monkeypatch.setattr(runner, "PROGRESS_EVERY_S", 0.0)  # a line per shard here
    progress_logger = logging.getLogger("visreg_hub.bulk.progress")
    monkeypatch.setattr(progress_logger, "level", logging.NOTSET)  # WARNING from the root: hidden
    code, _, err = run(
        capsys, "embed", gallery, "-o", tmp_path / "a", "--model", model_dir, "--shard-size", 5
    )
    assert code == 0, err
    lines = [r.getMessage() for r in caplog.records if r.name == "visreg_hub.bulk.progress"]
    counts = [int(line.split("embed: ")[1].split(" /")[0]) for line in lines]
    assert counts == [5, 10, 15, 16] and all("/ 16 images" in line and "images/s" in line for line in lines)
    caplog.clear()
    progress_logger.setLevel(logging.NOTSET)
    code, _, err = run(capsys, "embed", gallery, "-o", tmp_path / "b", "--model", model_dir,
                       "--shard-size", 5, "--no-progress")  # fmt: skip
    assert code == 0 and not [r for r in caplog.records if r.name == "visreg_hub.bulk.progress"], err
