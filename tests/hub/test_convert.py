"""Official .pth -> visreg_hub folder conversion, with the weights-only (restricted) unpickler."""

from __future__ import annotations

import logging

import pytest
import timm
import torch

from visreg_hub.errors import CheckpointError
from visreg_hub.hub import from_pretrained
from visreg_hub.hub.convert import convert_official_checkpoint, load_pth_weights_only, resolve_size_name

# tiny stand-in for the official architectures: same layout as timm's ViT-B/16, much smaller
TINY = dict(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)


@pytest.fixture(scope="module")
def source_vit():
    """A random timm ViT built independently of visreg_hub (the 'official' model)."""
    torch.manual_seed(11)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=28, patch_size=4,
        dynamic_img_size=True, **TINY,
    ).eval()  # fmt: skip


def _projector_keys():
    # the official projector is a torchvision MLP stored under "proj."
    return {
        "proj.0.weight": torch.randn(16, 32),
        "proj.1.running_var": torch.ones(16),
        "proj.8.bias": torch.zeros(4),
    }


LAYOUTS = {
    "flat-release": lambda sd: {**sd, **_projector_keys()},
    "net_state_dict-compiled": lambda sd: {
        "net_state_dict": {
            **{f"_orig_mod.backbone.{k}": v for k, v in sd.items()},
            **{f"_orig_mod.{k}": v for k, v in _projector_keys().items()},
        },
        "epoch": 391,
        "optimizer": {"state": {}, "param_groups": [{"lr": 9e-4}]},
    },
    "model-ddp": lambda sd: {
        "model": {f"module.{k}": v for k, v in sd.items()}
        | {"module.online_probe.weight": torch.randn(10, 64)}
    },
    "state_dict-encoder": lambda sd: {"state_dict": {f"module.encoder.{k}": v for k, v in sd.items()}},
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_converted_folder_reproduces_the_source_features(source_vit, tmp_path, layout, caplog):
    pth = tmp_path / "official.pth"
    torch.save(LAYOUTS[layout]({k: v.clone() for k, v in source_vit.state_dict().items()}), pth)
    with caplog.at_level(logging.INFO, logger="visreg_hub.hub.convert"):
        folder = convert_official_checkpoint(pth, tmp_path / "out", arch="vit-t4-28", **TINY)
    if layout != "state_dict-encoder":
        assert "dropped" in caplog.text and (
            "proj.0.weight" in caplog.text or "online_probe.weight" in caplog.text
        )
    images = torch.randn(2, 3, 28, 32)
    with torch.no_grad():
        expected = source_vit.forward_features(images)
        loaded = from_pretrained(folder)
        torch.testing.assert_close(loaded.forward_features(images), expected, rtol=0, atol=0)
        via_timm = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        torch.testing.assert_close(via_timm.forward_features(images), expected, rtol=0, atol=1e-6)
    card = (folder / "README.md").read_text()
    assert "license: cc-by-nc-4.0" in card and "CC BY-NC 4.0" in card
    assert loaded.config.extra["source"].startswith("converted from official.pth (sha256 ")


def test_leftover_unknown_key_and_missing_key_fail_strictly(source_vit, tmp_path):
    state = dict(source_vit.state_dict())
    torch.save({**state, "mask_token": torch.zeros(1, 1, 32)}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"unexpected keys \['mask_token'\]"):
        convert_official_checkpoint(tmp_path / "extra.pth", tmp_path / "a", arch="vit-t4-28", **TINY)
    del state["cls_token"]
    torch.save(state, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing keys \['cls_token'\]"):
        convert_official_checkpoint(tmp_path / "missing.pth", tmp_path / "b", arch="vit-t4-28", **TINY)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_wrong_architecture_is_a_shape_error(source_vit, tmp_path):
    torch.save(source_vit.state_dict(), tmp_path / "s.pth")
    with pytest.raises(CheckpointError, match="shape mismatches"):
        convert_official_checkpoint(
            tmp_path / "s.pth", tmp_path / "o", arch="vit-t4-28", embed_dim=64, depth=2, num_heads=2
        )


class _ExecutesOnLoad:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickled_arbitrary_object_is_refused_and_never_executed(source_vit, tmp_path):
    marker = tmp_path / "code-ran"
    pth = tmp_path / "malicious.pth"
    torch.save({"model": source_vit.state_dict(), "payload": _ExecutesOnLoad(marker)}, pth)
    with pytest.raises(CheckpointError, match="refused by the weights-only loader"):
        load_pth_weights_only(pth)
    with pytest.raises(CheckpointError, match="refused"):
        convert_official_checkpoint(pth, tmp_path / "out", arch="vit-t4-28", **TINY)
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_not_a_torch_file_and_no_state_dict(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"definitely not a checkpoint")
    with pytest.raises(CheckpointError):
        load_pth_weights_only(tmp_path / "junk.pth")
    torch.save({"epoch": 3, "config": {"lr": 0.1}}, tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match="no state dict found"):
        convert_official_checkpoint(tmp_path / "empty.pth", tmp_path / "o", arch="vit-t4-28", **TINY)


def test_arch_accepts_named_sizes_and_timm_names():
    assert resolve_size_name("vit-b16") == "vit-b16"
    assert resolve_size_name("vit_base_patch16_224") == "vit-b16"
    assert resolve_size_name("vit_large_patch14_224") == "vit-l14"
    with pytest.raises(ValueError, match="unknown architecture"):
        resolve_size_name("resnet50")


def test_a_compressed_archive_is_refused_before_torch_inflates_it(tmp_path):
    """A 1 MB .pth of deflated zeros made torch allocate ~1 GB before any check (probe 2): torch.save
    writes stored entries only, so a compressed entry is refused from the zip directory alone."""
    import resource
    import zipfile

    plain = tmp_path / "plain.pth"
    torch.save({"pos_embed": torch.zeros(1, 2**24)}, plain)  # 64 MiB of zeros, stored
    packed = tmp_path / "packed.pth"
    with zipfile.ZipFile(plain) as source, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info.filename))
    assert packed.stat().st_size < plain.stat().st_size // 100
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError, match="compressed entries"):
        load_pth_weights_only(packed)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 32 * 1024  # KiB: nothing inflated
    assert load_pth_weights_only(plain)["pos_embed"].shape == (1, 2**24)  # torch's own archives load


def test_legacy_serialisation_is_refused(tmp_path):
    legacy = tmp_path / "old.pth"
    torch.save({"w": torch.zeros(3)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="legacy"):
        load_pth_weights_only(legacy)


def test_refused_pickle_names_the_object_without_torchs_advice_to_disable_the_check(source_vit, tmp_path):
    pth = tmp_path / "malicious.pth"
    torch.save({"model": source_vit.state_dict(), "payload": _ExecutesOnLoad(tmp_path / "ran")}, pth)
    with pytest.raises(CheckpointError) as info:
        load_pth_weights_only(pth)
    assert "io.open" in str(info.value) or "builtins.open" in str(info.value)
    assert "weights_only" not in str(info.value) and "\n" not in str(info.value)


def test_nan_weights_and_integer_keys_are_refused_at_conversion(source_vit, tmp_path):
    state = {k: v.clone() for k, v in source_vit.state_dict().items()}
    state["cls_token"][..., 0] = float("nan")
    torch.save(state, tmp_path / "nan.pth")
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        convert_official_checkpoint(tmp_path / "nan.pth", tmp_path / "out", arch="vit-t4-28", **TINY)
    assert not (tmp_path / "out").exists()  # no folder that from_pretrained would refuse
    torch.save({0: torch.zeros(2), 1: torch.zeros(2)}, tmp_path / "ints.pth")
    with pytest.raises(CheckpointError, match="int key 0"):
        convert_official_checkpoint(tmp_path / "ints.pth", tmp_path / "out2", arch="vit-t4-28", **TINY)
    wrong = {k: v for k, v in source_vit.state_dict().items() if k != "pos_embed"}
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(CheckpointError, match=r"1 missing keys \['pos_embed'\]\. Pass the architecture"):
        convert_official_checkpoint(tmp_path / "wrong.pth", tmp_path / "out3", arch="vit-t4-28", **TINY)


def test_converting_into_a_used_folder_writes_the_new_card(source_vit, tmp_path):
    """save_pretrained keeps an existing README.md (an author's edits); a conversion's card describes the
    weights it writes, so converting another checkpoint into the same folder kept the first one's card,
    licence and checksum (review 16)."""
    state = {k: v.clone() for k, v in source_vit.state_dict().items()}
    for name, license in (("first.pth", "cc-by-nc-4.0"), ("second.pth", "apache-2.0")):
        torch.save(state, tmp_path / name)
        folder = convert_official_checkpoint(tmp_path / name, tmp_path / "out", arch="vit-t4-28",
                                             license=license, **TINY)  # fmt: skip
    card = (folder / "README.md").read_text()
    assert "license: apache-2.0" in card and "second.pth" in card and "first.pth" not in card
