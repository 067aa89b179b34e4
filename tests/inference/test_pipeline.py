"""The one embedding pipeline: the batch entry points a server calls, and backends chosen at load time."""

from __future__ import annotations

import logging

import pytest
import timm.data
import torch

from tests.fixtures_models import tiny_encoder
from tests.inference import malformed
from visreg_hub.hub import from_pretrained
from visreg_hub.inference import EmbeddingPipeline, TorchBackend, backend_for, encode
from visreg_hub.inference.backends import BackendSpec


@pytest.fixture(scope="module")
def model():
    return tiny_encoder(seed=3)


def timm_reference(model, images, normalize=True):
    """Independent path: timm's eval transform on decoded PIL images, then model.forward."""
    transform = timm.data.create_transform(**model.data_config)
    with torch.no_grad():
        out = model(torch.stack([transform(image) for image in images]))
    return torch.nn.functional.normalize(out, dim=-1) if normalize else out


def test_embed_batch_reports_bad_items_by_position_and_embeds_the_rest(model, photo_paths):
    photos = [malformed.photo_rgb(p) for p in photo_paths]
    items = [photo_paths[0].read_bytes(), b"not an image", photos[1], photo_paths[0].parent, photos[2]]
    pipeline = EmbeddingPipeline(TorchBackend(model))
    out = pipeline.embed_batch(items)
    assert out.indices == [0, 2, 4]
    assert [f.index for f in out.failures] == [1, 3]
    assert "item 1" in out.failures[0].reason and "one image per item" in out.failures[1].reason
    expected = timm_reference(model, [photos[0], photos[1], photos[2]])
    torch.testing.assert_close(out.embeddings, expected, atol=1e-5, rtol=0)
    # the loop entry point gives the same rows for the same images
    torch.testing.assert_close(encode(model, [photo_paths[0], photos[1], photos[2]]), out.embeddings)


def test_embed_pixels_takes_a_preprocessed_batch_and_checks_its_shape(model, photo_paths):
    backend = TorchBackend(model)
    photos = [malformed.photo_rgb(p) for p in photo_paths]
    pixels = torch.stack([backend.transform(image) for image in photos])  # (4, 3, 28, 28) uint8
    raw = EmbeddingPipeline(backend, normalize=False).embed_pixels(pixels)
    torch.testing.assert_close(raw, timm_reference(model, photos, normalize=False), atol=1e-5, rtol=0)
    assert EmbeddingPipeline(backend).embed_pixels(pixels[:0]).shape == (0, 32)
    with pytest.raises(ValueError, match=r"pixels must be uint8 \(B, 3, 28, 28\)"):
        EmbeddingPipeline(backend).embed_pixels(pixels.float())


def test_embed_batch_of_only_bad_items_returns_an_empty_batch(model):
    out = EmbeddingPipeline(TorchBackend(model)).embed_batch([b"x", "missing.png"])
    assert out.embeddings.shape == (0, 32) and out.indices == [] and [f.index for f in out.failures] == [0, 1]


def test_from_pretrained_records_the_backend_and_encode_uses_it(model, tmp_path, photo_paths, caplog):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model.save_pretrained(tmp_path / "tiny")
    with caplog.at_level(logging.INFO, logger="visreg_hub.inference.backends"):
        loaded = from_pretrained(tmp_path / "tiny", backend="onnx")
    assert loaded.backend == "onnx" and "uses the onnx backend" in caplog.text
    assert backend_for(loaded).name == "onnx"
    reference = timm_reference(model, [malformed.photo_rgb(p) for p in photo_paths])
    torch.testing.assert_close(loaded.encode(photo_paths), reference, atol=1e-4, rtol=0)
    assert from_pretrained(tmp_path / "tiny").backend == "torch"
    assert tiny_encoder().backend == "torch"  # a model built in code runs on torch
    with pytest.raises(ValueError, match="backend must be one of"):
        from_pretrained(tmp_path / "tiny", backend="tensorrt")
    with pytest.raises(ValueError, match="pass backend='onnx' with them"):
        from_pretrained(tmp_path / "tiny", precision="fp16")
    assert BackendSpec().backend == "torch"
