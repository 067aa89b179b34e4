"""scripts/bundle_model.py: only the registry entry's own architecture is packaged under its name."""

from __future__ import annotations

import hashlib
import importlib.util

import pytest
import torch
from safetensors.torch import load_file

from tests.fixtures_models import tiny_encoder
from tests.training.helpers import REPO

ASSET = REPO / "visreg_hub" / "assets" / "vit-mini-p7-fmnist"


@pytest.fixture
def bundle(tmp_path, monkeypatch):
    """The script as a module, writing into a temporary assets folder (never into the repository)."""
    spec = importlib.util.spec_from_file_location("bundle_model", REPO / "scripts" / "bundle_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "ASSETS", tmp_path / "assets")
    return module


def test_a_run_of_another_architecture_is_refused_before_anything_is_written(bundle, tmp_path):
    run = tmp_path / "final"
    tiny_encoder(seed=1, in_chans=1, mean=(0.2860,), std=(0.3530,)).save_pretrained(run)  # 2 blocks, width 32
    with pytest.raises(SystemExit) as info:
        bundle.main([str(run), "--name", "vit-mini-p7-fmnist"])
    message = str(info.value)
    assert message.startswith("error: vit-mini-p7-fmnist is depth=4, embed_dim=64, patch_size=7")
    assert "this run has depth=2, embed_dim=32, patch_size=4" in message and "\n" not in message
    assert "--config training/configs/fmnist-bundle-cpu.yaml" in message
    assert not (tmp_path / "assets").exists()


def test_the_entry_s_own_run_is_bundled_with_unchanged_weights(bundle, tmp_path, capsys):
    bundle.main([str(ASSET), "--name", "vit-mini-p7-fmnist"])
    written = tmp_path / "assets" / "vit-mini-p7-fmnist" / "model.safetensors"
    ours, theirs = load_file(str(written)), load_file(str(ASSET / "model.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # the printed pin is the written file's (its header now also records the weights' digest)
    assert hashlib.sha256(written.read_bytes()).hexdigest() in capsys.readouterr().out


@pytest.mark.parametrize("pooling", ["bogus", "patch"])
def test_a_bad_pooling_is_a_usage_error_not_a_traceback(bundle, pooling, capsys):
    with pytest.raises(SystemExit) as info:
        bundle.main([str(ASSET), "--name", "vit-mini-p7-fmnist", "--pooling", pooling])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "--pooling: invalid choice" in err and "Traceback" not in err


def test_a_pooling_the_model_cannot_give_is_one_line(bundle, tmp_path):
    run = tmp_path / "final"
    tiny_encoder(seed=1, in_chans=1, mean=(0.2860,), std=(0.3530,)).save_pretrained(run)
    model = bundle.from_pretrained(run)
    with pytest.raises(SystemExit, match=r"^error: --pooling cls_last4: .*needs depth >= 4"):
        bundle.write(model, "vit-mini-p7-fmnist", tmp_path / "assets", {}, pooling="cls_last4")
