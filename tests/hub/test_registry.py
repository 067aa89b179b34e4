"""Registry listing, patterns, statuses and name resolution errors."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
import torch

import visreg_hub
from tests.fixtures_models import tiny_encoder
from visreg_hub.errors import ModelNotFoundError, ModelNotPublishedError
from visreg_hub.hub import RegistryEntry, from_pretrained, list_models, registry, save_pretrained
from visreg_hub.hub.registry import FORMATS, STATUSES


def test_official_and_unpublished_entries_are_listed_with_source_license_status():
    entries = {entry.name: entry for entry in list_models()}
    assert {"vit-b16-in1k", "vit-l14-in1k", "vit-l14-in22k"} <= set(entries)
    b16, l14 = entries["vit-b16-in1k"], entries["vit-l14-in1k"]
    assert (b16.repo_id, b16.filename, b16.size) == ("BooBooWu/visreg", "visreg-vit-b-inet1k.pth", "vit-b16")
    assert (l14.repo_id, l14.filename, l14.size) == ("BooBooWu/visreg", "visreg-vit-l-inet1k.pth", "vit-l14")
    assert b16.license == l14.license == "cc-by-nc-4.0"
    assert entries["vit-l14-in22k"].status == "not yet published"
    for entry in entries.values():
        assert entry.source and entry.license and entry.status in STATUSES and entry.format in FORMATS
        assert entry.size in visreg_hub.ModelConfig.available_names()
    assert visreg_hub.list_models() == list_models()  # public lazy name


def test_pattern_is_a_glob_or_a_substring():
    assert [e.name for e in list_models("vit-l14*")] == ["vit-l14-in1k", "vit-l14-in22k"]
    assert {e.name for e in list_models("in1k")} == {"vit-b16-in1k", "vit-l14-in1k"}
    assert [e.name for e in list_models("*IN22K")] == ["vit-l14-in22k"]
    assert list_models("resnet") == []


REPO_ROOT = Path(__file__).resolve().parents[2]


def test_unpublished_entry_says_so_and_how_to_train_one():
    with pytest.raises(ModelNotPublishedError) as info:
        from_pretrained("vit-l14-in22k")
    message = str(info.value)
    assert "not yet published" in message
    command = re.search(r"accelerate launch training/pretrain\.py --config (\S+\.yaml)", message)
    assert command is not None, message
    preset = REPO_ROOT / command.group(1)
    assert preset.is_file(), f"the message names a preset that does not exist: {preset}"


@pytest.mark.parametrize(
    ("typo", "suggestion"), [("vit-b16-in1", "vit-b16-in1k"), ("vit-l14-in21k", "vit-l14-in22k")]
)
def test_unknown_name_suggests_close_registry_names(typo, suggestion):
    with pytest.raises(ModelNotFoundError, match=f"Did you mean: .*{suggestion}"):
        from_pretrained(typo)


def test_names_are_case_insensitive_and_accept_a_visreg_prefix():
    assert registry.find_entry("VISREG-vit-b16-in1k").name == "vit-b16-in1k"
    assert registry.find_entry("nope") is None


def test_bundled_entry_loads_from_its_folder_with_sha256(tmp_path, monkeypatch):
    model = tiny_encoder(seed=4)
    folder = save_pretrained(model, tmp_path / "bundled")
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    entry = RegistryEntry(
        name="visreg-tiny-bundled", size="vit-t4-28", status="bundled", format="visreg_hub",
        source="test", license="apache-2.0", local_path=str(folder), sha256=digest,
    )  # fmt: skip
    missing = RegistryEntry(
        **{**entry.__dict__, "name": "visreg-tiny-gone", "local_path": str(tmp_path / "gone")}
    )
    monkeypatch.setattr(registry, "_ENTRIES", (*registry._ENTRIES, entry, missing))
    loaded = from_pretrained("visreg-tiny-bundled")
    images = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images), rtol=0, atol=0)
    with pytest.raises(ModelNotFoundError, match="folder is missing"):
        from_pretrained("visreg-tiny-gone")


def test_entry_validation():
    with pytest.raises(ValueError, match="status"):
        RegistryEntry(
            name="x", size="vit-s16", status="released", format="visreg_hub", source="s", license="l"
        )


def test_an_item_of_list_models_loads_like_its_name():
    """timm users write from_pretrained(list_models()[0]); the items are entries, their .name the name."""
    entry = next(e for e in visreg_hub.list_models() if e.name == "vit-mini-p7-fmnist")
    by_entry = visreg_hub.from_pretrained(entry, backend="torch")
    by_name = visreg_hub.from_pretrained("vit-mini-p7-fmnist", backend="torch")
    assert by_entry.config == by_name.config
    for a, b in zip(by_entry.state_dict().values(), by_name.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_dir_of_the_package_lists_the_public_names_only():
    names = {name for name in dir(visreg_hub) if not name.startswith("__")}
    assert names == set(visreg_hub.__all__) - {"__version__"}  # no _PUBLIC, annotations or importlib


def test_hub_arguments_on_a_bundled_model_or_a_folder_are_named_as_ignored(tmp_path, caplog):
    """revision= and cache_dir= only mean something for downloads; on a bundled name (which looks like a
    Hub model) or a folder they were silently dropped, so a user pinning a revision never learnt it."""
    import logging

    folder = tmp_path / "tiny"
    tiny_encoder(seed=3).save_pretrained(folder)

    def warnings() -> list[str]:  # other loggers' INFO lines reach caplog too when the root level allows
        return [r.getMessage() for r in caplog.records if r.name == "visreg_hub.hub.loading"
                and r.levelno >= logging.WARNING]  # fmt: skip

    with caplog.at_level(logging.WARNING, logger="visreg_hub.hub.loading"):
        from_pretrained("vit-mini-p7-fmnist", backend="torch")
        assert warnings() == []
        from_pretrained("vit-mini-p7-fmnist", revision="v2", backend="torch")
        from_pretrained(folder, cache_dir=tmp_path / "hf", backend="torch")
    first, second = warnings()
    assert "revision='v2' ignored" in first and "bundled model 'vit-mini-p7-fmnist'" in first
    assert "cache_dir=" in second and str(folder) in second and "nothing is downloaded" in second


def test_a_bundled_entrys_size_and_overrides_describe_the_network_in_its_folder():
    """Probe 20: vit-mini-p7-fmnist's entry named vit-t4-28 without overrides (width 192, 12 blocks, 4 px
    patches) for a folder holding width 64, 4 blocks, 7 px patches; every field but the name, the pooling
    chosen on validation and the training record must agree."""
    import dataclasses

    from visreg_hub.hub.format import read_config
    from visreg_hub.models.config import ModelConfig

    root = Path(visreg_hub.__file__).parent
    for entry in list_models():
        if entry.status != "bundled":
            continue
        described = ModelConfig.from_name(entry.size, **entry.config_overrides)
        saved = read_config(root / entry.local_path)
        differ = {f.name for f in dataclasses.fields(ModelConfig)
                  if getattr(described, f.name) != getattr(saved, f.name)}  # fmt: skip
        assert differ <= {"name", "pooling", "extra"}, (entry.name, differ)
