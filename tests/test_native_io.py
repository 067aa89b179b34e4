"""Folders whose names are not valid UTF-8 work end to end (visreg_hub.native_io).

Linux allows any bytes in a file name; Python holds the odd ones as surrogate escapes. safetensors, pyarrow,
FAISS, ONNX Runtime and onnx's shape inference take UTF-8 paths only, so each of these round trips failed
(the safetensors one claimed the file was corrupt). Every check compares against the same work done in an
ASCII-named folder or recomputed with numpy.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.fixtures_models import tiny_encoder
from visreg_hub import from_pretrained
from visreg_hub.errors import CheckpointError
from visreg_hub.native_io import utf8_path

# the dynamo export of one model runs once per session (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("export_each_graph_once")


def _odd(folder: Path, stem: str) -> Path:
    """``folder/stem\\xff``: a name with a byte that is not UTF-8 (skipped where file systems refuse it)."""
    path = Path(os.fsdecode(os.fsencode(folder) + b"/" + stem.encode() + b"\xff"))
    try:
        path.mkdir()
    except OSError as exc:  # e.g. macOS file systems insist on UTF-8 names
        pytest.skip(f"this file system refuses non-UTF-8 names: {exc}")
    assert utf8_path(path) is None
    return path


@pytest.fixture
def colour_model():
    return tiny_encoder(seed=3, img_size=32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2))


def test_utf8_path_tells_names_native_libraries_accept():
    assert utf8_path(Path("plain/é.onnx")) == "plain/é.onnx"
    assert utf8_path(b"bytes/\xc3\xa9") == "bytes/é"
    assert utf8_path(os.fsdecode(b"odd/\xff")) is None


def test_model_saved_to_and_loaded_from_a_non_utf8_folder_embeds_alike(tmp_path, colour_model, photo_paths):
    folder = _odd(tmp_path, "model")
    colour_model.save_pretrained(folder)
    expected = colour_model.encode(photo_paths)
    torch_model = from_pretrained(folder, backend="torch")
    assert torch.equal(torch_model.encode(photo_paths), expected)
    onnx_model = from_pretrained(folder, backend="onnx")
    cosine = torch.nn.functional.cosine_similarity(onnx_model.encode(photo_paths), expected, dim=1)
    assert cosine.min().item() > 0.9999


def test_corrupt_weights_in_a_non_utf8_folder_are_still_reported_as_corrupt(tmp_path, colour_model):
    folder = _odd(tmp_path, "model")
    colour_model.save_pretrained(folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="not a valid safetensors file") as caught:
        from_pretrained(folder, backend="torch")
    assert "UTF-8" not in str(caught.value)


def test_embed_then_index_in_non_utf8_folders_finds_every_photo_itself(tmp_path, colour_model, photo_paths):
    from visreg_hub.bulk import embed_dataset
    from visreg_hub.retrieval import EmbeddingIndex
    from visreg_hub.retrieval.build import build_index

    images = _odd(tmp_path, "photos")
    for photo in photo_paths:
        shutil.copy(photo, images / photo.name)
    odd_photo = Path(os.fsdecode(os.fsencode(images) + b"/caf\xe9.jpg"))  # Latin-1 name, not UTF-8
    shutil.copy(photo_paths[0], odd_photo)
    shards = embed_dataset(images, _odd(tmp_path, "shards"), model=colour_model, batch_size=2)
    index_folder = _odd(tmp_path, "index")
    index_folder.rmdir()
    built = build_index([shards], index_folder, num_queries=1)
    reopened = EmbeddingIndex.load(index_folder)
    assert len(reopened) == len(built) == len(photo_paths) + 1

    queries = colour_model.encode(photo_paths).numpy()
    result = reopened.search(queries, k=1)
    unit = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    np.testing.assert_allclose(result.scores[:, 0], np.sum(unit * unit, axis=1), atol=1e-4)
    found = {os.fsencode(os.path.basename(m[0]["path"])) for m in result.metadata}
    assert {p.name.encode() for p in photo_paths[1:]} <= found
    metadata = reopened.get_metadata(reopened.ids)
    names = {bytes.fromhex(m["path_bytes_hex"]) for m in metadata if "path_bytes_hex" in m}
    assert names == {os.fsencode(path) for path in images.iterdir()}  # exact bytes, the odd photo's too
    assert os.fsencode(odd_photo) in names


def test_int8_export_into_a_non_utf8_folder_loads_and_agrees(tmp_path, colour_model, photo_paths):
    pytest.importorskip("onnxruntime.quantization")
    from visreg_hub.inference.onnx import OnnxEmbedder, export_onnx

    target = _odd(tmp_path, "export") / "model-int8.onnx"
    report = export_onnx(colour_model, target, int8=True, validation_batch_sizes=(1, 2))
    assert report.passed
    embedder = OnnxEmbedder(target)
    cosine = torch.nn.functional.cosine_similarity(
        torch.as_tensor(embedder.encode(photo_paths)), colour_model.encode(photo_paths), dim=1
    )
    assert cosine.min().item() > 0.99


def test_training_state_tensors_read_from_a_non_utf8_folder(tmp_path):
    from safetensors.torch import save_file

    from training.state_checks import read_tensors

    folder = _odd(tmp_path, "run")
    tensors = {"w": torch.arange(6.0).reshape(2, 3)}
    with open(folder / "t.safetensors", "wb") as handle:
        from safetensors.torch import save

        handle.write(save(tensors))
    assert torch.equal(read_tensors(folder / "t.safetensors")["w"], tensors["w"])
    save_file(tensors, str(tmp_path / "plain.safetensors"))
    assert torch.equal(read_tensors(tmp_path / "plain.safetensors")["w"], tensors["w"])


@pytest.mark.parametrize("suffix", [".npy", ".parquet"])
def test_index_built_from_an_embeddings_file_keeps_latin1_names_exactly(tmp_path, suffix):
    from visreg_hub.retrieval.build import build_index
    from visreg_hub.retrieval.files import write_embeddings
    from visreg_hub.retrieval.records import metadata_problem

    names = [os.fsdecode(b"/photos/caf\xe9.jpg"), "/photos/plain.jpg"]
    vectors = np.eye(2, 8, dtype=np.float32)
    write_embeddings(tmp_path / f"e{suffix}", vectors, paths=names, model="m", pooling="cls", normalized=True)
    index = build_index([tmp_path / f"e{suffix}"], tmp_path / "index", num_queries=1)
    first, second = index.get_metadata(index.search(vectors, k=1).ids[:, 0])
    assert os.fsdecode(bytes.fromhex(first["path_bytes_hex"])) == names[0]
    assert first["path"] == "/photos/caf\\xe9.jpg" and second == {"path": names[1]}
    # the Python API refuses the raw name, and its message names the helper that stores it
    assert "name_fields" in metadata_problem({"path": names[0]})
