"""The public surface of ``import visreg_hub``: one name list, lazily imported, and a docstring that runs."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

import visreg_hub
from visreg_hub.hub import registry


def test_every_public_name_resolves_to_the_object_of_its_module():
    import importlib

    names = [name for name in visreg_hub.__all__ if name != "__version__"]
    assert len(names) == len(set(names))
    for name in names:
        module = importlib.import_module(visreg_hub._PUBLIC[name])
        assert getattr(visreg_hub, name) is getattr(module, name)
    assert set(visreg_hub.__all__) <= set(dir(visreg_hub))


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'from_pretrain'"):
        visreg_hub.from_pretrain  # noqa: B018


def test_import_is_lazy_and_star_import_gives_the_list():
    code = "import sys, visreg_hub; assert 'torch' not in sys.modules, 'import visreg_hub pulled in torch'"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    namespace: dict = {}
    exec("from visreg_hub import *", namespace)
    assert sorted(k for k in namespace if k != "__builtins__") == sorted(visreg_hub.__all__)


_HEAVY = ("torch", "timm", "onnxruntime")
_CHECK_LIGHT = f"""
import sys
from visreg_hub.cli import main
code = main(sys.argv[1:])
heavy = [name for name in {_HEAVY!r} if name in sys.modules]
assert not heavy, f"visreg-hub {{' '.join(sys.argv[1:])}} imported {{heavy}}"
sys.exit(code)
"""


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        (["list"], 0),
        (["list", "--json"], 0),
        (["embed", "--help"], 0),
        (["serve", "--help"], 0),
        (["export", "onnx", "--help"], 0),
        (["index", "build", "--help"], 0),
        (["--version"], 0),
        (["embed"], 2),
    ],
)
def test_listing_help_and_usage_errors_answer_without_torch(argv, code):
    """`visreg-hub list` and every --help took 3-7 s on a 2-core CPU: the hub and models packages imported
    torch and timm to read the registry. Only the commands that run a model may import them."""
    result = subprocess.run([sys.executable, "-c", _CHECK_LIGHT, *argv], capture_output=True, text=True)
    assert result.returncode == code, result.stderr[-2000:]


def test_index_build_and_inspect_run_without_torch(tmp_path):
    """`visreg-hub index inspect` took 15 s and `index build` of a .npy 11 s on a loaded 2-core CPU, nearly
    all of it importing torch: the index files' checksums came from a helper in the torch-importing
    checkpoint module. Neither needs a model."""
    vectors = np.random.default_rng(0).standard_normal((50, 16)).astype(np.float32)
    np.save(tmp_path / "emb.npy", vectors)
    for argv in (["index", "build", str(tmp_path / "emb.npy"), "-o", str(tmp_path / "idx")],
                 ["index", "inspect", str(tmp_path / "idx")]):  # fmt: skip
        result = subprocess.run([sys.executable, "-c", _CHECK_LIGHT, *argv], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
    from visreg_hub import EmbeddingIndex

    index = EmbeddingIndex.load(tmp_path / "idx")  # what the light process built is a real index
    assert len(index) == 50 and index.search(vectors[7:8], k=1).ids[0, 0] == 7


@pytest.mark.parametrize("package", ["visreg_hub.hub", "visreg_hub.models", "visreg_hub.serving"])
def test_subpackages_export_lazily_and_list_their_public_names(package):
    import importlib

    module = importlib.import_module(package)
    names = [name for name in module.__all__]
    assert names and all(getattr(module, name) is not None for name in names)
    assert {name for name in dir(module) if not name.startswith("__")} == set(names)
    with pytest.raises(AttributeError, match=f"module {package!r} has no attribute 'nope'"):
        module.nope  # noqa: B018


def test_package_docstring_names_a_registry_model():
    names = re.findall(r'from_pretrained\("([^"]+)"\)', visreg_hub.__doc__)
    assert names, "the package docstring should show from_pretrained"
    for name in names:
        assert registry.find_entry(name) is not None, f"{name!r} is not a registry model"


def test_model_encode_shows_and_forwards_every_argument_of_encode(monkeypatch):
    """model.encode spells out encode()'s arguments (help() and notebooks showed **kwargs): the same names,
    kinds and defaults, and each one reaches encode() unchanged."""
    import inspect

    from visreg_hub.inference import embedder
    from visreg_hub.models import VISRegEncoder

    method = list(inspect.signature(VISRegEncoder.encode).parameters.values())[1:]  # without self
    function = list(inspect.signature(embedder.encode).parameters.values())[1:]  # without model
    assert [(p.name, p.kind, p.default) for p in method] == [(p.name, p.kind, p.default) for p in function]

    seen = {}

    def spy(model, images, **kwargs):
        seen.update(kwargs, model=model, images=images)

    from tests.fixtures_models import tiny_encoder

    model = tiny_encoder()
    # a distinct marker per argument: a forwarding mix-up (two names swapped, one dropped) changes the dict
    markers = {p.name: object() for p in method if p.name != "images"}
    monkeypatch.setattr(embedder, "encode", spy)
    model.encode("x.jpg", **markers)
    assert seen.pop("model") is model and seen.pop("images") == "x.jpg"
    assert seen.keys() == markers.keys() and all(seen[name] is markers[name] for name in markers)
