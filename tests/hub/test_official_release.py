"""The official VISReg release, loaded without network through the exact path of ``from_pretrained``.

Files shaped like BooBooWu/visreg ``visreg-vit-{b,l}-inet1k.pth`` are built from timm's own
``vit_base_patch16_224`` / ``vit_large_patch14_224`` (random weights, real key names and tensor shapes;
depth 2 in the default run, full depth under ``slow``), in the layouts training code writes (flat backbone,
plus projector keys, ``module.`` / ``_orig_mod.`` prefixes, nested in ``{"net_state_dict": ...}``). The
Hub download is replaced by the local file (after checking the registry asks for the right repository and
file); everything after it (pin check, weights-only load, unwrap, prefix strip, strict load, preprocessing
from the registry) is the code ``from_pretrained("vit-b16-in1k")`` runs. Features must equal timm's model
loaded from the same weights.
"""

from __future__ import annotations

import dataclasses

import pytest
import timm
import torch

from visreg_hub.hub import loading
from visreg_hub.hub.registry import OFFICIAL_REPO

RELEASES = {"vit-b16-in1k": ("vit_base_patch16_224", "visreg-vit-b-inet1k.pth"),
            "vit-l14-in1k": ("vit_large_patch14_224", "visreg-vit-l-inet1k.pth")}  # fmt: skip


def _projector(width: int) -> dict[str, torch.Tensor]:
    # the official projector: Linear-BN-GELU-Linear-BN-GELU-Linear saved under "proj."
    return {"proj.0.weight": torch.randn(64, width), "proj.0.bias": torch.zeros(64),
            "proj.1.weight": torch.ones(64), "proj.1.running_mean": torch.zeros(64),
            "proj.1.num_batches_tracked": torch.tensor(5), "proj.6.weight": torch.randn(16, 64)}  # fmt: skip


LAYOUTS = {
    "flat": lambda sd, w: dict(sd),
    "flat+projector": lambda sd, w: {**sd, **_projector(w)},
    "ddp-module": lambda sd, w: {f"module.{k}": v for k, v in {**sd, **_projector(w)}.items()},
    "net_state_dict-compiled": lambda sd, w: {
        "net_state_dict": {f"_orig_mod.{k}": v for k, v in {**sd, **_projector(w)}.items()},
        "epoch": 99,
        "optimizer": {"state": {}, "param_groups": [{"lr": 9e-4}]},
    },
}


def _official_like(arch: str, depth: int | None):
    torch.manual_seed(0)
    kwargs = {} if depth is None else {"depth": depth}
    return timm.create_model(arch, pretrained=False, num_classes=0, **kwargs).eval()


def _load_like_from_pretrained(name: str, pth, monkeypatch, depth: int | None):
    """``from_pretrained(name)`` with the download served from ``pth`` (and depth shortened if given)."""
    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        return pth

    monkeypatch.setattr(loading, "hub_download", fake_download)
    if depth is None:
        model = loading.from_pretrained(name)
    else:  # the same load(resolve(name)) with only the depth changed, as from_pretrained does
        source = loading.resolve(name)
        source = dataclasses.replace(source, config_overrides={**source.config_overrides, "depth": depth})
        model = loading.load(source).eval()
    assert calls == [(OFFICIAL_REPO, RELEASES[name][1])]
    return model


def _check_same_features(model, reference, image_size: int):
    images = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference.forward_features(images)
        torch.testing.assert_close(model.forward_features(images), expected, rtol=0, atol=0)
        # the default embedding is timm's pre-logits CLS token after the final norm
        torch.testing.assert_close(model(images), reference.forward_head(expected, pre_logits=True))


@pytest.fixture(scope="module")
def vit_b16_depth2():
    return _official_like("vit_base_patch16_224", depth=2)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_vit_b16_release_layouts_load_exactly(layout, vit_b16_depth2, tmp_path, monkeypatch):
    reference = vit_b16_depth2
    pth = tmp_path / "visreg-vit-b-inet1k.pth"
    torch.save(LAYOUTS[layout](reference.state_dict(), 768), pth)
    model = _load_like_from_pretrained("vit-b16-in1k", pth, monkeypatch, depth=2)
    _check_same_features(model, reference, 224)
    data = model.data_config
    assert data["input_size"][-1] == 224 and data["crop_pct"] == 0.875 and data["interpolation"] == "bicubic"
    assert model.config.name == "vit-b16-in1k" and model.config.extra["license"] == "cc-by-nc-4.0"


def test_vit_l14_release_loads_exactly(tmp_path, monkeypatch):
    reference = _official_like("vit_large_patch14_224", depth=2)
    pth = tmp_path / "visreg-vit-l-inet1k.pth"
    torch.save(LAYOUTS["net_state_dict-compiled"](reference.state_dict(), 1024), pth)
    model = _load_like_from_pretrained("vit-l14-in1k", pth, monkeypatch, depth=2)
    assert model.config.patch_size == 14 and model.config.embed_dim == 1024
    _check_same_features(model, reference, 224)


def test_truncated_release_is_refused_strictly(vit_b16_depth2, tmp_path, monkeypatch):
    from visreg_hub.errors import CheckpointError

    state = dict(vit_b16_depth2.state_dict())
    state.pop("blocks.1.mlp.fc2.weight")
    pth = tmp_path / "visreg-vit-b-inet1k.pth"
    torch.save(state, pth)
    with pytest.raises(CheckpointError, match=r"blocks\.1\.mlp\.fc2\.weight"):
        _load_like_from_pretrained("vit-b16-in1k", pth, monkeypatch, depth=2)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RELEASES))
def test_full_size_release_through_from_pretrained(name, tmp_path, monkeypatch):
    arch, filename = RELEASES[name]
    reference = _official_like(arch, depth=None)
    pth = tmp_path / filename
    width = reference.embed_dim
    torch.save(LAYOUTS["net_state_dict-compiled"](reference.state_dict(), width), pth)
    model = _load_like_from_pretrained(name, pth, monkeypatch, depth=None)
    _check_same_features(model, reference, 224)
