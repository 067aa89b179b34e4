"""Preprocessing equals timm's own evaluation transform for the same data config, bit for bit."""

from __future__ import annotations

import pytest
import timm.data
import torch
from PIL import Image

from tests.fixtures_models import tiny_config
from tests.inference import malformed
from visreg_hub.errors import ConfigError
from visreg_hub.inference.inputs import expand_inputs
from visreg_hub.inference.preprocess import Collate, DecodedItem, ImageDataset, Preprocessor
from visreg_hub.models import ModelConfig

IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


@pytest.fixture(scope="module")
def images(photo_paths):
    """The four photos (landscape and portrait) plus a tiny, very elongated crop of one."""
    photos = [malformed.photo_rgb(p) for p in photo_paths]
    return [*photos, photos[0].crop((10, 5, 47, 96))]


@pytest.mark.parametrize(
    "data_config",
    [
        ModelConfig.from_name("vit-t16").data_config,  # 224, crop_pct 0.875, bicubic
        tiny_config().data_config,  # 28, crop_pct 1.0, Fashion-MNIST stats
        dict(input_size=(3, 32, 48), interpolation="bilinear", crop_pct=0.9, crop_mode="center", **IMAGENET),
        dict(input_size=(3, 40, 40), interpolation="nearest", crop_pct=0.95, crop_mode="squash", **IMAGENET),
        dict(input_size=(3, 48, 32), interpolation="bicubic", crop_pct=1.0, crop_mode="border", **IMAGENET),
        dict(input_size=(3, 36, 36), interpolation="lanczos", crop_pct=None, crop_mode=None, **IMAGENET),
    ],
    ids=["vit-t16-224", "tiny-28", "center-nonsquare", "squash", "border", "defaults"],
)
def test_matches_timm_create_transform(images, data_config):
    reference = timm.data.create_transform(**data_config)
    preprocessor = Preprocessor(data_config)
    for image in images:
        expected = reference(image)
        pixels = preprocessor(image)
        assert pixels.dtype == torch.uint8 and pixels.shape == expected.shape == preprocessor.output_shape
        assert torch.equal(preprocessor.normalize(pixels), expected)
        assert torch.equal(preprocessor.preprocess(image), expected)


def test_grayscale_model_matches_timm_on_luma_image(images):
    data_config = tiny_config(in_chans=1, mean=(0.286,), std=(0.353,)).data_config
    reference = timm.data.create_transform(**data_config)
    preprocessor = Preprocessor(data_config)
    for image in images:
        assert torch.equal(preprocessor.preprocess(image), reference(image.convert("L")))


def test_batched_normalize_equals_per_image_transform(images):
    data_config = ModelConfig.from_name("vit-t16").data_config
    reference = timm.data.create_transform(**data_config)
    preprocessor = Preprocessor(data_config)
    batch = torch.stack([preprocessor(image) for image in images])
    normalised = preprocessor.normalize(batch, dtype=torch.float64)
    assert normalised.dtype == torch.float64
    assert torch.equal(normalised.float(), torch.stack([reference(image) for image in images]))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"interpolation": "cubic"}, "interpolation='cubic' is not one of"),
        ({"crop_mode": "middle"}, "crop_mode='middle' is not one of"),
        ({"mean": (0.5, 0.5)}, "need one value per channel"),
        ({"std": (1.0, 0.0, 1.0)}, "std values must be > 0"),
        ({"input_size": (3, 224)}, r"input_size must be \(C, H, W\)"),
        ({"input_size": (4, 8, 8), "mean": (0,) * 4, "std": (1,) * 4}, "only 1 .* or 3 .* your own"),
        ({"crop_pct": -1.0}, "crop_pct must be >= 0.05"),
        ({"crop_pct": 1e-4}, "crop_pct must be >= 0.05"),
        ({"crop_pct": float("nan")}, "crop_pct must be >= 0.05"),
    ],
)
def test_invalid_data_config_is_named(change, message):
    with pytest.raises(ConfigError, match=message):
        Preprocessor({**ModelConfig.from_name("vit-t16").data_config, **change})
    with pytest.raises(ConfigError, match=r"missing \['mean'\]"):
        Preprocessor({"input_size": (3, 8, 8), "std": (1, 1, 1), "interpolation": "bilinear"})


def test_dataset_catches_errors_per_item_and_collate_separates_them(tmp_path, photo_paths):
    bad = malformed.write(tmp_path / "bad.jpg", b"")
    sources = expand_inputs([photo_paths[0], bad, Image.new("RGB", (5, 7), (1, 2, 3))])
    preprocessor = Preprocessor(tiny_config().data_config)
    dataset = ImageDataset(sources, preprocessor)
    items = [dataset[i] for i in range(len(dataset))]
    assert [item.error is None for item in items] == [True, False, True]
    assert items[1].error.startswith(f"{bad}: empty file")
    batch = Collate(preprocessor.output_shape)(items)
    assert batch.indices.tolist() == [0, 2]
    assert torch.equal(batch.pixels[1], preprocessor(Image.new("RGB", (5, 7), (1, 2, 3))))
    assert batch.failures == [(1, items[1].error)]
    empty = Collate(preprocessor.output_shape)([DecodedItem(4, None, "x: broken")])
    assert empty.pixels.shape == (0, 3, 28, 28) and empty.pixels.dtype == torch.uint8
    assert empty.indices.tolist() == [] and empty.failures == [(4, "x: broken")]


def test_an_extreme_aspect_ratio_is_refused_before_the_resize(tmp_path):
    """max_pixels bounds the decoded image, not the resize: a 1 x 1,000,000 strip (a 3 KB PNG) would
    become 64 x 64,000,000 px. It is one item's error naming the cap; a 300:1 panorama still embeds, as
    timm's transform makes it."""
    from visreg_hub.inference.preprocess import MAX_RESIZED_PIXELS

    config = dict(
        input_size=(3, 224, 224), crop_pct=0.875, interpolation="bicubic", mean=(0, 0, 0), std=(1, 1, 1)
    )
    preprocessor = Preprocessor(config)
    strip = tmp_path / "strip.png"
    Image.new("RGB", (1_000_000, 1)).save(strip)
    assert strip.stat().st_size < 10_000
    panorama = Image.new("RGB", (3000, 10), (200, 30, 90))
    dataset = ImageDataset(expand_inputs([str(strip), panorama]), preprocessor, max_pixels=None)
    refused, kept = dataset[0], dataset[1]
    assert refused.pixels is None and refused.error.startswith(str(strip))
    assert f"above {MAX_RESIZED_PIXELS:,} pixels" in refused.error
    reference = timm.data.create_transform(**config)
    assert torch.equal(kept.pixels.float() / 255, reference(panorama))
