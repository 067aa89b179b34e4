"""encode(): equals the model's forward on timm-preprocessed batches, for every input kind and option."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
import timm.data
import torch
from PIL import Image

from tests.fixtures_models import tiny_encoder
from tests.inference import malformed
from visreg_hub.errors import ImageDecodeError
from visreg_hub.inference import EncodeFailure, EncodeResult, encode


@pytest.fixture(scope="module")
def model():
    return tiny_encoder()


@pytest.fixture(scope="module")
def photos(photo_paths):
    return [malformed.photo_rgb(p) for p in photo_paths]


def reference(model, photos, pooling=None, normalize=True):
    """Independent path: timm's own transform on the PIL images, then model.forward."""
    transform = timm.data.create_transform(**model.data_config)
    with torch.no_grad():
        out = model(torch.stack([transform(image) for image in photos]), pooling=pooling)
    return torch.nn.functional.normalize(out, dim=-1) if normalize else out


def test_equals_forward_on_timm_batch(model, photo_paths, photos):
    embeddings = encode(model, photo_paths)
    assert embeddings.shape == (4, 32) and embeddings.dtype == torch.float32
    torch.testing.assert_close(embeddings, reference(model, photos), atol=1e-5, rtol=0)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(4), atol=1e-6, rtol=0)
    raw = model.encode(photo_paths, normalize=False)  # the model's thin method delegates here
    torch.testing.assert_close(raw, reference(model, photos, normalize=False), atol=1e-5, rtol=0)
    assert not torch.allclose(raw.norm(dim=1), torch.ones(4), atol=1e-3)


@pytest.mark.parametrize("name", ["vit-tiny-p8-colour", "vit-mini-p7-fmnist"])
def test_timms_own_data_config_recipe_gives_encodes_vectors(name, photo_paths):
    """A timm user's recipe, ``create_transform(**resolve_model_data_config(model))`` on the encoder or on
    its timm backbone, preprocesses as the checkpoint says (not the stock architecture's DINO/ImageNet
    224 px defaults), and names no weights location."""
    from visreg_hub import from_pretrained

    model = from_pretrained(name, backend="torch")
    channels = model.config.in_chans
    images = [Image.open(p).convert("RGB" if channels == 3 else "L") for p in photo_paths]
    expected = encode(model, images, pooling="cls", normalize=False)
    for timm_model in (model, model.backbone):
        config = timm.data.resolve_model_data_config(timm_model)
        assert tuple(config["input_size"]) == (channels, model.config.img_size, model.config.img_size)
        assert tuple(config["mean"]) == tuple(model.config.mean)
        transform = timm.data.create_transform(**config)
        with torch.no_grad():
            features = model.backbone(torch.stack([transform(image) for image in images]))
        torch.testing.assert_close(features, expected, atol=1e-5, rtol=0)
    assert not any(model.backbone.pretrained_cfg.get(key) for key in ("url", "hf_hub_id", "file"))


def test_a_numpy_array_of_paths_is_a_batch(model, photo_paths, photos):
    """As sentence-transformers: a 1-D str or object array (``df["path"].to_numpy()``) is a list."""
    for array in (np.array([str(p) for p in photo_paths]), np.array(list(photo_paths), dtype=object)):
        embeddings = encode(model, array)
        assert embeddings.shape == (4, 32)
        torch.testing.assert_close(embeddings, reference(model, photos), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("pooling", "dim"), [("cls", 32), ("cls_last2", 64), ("mean_patch", 32), (None, 32)])
def test_pooling_choices(model, photo_paths, photos, pooling, dim):
    embeddings = encode(model, photo_paths, pooling=pooling, normalize=False)
    assert embeddings.shape == (4, dim) == (4, model.embedding_dim(pooling))
    expected = reference(model, photos, pooling, normalize=False)
    torch.testing.assert_close(embeddings, expected, atol=1e-5, rtol=0)


def test_invalid_arguments_are_named(model, photo_paths):
    with pytest.raises(ValueError, match="cls_last4"):  # the tiny model has 2 blocks
        encode(model, photo_paths, pooling="cls_last4")
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        encode(model, photo_paths, batch_size=0)
    with pytest.raises(ValueError, match="num_workers must be an integer >= 0, got -1"):
        encode(model, photo_paths, num_workers=-1)
    with pytest.raises(ValueError, match=r"on_error must be one of \('raise', 'skip'\), got 'ignore'"):
        encode(model, photo_paths, on_error="ignore")
    with pytest.raises(ValueError, match="dtype must be None, float32, float16 or bfloat16"):
        encode(model, photo_paths, dtype="int8")


def test_batch_size_and_order(model, photo_paths):
    paths = photo_paths * 3
    full = encode(model, paths, batch_size=64)
    for batch_size in (1, 5):
        torch.testing.assert_close(encode(model, paths, batch_size=batch_size), full, atol=1e-5, rtol=0)
    torch.testing.assert_close(encode(model, paths[::-1], batch_size=5), full.flip(0), atol=1e-5, rtol=0)


def test_numpy_output_and_empty_input(model, photo_paths):
    array = encode(model, photo_paths, convert_to_numpy=True)
    assert isinstance(array, np.ndarray) and array.dtype == np.float32 and array.shape == (4, 32)
    np.testing.assert_array_equal(array, encode(model, photo_paths).numpy())
    assert encode(model, []).shape == (0, 32)
    assert encode(model, [], pooling="cls_last2", convert_to_numpy=True).shape == (0, 64)
    empty = encode(model, [], on_error="skip")
    assert empty.embeddings.shape == (0, 32) and empty.failures == []


def test_every_input_kind_gives_the_same_embedding(model, photo_paths, photos, tmp_path):
    expected = encode(model, photo_paths[0])
    image = photos[0]
    pixels = np.array(image)
    chw = torch.from_numpy(pixels).permute(2, 0, 1)
    folder = tmp_path / "nested" / "deeper"
    folder.mkdir(parents=True)
    shutil.copy(photo_paths[0], folder / "only.jpg")
    inputs = [
        str(photo_paths[0]),
        photo_paths[0],
        photo_paths[0].read_bytes(),
        image,
        pixels,
        pixels.astype(np.float64) / 255.0,
        chw,
        chw.float() / 255.0,
        chw[None].float() / 255.0,  # a 4-D batch of one
        pixels[None],
        tmp_path,  # folder, searched recursively
    ]
    embeddings = encode(model, inputs, batch_size=4)
    assert embeddings.shape == (len(inputs), 32)
    torch.testing.assert_close(embeddings, expected.expand(len(inputs), -1), atol=1e-5, rtol=0)


def test_file_objects_are_one_image_each(model, photo_paths, photos, tmp_path):
    """A binary handle or BytesIO is one image (1-D result when given alone), not one item per line."""
    expected = reference(model, photos[:2])
    with open(photo_paths[0], "rb") as handle:
        single = encode(model, handle)
    assert single.shape == (32,)
    torch.testing.assert_close(single, expected[0], atol=1e-5, rtol=0)
    with open(photo_paths[1], "rb") as handle:
        both = encode(model, [io.BytesIO(photo_paths[0].read_bytes()), handle])
    torch.testing.assert_close(both, expected, atol=1e-5, rtol=0)
    listing = tmp_path / "list.txt"
    listing.write_text(f"{photo_paths[0]}\n{photo_paths[1]}\n")
    with open(listing) as text_handle:
        result = encode(model, [text_handle, photo_paths[1]], on_error="skip")
        with pytest.raises(ImageDecodeError, match=r"item 0 \(file .*list\.txt\): a text-mode file object"):
            encode(model, text_handle)
    assert [f.index for f in result.failures] == [0] and "open(path, 'rb')" in result.failures[0].reason
    torch.testing.assert_close(result.embeddings, expected[1:], atol=1e-5, rtol=0)


def test_a_meta_tensor_is_a_per_item_failure_that_skip_can_skip(model, photo_paths, photos):
    """A meta tensor has no data: .cpu() raised NotImplementedError out of encode(), skip or not."""
    meta = torch.empty(3, 8, 8, device="meta")
    result = encode(model, [photo_paths[0], meta, photo_paths[1]], on_error="skip")
    assert [f.index for f in result.failures] == [1] and "meta device" in result.failures[0].reason
    torch.testing.assert_close(result.embeddings, reference(model, photos[:2]), atol=1e-5, rtol=0)
    with pytest.raises(ImageDecodeError, match="item 0: tensor is on the meta device"):
        encode(model, meta)


def test_gray_and_alpha_inputs_go_through_decoding_rules(model):
    gray = Image.new("L", (40, 30), 90)
    transparent = Image.new("RGBA", (40, 30), (10, 200, 30, 0))
    embeddings = encode(model, [gray, transparent])
    torch.testing.assert_close(embeddings[0], encode(model, Image.new("RGB", (40, 30), (90, 90, 90))))
    torch.testing.assert_close(embeddings[1], encode(model, Image.new("RGB", (40, 30), "white")))


def test_eval_mode_used_and_training_flags_restored(model, photo_paths):
    expected = encode(model, photo_paths)
    trained = tiny_encoder(drop_path_rate=0.5)  # stochastic depth: train-mode output is random
    trained.train()
    trained.backbone.blocks[0].eval()  # a mixed state must come back exactly
    flags = [m.training for m in trained.modules()]
    first, second = encode(trained, photo_paths), encode(trained, photo_paths)
    assert [m.training for m in trained.modules()] == flags
    torch.testing.assert_close(first, second, atol=0, rtol=0)  # eval mode: deterministic
    torch.testing.assert_close(first, expected, atol=1e-5, rtol=0)  # same weights as the eval model


def test_bfloat16_autocast_on_cpu_is_close_not_identical(model, photo_paths):
    full = encode(model, photo_paths)
    low = encode(model, photo_paths, dtype="bf16", device="cpu")
    assert low.dtype == torch.float32
    assert (low * full).sum(dim=1).min() > 0.99  # cosine similarity to the float32 embeddings
    assert not torch.equal(low, full)  # autocast really ran in bfloat16
    assert next(model.parameters()).dtype == torch.float32


def test_raise_names_file_and_index(model, photo_paths, tmp_path):
    bad = malformed.write(tmp_path / "broken.png", b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ImageDecodeError, match=r"broken\.png: .* \(input index 2; pass on_error='skip'"):
        encode(model, [photo_paths[0], photo_paths[1], bad, photo_paths[2]], batch_size=2)
    with pytest.raises(ImageDecodeError, match=r"item 1: array of shape \(3,\)"):
        encode(model, [photo_paths[0], np.zeros(3, np.uint8)])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skip_keeps_good_embeddings_and_reports_bad_indices(model, photo_paths, tmp_path, num_workers):
    data = photo_paths[0].read_bytes()
    (tmp_path / "empty_dir").mkdir()
    bad_items = {
        3: malformed.write(tmp_path / "trunc.jpg", data[: len(data) // 2]),
        4: malformed.write(tmp_path / "zero.jpg", b""),
        9: tmp_path / "missing.jpg",
        12: np.full((8, 8, 3), np.nan, np.float32),
        16: torch.zeros(3, 8, 8, dtype=torch.int64),
        17: malformed.write(tmp_path / "bomb.png", malformed.png_header_only(100_000, 100_000)),
        19: tmp_path / "empty_dir",
    }
    good_items = [photo_paths[i % 4] for i in range(13)]
    items, good = [], iter(good_items)
    for index in range(20):
        items.append(bad_items[index] if index in bad_items else next(good))
    result = encode(model, items, batch_size=4, num_workers=num_workers, on_error="skip")
    assert isinstance(result, EncodeResult)
    assert [f.index for f in result.failures] == sorted(bad_items)
    assert all(isinstance(f, EncodeFailure) for f in result.failures)
    assert "trunc.jpg: truncated" in result.failures[0].reason
    assert "item 16: tensor dtype torch.int64" in result.failures[4].reason
    assert result.failures[6].reason.startswith(f"{tmp_path / 'empty_dir'}: directory contains no image")
    expected = encode(model, good_items, batch_size=7)
    torch.testing.assert_close(result.embeddings, expected, atol=1e-5, rtol=0)
    numpy_result = encode(model, items, num_workers=num_workers, on_error="skip", convert_to_numpy=True)
    assert isinstance(numpy_result.embeddings, np.ndarray) and numpy_result.failures == result.failures


def test_all_bad_batch_in_skip_mode(model, tmp_path):
    result = encode(model, [tmp_path / "a.jpg", tmp_path / "b.jpg"], batch_size=1, on_error="skip")
    assert result.embeddings.shape == (0, 32)
    assert [(f.index, f.reason.endswith("file not found; check the path")) for f in result.failures] == [
        (0, True),
        (1, True),
    ]
