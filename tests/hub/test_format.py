"""hub/format.py (the checkpoint format's one home) and the resolve -> load split of from_pretrained."""

from __future__ import annotations

import ast
import hashlib
import re
from pathlib import Path

import pytest

from tests.fixtures_models import tiny_encoder
from visreg_hub.errors import ModelNotFoundError, ModelNotPublishedError
from visreg_hub.hub import format as ckpt
from visreg_hub.hub.loading import Source, resolve

HUB_PACKAGE = Path(ckpt.__file__).parent


def test_config_json_round_trip_and_timm_head_arguments():
    model = tiny_encoder(depth=4, num_reg_tokens=2, pooling="cls_last4", extra={"license": "mit", "k": 1})
    data = ckpt.config_to_json(model.config, model.embedding_dim())
    assert ckpt.config_from_json(data) == model.config
    assert {"num_classes", "global_pool"}.isdisjoint(data["model_args"])
    # folders written before the fix repeat the head arguments in model_args: still read
    legacy = {**data, "model_args": {**data["model_args"], "num_classes": 0, "global_pool": "token"}}
    assert ckpt.config_from_json(legacy) == model.config


def test_sha256_file_matches_hashlib_across_chunk_boundaries(tmp_path):
    path = tmp_path / "blob"
    payload = bytes(range(256)) * 9000  # 2.3 MB: more than two 1 MiB chunks
    path.write_bytes(payload)
    assert ckpt.sha256_file(path) == hashlib.sha256(payload).hexdigest()
    assert ckpt.sha256_file(path, chunk_size=7) == hashlib.sha256(payload).hexdigest()


def test_one_file_hashing_helper_in_the_project():
    root = HUB_PACKAGE.parents[1]
    files = [
        p
        for folder in ("visreg_hub", "training", "demo", "export", "scripts")
        for p in (root / folder).rglob("*.py")
    ]
    defining = sorted(
        str(p.relative_to(root))
        for p in files
        if re.search(r"^def (sha256_file|file_sha256)\(", p.read_text(), re.M)
    )
    assert defining == ["visreg_hub/filehash.py"], defining


def _imported_hub_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):  # function-level imports included
        if isinstance(node, ast.ImportFrom) and node.module:
            module = node.module
            if module == "visreg_hub.hub":
                names |= {f"visreg_hub.hub.{alias.name}" for alias in node.names}
            elif module.startswith("visreg_hub.hub."):
                names.add(module)
    return {name.rsplit(".", 1)[-1] for name in names}


def test_hub_modules_import_without_a_cycle():
    graph = {p.stem: _imported_hub_modules(p) & {q.stem for q in HUB_PACKAGE.glob("*.py")}
             for p in HUB_PACKAGE.glob("*.py") if p.stem != "__init__"}  # fmt: skip
    assert "loading" not in graph["convert"] and "convert" not in graph["format"]

    def visit(node, path):
        assert node not in path, f"import cycle: {' -> '.join([*path, node])}"
        for child in graph.get(node, ()):
            visit(child, [*path, node])

    for module in graph:
        visit(module, [])


def test_resolve_names_without_touching_the_network(tmp_path):
    folder = tiny_encoder().save_pretrained(tmp_path / "m")
    assert resolve(str(folder)) == Source("folder", str(folder))
    assert resolve("org/repo", revision="v1") == Source("hub", "org/repo", revision="v1")
    assert resolve("hf-hub:org/repo").kind == "hub"
    official = resolve("vit-b16-in1k")
    assert (official.kind, official.location, official.filename, official.size) == (
        "official-pth", "BooBooWu/visreg", "visreg-vit-b-inet1k.pth", "vit-b16",
    )  # fmt: skip
    bundled = resolve("vit-mini-p7-fmnist")
    assert bundled.kind == "folder" and bundled.sha256 and Path(bundled.location, "config.json").is_file()
    with pytest.raises(ModelNotPublishedError):
        resolve("vit-l14-in22k")
    with pytest.raises(ModelNotFoundError, match="Did you mean: 'vit-mini-p7-fmnist'"):
        resolve("vit-mini-p7-fmnst")


def test_weights_digest_is_the_sha256_of_names_dtypes_shapes_and_bytes_and_sees_one_changed_weight():
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))
    expected = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        expected.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        expected.update(tensor.detach().numpy().tobytes())
    assert ckpt.weights_digest(model) == expected.hexdigest()
    with torch.no_grad():
        model[0].weight[0, 0] += 1e-6
    assert ckpt.weights_digest(model) != expected.hexdigest()


@pytest.mark.parametrize("header_bytes", [640, 896, 1152, 1408])
def test_a_safetensors_header_length_that_reads_like_a_pickle_marker_still_loads(tmp_path, header_bytes):
    """A header of 640 bytes starts the file with 80 02 00 ..., pickle protocol 2's marker: such valid
    files (small models have headers this size) were refused as "a pickled PyTorch file" (found by the
    long header fuzz). A real pickle is still named as one."""
    import struct

    import torch
    from safetensors.torch import load_file, save_file

    from visreg_hub.errors import CheckpointError
    from visreg_hub.hub.header import looks_like_pickle, read_header

    path = tmp_path / "model.safetensors"
    for pad in range(header_bytes):
        save_file({"w": torch.ones(2)}, str(path), metadata={"pad": "x" * pad})
        if struct.unpack("<Q", path.read_bytes()[:8])[0] == header_bytes:
            break
    assert path.read_bytes()[:2] == struct.pack("<H", header_bytes)[:2] and path.read_bytes()[0] == 0x80
    tensors, _ = read_header(path)
    assert set(tensors) == {"w"} and not looks_like_pickle(path)
    assert torch.equal(load_file(str(path))["w"], torch.ones(2))
    pickled = tmp_path / "renamed.safetensors"
    torch.save({"w": torch.ones(2)}, pickled, _use_new_zipfile_serialization=False)  # protocol-2 pickle
    assert looks_like_pickle(pickled)
    with pytest.raises(CheckpointError, match="looks like a pickled PyTorch file"):
        read_header(pickled)
