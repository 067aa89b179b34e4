"""Model cards: Hub metadata read back by huggingface_hub, dataset ids only, and usage snippets that run."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch
from huggingface_hub import ModelCard

from tests.fixtures_models import tiny_encoder
from visreg_hub import from_pretrained
from visreg_hub.hub.card import PLACEHOLDER_FOLDER, hub_dataset_id
from visreg_hub.hub.loading import resolve

RESULTS = [
    {"task": "image-classification (kNN, k=20)", "dataset": "fashion-mnist", "metric": "accuracy",
     "value": 80.25, "split": "test (10000 images)", "command": "python eval.py"},
    {"task": "image-classification (kNN, k=20)", "dataset": "folder:/home/alice/photos", "metric": "accuracy",
     "value": 55.5, "split": "val"},
]  # fmt: skip


def test_hub_dataset_ids_never_local_paths():
    assert hub_dataset_id("fashion-mnist") == "zalando-datasets/fashion_mnist"
    assert hub_dataset_id("ILSVRC/imagenet-1k") == "ILSVRC/imagenet-1k"
    for local in ("folder:/home/alice/photos", "/data/train", "./data", "npz:tests/x.npz", "a/b/c", "../x/y"):
        assert hub_dataset_id(local) is None, local


def test_metadata_reads_back_with_huggingface_hub(tmp_path):
    model = tiny_encoder()
    folder = model.save_pretrained(
        tmp_path / "m", eval_results=RESULTS, datasets=["fashion-mnist", "folder:/home/alice/photos"]
    )
    card = ModelCard.load(folder / "README.md")
    data = card.data
    assert data.library_name == "timm" and "visreg_hub" in data.tags
    assert data.pipeline_tag == "image-feature-extraction"
    assert data.datasets == ["zalando-datasets/fashion_mnist"]
    grey = tiny_encoder(in_chans=1, mean=(0.5,), std=(0.5,)).save_pretrained(tmp_path / "grey")
    # transformers' pipeline converts images to RGB: a widget from the tag would fail on a 1-channel model
    assert ModelCard.load(grey / "README.md").data.pipeline_tag is None
    # only the result on a Hub dataset is in model-index; both are in the body's table
    assert [(r.dataset_type, r.metric_value, r.dataset_split) for r in data.eval_results] == [
        ("zalando-datasets/fashion_mnist", 80.25, "test")
    ]
    assert "/home/alice" not in card.content
    assert (
        "| own data | val | accuracy | 55.5 |" in card.text
        and "own data, not on the Hugging Face Hub" in card.text
    )


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_usage_snippets_of_a_saved_card_run(tmp_path, photo_paths, monkeypatch):
    """The card's three snippets (visreg_hub, timm, transformers), with the folder placeholder filled in."""
    model = tiny_encoder(seed=3)
    folder = model.save_pretrained(tmp_path / "model")
    blocks = _python_blocks((folder / "README.md").read_text())
    assert len(blocks) == 3
    monkeypatch.chdir(tmp_path)
    shutil.copy(photo_paths[0], tmp_path / "image1.jpg")
    Image = __import__("PIL.Image", fromlist=["Image"])
    Image.open(photo_paths[1]).save(tmp_path / "image2.png")
    namespaces = []
    for block in blocks:
        namespace: dict = {}
        exec(block.replace(PLACEHOLDER_FOLDER, str(folder)), namespace)  # the card's own code
        namespaces.append(namespace)
    ours = model.encode(["image1.jpg", "image2.png"])
    torch.testing.assert_close(namespaces[0]["embeddings"], ours, rtol=0, atol=1e-6)
    assert namespaces[1]["data_config"]["input_size"] == (3, 28, 28)
    pooled = torch.nn.functional.normalize(namespaces[2]["pooled"].detach(), dim=-1)
    torch.testing.assert_close(pooled, ours[:1], rtol=0, atol=1e-5)


def test_bundled_card_is_current_and_its_snippet_loads_by_registry_name(tmp_path, monkeypatch, fmnist_test):
    folder = Path(resolve("vit-mini-p7-fmnist").location)
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "timm" and card.data.datasets == ["zalando-datasets/fashion_mnist"]
    assert {r.metric_value for r in card.data.eval_results} == {
        r["value"] for r in from_pretrained("vit-mini-p7-fmnist").config.extra["eval_results"]
    }
    first = _python_blocks(card.text)[0]
    assert 'from_pretrained("vit-mini-p7-fmnist")' in first
    monkeypatch.chdir(tmp_path)
    Image = __import__("PIL.Image", fromlist=["Image"])
    for name, pixels in zip(("image1.jpg", "image2.png"), fmnist_test[0][:2]):
        Image.fromarray(pixels).save(name, quality=95)
    namespace: dict = {}
    exec(first, namespace)
    assert namespace["embeddings"].shape == (2, 64)


def test_card_names_the_models_own_default_pooling(tmp_path):
    """The feature-tap paragraph and the details table both name the config's pooling and its width."""
    for pooling in ("cls", "cls_last2"):
        model = tiny_encoder(pooling=pooling)
        text = (model.save_pretrained(tmp_path / pooling) / "README.md").read_text()
        assert f"this model's default is `{pooling}`" in text
        assert f"| default pooling | `{pooling}` ({model.embedding_dim(pooling)}-d) |" in text


def test_the_card_names_the_objective_and_the_real_backbone_shape(tmp_path):
    """Probe 10: a VICReg, SIGReg or Barlow run's card said "trained with the VISReg objective", and every
    card called a 2-block, 32-wide backbone "a plain timm vit_tiny_patch16_224"."""
    expected = {"vicreg": "VICReg", "sigreg": "SIGReg (LeJEPA)", "barlow": "Barlow Twins",
                "swd": "sliced-Wasserstein (SWD)"}  # fmt: skip
    for method, words in expected.items():
        model = tiny_encoder()
        model.config.extra["recipe"] = {"method": method}
        text = (model.save_pretrained(tmp_path / method) / "README.md").read_text()
        assert f"trained with the {words} objective" in text
        assert "VISReg objective" not in text
        tags = ModelCard.load(tmp_path / method / "README.md").data.tags  # probe 13: all were "visreg"
        own_tag = {"barlow": "barlow-twins", "swd": "sliced-wasserstein"}.get(method, method)
        assert "visreg" not in tags and own_tag in tags
        config = model.config
        assert (f"width {config.embed_dim}, {config.depth} blocks, {config.patch_size} px patches at "
                f"{config.img_size} px") in text  # fmt: skip
    plain = (tiny_encoder().save_pretrained(tmp_path / "plain") / "README.md").read_text()
    assert "trained with the VISReg objective" in plain  # no recipe recorded: a VISReg release
    assert "visreg" in ModelCard.load(tmp_path / "plain" / "README.md").data.tags
    own = tiny_encoder().save_pretrained(tmp_path / "own", datasets=["own npz data"])  # a run on its own data
    assert "| training data | own data, not on the Hugging Face Hub |" in (own / "README.md").read_text()
