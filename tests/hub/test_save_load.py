"""save_pretrained / from_pretrained on local folders: round trips, timm compatibility, strict loading."""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file, save_file

from tests.fixtures_models import tiny_encoder
from visreg_hub.errors import CheckpointError, ModelNotFoundError
from visreg_hub.hub import from_pretrained, save_pretrained
from visreg_hub.hub.loading import load_folder
from visreg_hub.models import POOLINGS

EVAL_RESULTS = [{"task": "knn", "dataset": "fashion_mnist", "metric": "accuracy", "value": 80.25}]
EVAL_COMMAND = "visreg-hub eval --model ckpt --dataset fashion_mnist"


@pytest.fixture
def saved(tmp_path):
    """A tiny encoder with registers and metadata, saved to a folder."""
    extra = {
        "license": "apache-2.0",
        "loss": {"name": "visreg", "reg_weight": 0.9, "num_slices": 64},
        "recipe": {"epochs": 3, "lr": 1e-3},
        "datasets": ["fashion_mnist"],
        "notes": "kept under visreg.extra",
    }
    model = tiny_encoder(depth=4, num_reg_tokens=1, pooling="cls_last2", extra=extra)
    folder = save_pretrained(
        model,
        tmp_path / "ckpt",
        eval_results=EVAL_RESULTS,
        eval_command=EVAL_COMMAND,
    )
    return model, folder


def _images(height=28, width=28):
    return torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(3))


def test_folder_layout_and_config_json_is_timm_compatible(saved):
    model, folder = saved
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224"
    assert config["num_features"] == 32
    pretrained_cfg = config["pretrained_cfg"]
    assert pretrained_cfg["input_size"] == [3, 28, 28]
    assert pretrained_cfg["mean"] == list(model.config.mean) and pretrained_cfg["std"] == list(
        model.config.std
    )
    assert {"crop_pct", "interpolation"} <= set(pretrained_cfg)
    visreg = config["visreg"]
    assert visreg["format_version"] == 1
    assert (visreg["pooling"], visreg["embedding_dim"]) == ("cls_last2", 64)
    assert visreg["loss"] == {"name": "visreg", "reg_weight": 0.9, "num_slices": 64}
    assert visreg["license"] == "apache-2.0"
    # head arguments live at the top level only: timm's local-dir loader and transformers' TimmWrapper
    # pass num_classes themselves, and a second copy in model_args is a "multiple values" TypeError
    assert {"num_classes", "global_pool"}.isdisjoint(config["model_args"])
    assert (config["num_classes"], config["global_pool"]) == (0, "token")
    # weights: exactly the keys timm's own model built from model_args has (timm key names, no prefix)
    reference = timm.create_model(
        config["architecture"], pretrained=False, num_classes=config["num_classes"], **config["model_args"]
    )
    weights = load_file(folder / "model.safetensors")
    assert set(weights) == set(reference.state_dict())


def test_round_trip_gives_identical_embeddings_and_config(saved):
    model, folder = saved
    loaded = from_pretrained(str(folder))
    # what save_pretrained was given for the card is kept in config.json too
    kept = {"eval_results": EVAL_RESULTS, "eval_command": EVAL_COMMAND}
    assert loaded.config == model.config.replace(extra={**model.config.extra, **kept})
    assert not loaded.training
    images = _images(28, 36)
    with torch.no_grad():
        for pooling in POOLINGS:
            torch.testing.assert_close(
                loaded(images, pooling=pooling), model(images, pooling=pooling), rtol=0, atol=0
            )
        torch.testing.assert_close(loaded.patch_tokens(images), model.patch_tokens(images), rtol=0, atol=0)


def test_timm_local_dir_loads_the_same_features(saved):
    model, folder = saved
    backbone = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    images = _images()
    with torch.no_grad():
        torch.testing.assert_close(
            backbone.forward_features(images), model.forward_features(images), rtol=0, atol=1e-6
        )
        torch.testing.assert_close(backbone(images), model(images, pooling="cls"), rtol=0, atol=1e-6)
    data_config = timm.data.resolve_data_config({}, model=backbone)
    assert data_config["input_size"] == (3, 28, 28)
    assert tuple(data_config["mean"]) == model.config.mean


def test_model_card_metadata_and_evaluation(saved):
    _model, folder = saved
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n")
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["license"] == "apache-2.0"
    assert metadata["library_name"] == "timm"  # the Hub's timm integration; see hub/card.py
    assert metadata["pipeline_tag"] == "image-feature-extraction"
    assert "visreg_hub" in metadata["tags"]
    assert metadata["datasets"] == ["zalando-datasets/fashion_mnist"]  # the Hub id of Fashion-MNIST
    assert metadata["model-index"][0]["results"][0]["metrics"][0]["value"] == 80.25
    assert "visreg-hub eval --model ckpt --dataset fashion_mnist" in card
    assert '"reg_weight": 0.9' in card  # loss settings in the training section


def test_save_pretrained_method_with_verbatim_card_and_license(tmp_path):
    model = tiny_encoder()
    folder = model.save_pretrained(tmp_path / "m", card="# hand written\n", license="cc-by-nc-4.0")
    assert (folder / "README.md").read_text() == "# hand written\n"
    assert json.loads((folder / "config.json").read_text())["visreg"]["license"] == "cc-by-nc-4.0"
    assert from_pretrained(folder).config.extra["license"] == "cc-by-nc-4.0"


def test_timms_local_dir_spelling_names_the_folder(saved):
    """The card shows timm.create_model("local-dir:FOLDER"); the same string failed in from_pretrained."""
    _, folder = saved
    images = torch.rand(1, 3, 28, 28)
    with torch.no_grad():
        expected = from_pretrained(folder)(images)
        torch.testing.assert_close(from_pretrained(f"local-dir:{folder}")(images), expected)
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        from_pretrained(f"local-dir:{folder}-missing")
    with pytest.raises(ModelNotFoundError, match="needs a name"):
        from_pretrained("local-dir:")


def test_saving_again_keeps_an_edited_card_unless_told(tmp_path):
    """huggingface_hub's save_pretrained never overwrites a README.md; ours replaced the author's edits with
    a fresh card on every save (probe 15)."""
    folder = save_pretrained(tiny_encoder(seed=1), tmp_path / "m")
    edited = (folder / "README.md").read_text() + "\n## Notes from the author\n"
    (folder / "README.md").write_text(edited)
    save_pretrained(tiny_encoder(seed=2), folder)
    assert (folder / "README.md").read_text() == edited
    images = torch.rand(1, 3, 28, 28)
    with torch.no_grad():  # the weights were replaced all the same
        torch.testing.assert_close(from_pretrained(folder)(images), tiny_encoder(seed=2)(images))
    save_pretrained(tiny_encoder(seed=2), folder, overwrite_card=True)
    assert "Notes from the author" not in (folder / "README.md").read_text()
    save_pretrained(tiny_encoder(seed=2), folder, card="# given\n")  # an explicit card is always written
    assert (folder / "README.md").read_text() == "# given\n"


def test_device_and_dtype(saved):
    model, folder = saved
    loaded = from_pretrained(folder, device="cpu", dtype=torch.float64)
    assert loaded.dtype == torch.float64 and loaded.device.type == "cpu"
    images = _images()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images.double()).float(), model(images), rtol=1e-4, atol=1e-4)


def _rewrite_weights(folder, change):
    weights = load_file(folder / "model.safetensors")
    change(weights)
    save_file(weights, str(folder / "model.safetensors"))


@pytest.mark.parametrize(
    ("change", "expected_message"),
    [
        (lambda w: w.pop("blocks.1.mlp.fc2.bias"), r"missing keys \['blocks.1.mlp.fc2.bias'\]"),
        (lambda w: w.__setitem__("proj.0.weight", torch.zeros(2, 2)), r"unexpected keys \['proj.0.weight'\]"),
        (
            lambda w: w.__setitem__("norm.weight", torch.ones(33)),
            r"norm.weight: checkpoint \(33,\) vs model \(32,\)",
        ),
    ],
    ids=["missing", "unexpected", "wrong-shape"],
)
def test_strict_loading_lists_the_offending_keys(saved, change, expected_message):
    _model, folder = saved
    _rewrite_weights(folder, change)
    with pytest.raises(CheckpointError, match=expected_message):
        from_pretrained(folder)


def test_config_and_weights_disagreeing_is_a_checkpoint_error(saved):
    _model, folder = saved
    config = json.loads((folder / "config.json").read_text())
    config["model_args"]["depth"] = 3
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"unexpected keys \['blocks.3"):
        from_pretrained(folder)


class _RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_pickle_renamed_to_safetensors_is_refused_without_unpickling(saved, tmp_path, writer):
    model, folder = saved
    marker = tmp_path / "pwned"
    payload = {"state_dict": model.backbone.state_dict(), "evil": _RunsCodeWhenUnpickled(marker)}
    target = folder / "model.safetensors"
    if writer == "torch.save":
        torch.save(payload, target)
    else:
        target.write_bytes(pickle.dumps(payload, protocol=4))
    with pytest.raises(CheckpointError, match="pickled PyTorch file"):
        from_pretrained(folder)
    assert not marker.exists()


def test_truncated_safetensors_is_refused(saved):
    _model, folder = saved
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        from_pretrained(folder)


def test_sha256_mismatch_and_match(saved):
    import hashlib

    _model, folder = saved
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    load_folder(folder, weights_sha256=digest)
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_folder(folder, weights_sha256="ab" * 32)


def test_folder_without_safetensors_points_to_the_converter(saved):
    _model, folder = saved
    (folder / "model.safetensors").rename(folder / "pytorch_model.pth")
    with pytest.raises(CheckpointError, match="visreg-hub convert"):
        from_pretrained(folder)


def test_missing_folder_or_bad_name(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such folder"):
        from_pretrained(str(tmp_path / "does" / "not" / "exist"))
    with pytest.raises(ModelNotFoundError, match=r"config\.json"):
        from_pretrained(tmp_path)
    (tmp_path / "weights.pth").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="is a file"):
        from_pretrained(str(tmp_path / "weights.pth"))


def test_a_failed_save_leaves_the_earlier_folder_loadable_and_unchanged(tmp_path, monkeypatch):
    """config.json used to be written before the weights: a save that failed on the weights (disk full)
    left the new config beside the old weights, a folder that no longer loaded."""
    from visreg_hub.hub import format as ckpt

    folder = save_pretrained(tiny_encoder(seed=1), tmp_path / "m")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def disk_full(target, model):
        (target / ckpt.WEIGHTS_NAME).write_bytes(b"\0" * 100)  # a partial file, then the failure
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "write_weights", disk_full)
    with pytest.raises(OSError, match=r"could not save the model to .*earlier files are unchanged"):
        save_pretrained(tiny_encoder(seed=2, depth=3), folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # no staging folder left either
    monkeypatch.undo()
    images = torch.rand(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(from_pretrained(folder)(images), tiny_encoder(seed=1)(images))


def test_card_metadata_survives_loading_and_saving_again(tmp_path):
    """datasets / eval_results / description given to save_pretrained changed only README.md: the next
    save of the loaded model lost them, and config.json disagreed with the card (probe 2)."""
    first = save_pretrained(
        tiny_encoder(), tmp_path / "a", datasets=["fashion_mnist", "imagenet-1k"], eval_results=EVAL_RESULTS,
        description="A tiny test encoder.", license="mit",
    )  # fmt: skip
    again = save_pretrained(from_pretrained(first), tmp_path / "b")
    card = (again / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    first_front = yaml.safe_load((first / "README.md").read_text().split("---")[1])
    assert front["license"] == "mit" and front["datasets"] == first_front["datasets"]
    assert len(front["datasets"]) == 2  # Hub ids, as the card writes them
    assert "A tiny test encoder." in card and "80.25" in card
    assert (again / "config.json").read_text() == (first / "config.json").read_text()


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [("license", ["mit"], "visreg.license must be a string"),
     ("datasets", "fmnist", "visreg.datasets must be a list"),
     ("eval_results", "oops", "visreg.eval_results must be a list"), ("datasets", [1], "list of strings")],
)  # fmt: skip
def test_card_fields_of_the_wrong_type_are_refused_at_load(tmp_path, key, value, message):
    folder = save_pretrained(tiny_encoder(), tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["visreg"][key] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        from_pretrained(folder)


def test_a_non_square_patch_size_is_refused(tmp_path):
    folder = save_pretrained(tiny_encoder(), tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["model_args"]["patch_size"] = [4, 8]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="not a square size"):
        from_pretrained(folder)


@pytest.mark.parametrize("crop_mode", ["squash", "border"])
def test_a_folders_crop_mode_is_what_timm_does_and_survives_a_save(saved, tmp_path, crop_mode):
    """``pretrained_cfg.crop_mode`` was ignored (every image centre-cropped, cosine 0.93 to timm on
    "border") and rewritten to "center" by save_pretrained; now it is read, used and written back."""
    from PIL import Image

    _model, folder = saved
    edited = tmp_path / "edited"
    shutil.copytree(folder, edited)
    config = json.loads((edited / "config.json").read_text())
    config["pretrained_cfg"]["crop_mode"] = crop_mode
    (edited / "config.json").write_text(json.dumps(config))
    loaded = from_pretrained(str(edited), backend="torch")
    assert loaded.config.crop_mode == crop_mode and loaded.data_config["crop_mode"] == crop_mode
    rng = np.random.default_rng(0)
    sizes = ((40, 90), (70, 30))  # wide and tall: the three modes differ on both
    photos = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    backbone = timm.create_model(f"local-dir:{edited}", pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=backbone))
    assert timm.data.resolve_data_config({}, model=backbone)["crop_mode"] == crop_mode
    with torch.no_grad():
        expected = backbone(torch.stack([transform(p) for p in photos]))
    got = loaded.encode(photos, pooling="cls", normalize=False)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    loaded.save_pretrained(tmp_path / "again")
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert again["pretrained_cfg"]["crop_mode"] == crop_mode
    config["pretrained_cfg"]["crop_mode"] = None  # timm reads a null as its default, "center"
    (edited / "config.json").write_text(json.dumps(config))
    assert from_pretrained(str(edited), backend="torch").config.crop_mode == "center"


def test_a_save_stopped_between_its_renames_is_refused_and_copies_or_edits_are_not(tmp_path, monkeypatch):
    """Probe 19: save_pretrained renames the new weights in, then the new config.json; a kill between the
    two left new weights beside the old config (same architecture, other pooling), which loaded silently
    (cosine 0.30 to either model). Probe 20: the first fix (a weights digest in both files) also refused
    sound folders: weights copied from another save of the same settings, or a Hub repo whose new weights
    were uploaded alone. Now only the state the kill leaves (the config.json still in the staging folder,
    the weights already renamed) is refused, and its fix is named."""
    import os

    from visreg_hub.hub import saving

    first = save_pretrained(tiny_encoder(seed=0), tmp_path / "model")
    renames = []

    def killed_after_the_first_rename(source, target):
        renames.append(target)
        if len(renames) == 2:
            raise KeyboardInterrupt  # the process dies here: the staging folder stays
        os.rename(source, target)

    monkeypatch.setattr(saving.os, "replace", killed_after_the_first_rename)
    monkeypatch.setattr(saving.shutil, "rmtree", lambda *a, **k: None)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(tiny_encoder(seed=1, pooling="mean_patch"), first)
    monkeypatch.undo()
    assert [p.name for p in renames] == ["model.safetensors", "config.json"]
    with pytest.raises(CheckpointError, match=r"is half saved.*Finish that save by moving the files of"):
        from_pretrained(first)
    staging = next(first.glob(".saving-*"))
    for name in os.listdir(staging):  # the fix the message names
        os.replace(staging / name, first / name)
    finished = from_pretrained(first)
    want = tiny_encoder(seed=1, pooling="mean_patch")
    assert finished.config.pooling == "mean_patch"
    torch.testing.assert_close(finished.backbone.state_dict(), want.backbone.state_dict())
    again = save_pretrained(tiny_encoder(seed=0), tmp_path / "again")
    assert (again / "config.json").read_bytes() == (
        save_pretrained(tiny_encoder(seed=0), tmp_path / "again2") / "config.json"
    ).read_bytes()  # saves stay deterministic
    # weights of another save with the same settings copied in (or uploaded alone to a Hub repo) load
    other = save_pretrained(tiny_encoder(seed=3), tmp_path / "other")
    shutil.copyfile(other / "model.safetensors", again / "model.safetensors")
    torch.testing.assert_close(from_pretrained(again).backbone.state_dict(),
                               tiny_encoder(seed=3).backbone.state_dict())  # fmt: skip
    (again / ".saving-12").mkdir()  # a save stopped while writing: the folder is still the old model
    (again / ".saving-12" / "model.safetensors").write_bytes(b"half")
    (again / ".saving-12" / "config.json").write_text("{}")
    assert from_pretrained(again) is not None
    # review of probe 20: a stopped save's staging folder whose process id a live process has taken since
    # is left by later saves; once a later save completed (its config.json is newer) it is not refused
    stale = again / ".saving-1"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"is half saved"):
        from_pretrained(again)
    save_pretrained(tiny_encoder(seed=3), again)  # pid 1 is alive: its staging folder stays
    assert stale.is_dir() and from_pretrained(again) is not None


def test_staging_folders_of_killed_saves_are_removed_by_the_next_save(tmp_path):
    """Probe 19: a save killed mid-way left .saving-<pid> (a full copy of the weights) in the model folder
    for good; the next save runs under another pid. A live process's staging folder is left alone."""
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()  # fmt: skip
    folder = save_pretrained(tiny_encoder(), tmp_path / "model")
    (folder / f".saving-{dead}").mkdir()
    (folder / f".saving-{dead}" / "model.safetensors").write_bytes(b"half")
    (folder / ".saving-1").mkdir()  # pid 1 is alive: another save may be writing
    save_pretrained(tiny_encoder(), folder)
    assert not (folder / f".saving-{dead}").exists() and (folder / ".saving-1").is_dir()


def test_the_weights_are_as_readable_as_the_config(tmp_path):
    """Probe 19: safetensors writes its file 0600 whatever the umask, so another account could read a saved
    model's config.json but not its weights (a model folder written by CI and served by another user)."""
    import os

    previous = os.umask(0o022)
    try:
        folder = save_pretrained(tiny_encoder(), tmp_path / "model")
    finally:
        os.umask(previous)
    modes = {name: (folder / name).stat().st_mode & 0o777 for name in ("model.safetensors", "config.json")}
    assert modes == {"model.safetensors": 0o644, "config.json": 0o644}
