"""ONNX export and ONNX Runtime inference, checked against the PyTorch model and timm's PIL transform.

Three exports of the tiny encoder are shared by the module (each costs seconds): a plain fp32 graph with
patch tokens, a graph with baked preprocessing written through the CLI, and an fp16 + fused graph made
by ``encode(..., backend="onnx")``'s helper. Everything else reuses them or builds small graphs by hand.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm.data
import torch
from PIL import Image

from tests.fixtures_models import tiny_encoder
from tests.inference import malformed
from visreg_hub.errors import CheckpointError, ImageDecodeError, UserInputError
from visreg_hub.models import ModelConfig

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from visreg_hub.inference.onnx import (  # noqa: E402
    OnnxEmbedder,
    OnnxValidationError,
    encode_onnx,
    export_onnx,
    read_onnx_metadata,
    validate_onnx,
)
from visreg_hub.inference.onnx.backend import LIVE_BACKENDS, weights_fingerprint  # noqa: E402
from visreg_hub.inference.onnx.graph import PreprocessingSpec, preprocessing_model  # noqa: E402

# the dynamo export of one model runs once per session (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("export_each_graph_once")

BAKED_SIZE = (48, 40)  # (H, W) of the uint8 input of the baked graph: portrait, not the model size


@pytest.fixture(scope="module")
def model():
    return tiny_encoder(seed=0)


@pytest.fixture(scope="module")
def plain(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    report = export_onnx(model, path, patch_tokens=True)
    return path, report


@pytest.fixture(scope="module")
def baked(model, tmp_path_factory):
    """Exported through `visreg-hub export onnx` from a saved folder (same weights as `model`)."""
    from visreg_hub.cli import main

    root = tmp_path_factory.mktemp("baked")
    model.save_pretrained(root / "tiny")
    path, report = root / "tiny-uint8.onnx", root / "report.json"
    argv = [
        "export",
        "onnx",
        str(root / "tiny"),
        str(path),
        "--with-preprocessing",
        "--report-json",
        str(report),
    ]
    assert main([*argv, "--image-size", *map(str, BAKED_SIZE)]) == 0
    return path, json.loads(report.read_text())


@pytest.fixture(scope="module")
def static_int8(model, photo_paths, tmp_path_factory):
    """A fixed-batch (1) graph with static int8 quantisation from the test photos: calibration must feed
    it one image at a time, and every tool must keep to batch 1."""
    path = tmp_path_factory.mktemp("static") / "tiny-sb-int8.onnx"
    export_onnx(
        model, path, dynamic_batch=False, int8=True, calibration_images=photo_paths[0].parent,
        validation_batch_sizes=(1,),
    )  # fmt: skip
    return path


@pytest.fixture(scope="module")
def photos(photo_paths):
    return [malformed.photo_rgb(p) for p in photo_paths]


def torch_forward(model, pixels, pooling=None):
    with torch.inference_mode():
        return model(torch.as_tensor(pixels), pooling=pooling).numpy()


def cosine(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


# --------------------------------------------------------------------------------- plain fp32 export
def test_ort_equals_torch_at_every_batch_size_and_a_second_image_size(model, plain):
    path, report = plain
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    shapes = [(batch, 28, 28) for batch in (1, 3, 17, 64)] + [(3, 20, 36)]  # 20x36: non-square 5x9 grid
    for batch, height, width in shapes:
        pixels = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(batch))
        embedding, grid = session.run(["embedding", "patch_tokens"], {"pixel_values": pixels.numpy()})
        np.testing.assert_allclose(embedding, torch_forward(model, pixels), atol=1e-4, rtol=0)
        with torch.inference_mode():
            expected_grid = model.patch_tokens(pixels).numpy()
        assert grid.shape == (batch, height // 4, width // 4, 32)
        np.testing.assert_allclose(grid, expected_grid, atol=1e-4, rtol=0)
    # the report returned by export_onnx covers the same ground
    assert report.passed and report.path == str(path) and report.provider == "CPUExecutionProvider"
    assert {row.batch_size for row in report.rows} == {1, 3, 17, 64}
    assert {row.output for row in report.rows} == {"embedding", "patch_tokens"}
    assert {row.image_size for row in report.rows} == {(28, 28), (36, 32)}
    assert 0 < report.max_abs_error <= 1e-4 and report.min_cosine > 0.99999


def test_batch_and_image_axes_are_symbolic(plain):
    session = ort.InferenceSession(str(plain[0]), providers=["CPUExecutionProvider"])
    (pixel_values,) = session.get_inputs()
    assert pixel_values.name == "pixel_values" and pixel_values.type == "tensor(float)"
    batch, channels, height, width = pixel_values.shape
    assert channels == 3 and all(isinstance(dim, str) for dim in (batch, height, width))


def test_metadata_round_trip(model, plain):
    meta = read_onnx_metadata(plain[0])
    assert ModelConfig.from_dict(meta.model_config) == model.config
    assert meta.model_name == "tiny-test" and meta.pooling == "cls" and meta.embedding_dim == 32
    assert meta.data_config == model.data_config
    assert meta.outputs == ("embedding", "patch_tokens") and meta.precision == "fp32"
    assert meta.input_name == "pixel_values" and meta.image_size == (28, 28)
    assert meta.dynamic_batch and meta.dynamic_image_size and not meta.has_preprocessing
    proto = onnx.load(str(plain[0]))
    onnx.checker.check_model(proto, full_check=True)  # a valid ONNX file, not just one ORT accepts
    raw = {p.key: p.value for p in proto.metadata_props}  # plain ONNX metadata_props
    assert raw["visreg_hub.model_name"] == "tiny-test" and raw["visreg_hub.pooling"] == "cls"
    assert json.loads(raw["visreg_hub.data_config"])["mean"] == list(model.config.mean)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("image_size", "[100000, 100000]", r"image_size \(100000, 100000\), .* at most 8192 per side"),
        ("image_size", "[28]", "out of range"),
        ("embedding_dim", "1000000000000", r"embedding_dim 1000000000000, at most"),
        ("embedding_dim", '"32"', "out of range"),
        ("data_config", "[" * 100_000 + "]" * 100_000, "malformed visreg_hub metadata"),
        # probe: the preprocessing of a plain graph is sized from data_config (4.6 GB RSS for 2 photos)
        ("data_config", '{"input_size": [3, 4096, 4096], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}',
         r"data_config\.input_size \(3, 4096, 4096\) for a graph that takes \(28, 28\) images"),
        ("data_config", '{"input_size": [7, 28, 28], "mean": [0.5], "std": [0.5]}', "1 or 3 channels"),
        ("pooling", "evil", r"pooling='evil', not one of \('cls'"),
        ("precision", "fp64", r"precision='fp64', not one of"),
        ("input_layout", "XYZW", r"input_layout='XYZW', not one of"),
    ],
)  # fmt: skip
def test_metadata_a_buffer_is_sized_from_is_bounded(plain, tmp_path, key, value, message):
    """Probe 9: image_size 100000x100000 in a hostile file made every input a 30 GB resize; a deeply
    nested field raised a bare RecursionError."""
    proto = onnx.load(str(plain[0]))
    for prop in proto.metadata_props:
        if prop.key == f"visreg_hub.{key}":
            prop.value = value
    path = tmp_path / "edited.onnx"
    onnx.save(proto, str(path))
    with pytest.raises(CheckpointError, match=message):
        read_onnx_metadata(path)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("embedding_dim", "128", "the graph's embedding has 32 values, the metadata says 128"),
        ("data_config", None, "takes 3 channel\\(s\\), the metadata says 1"),
        ("input_name", "images", "the metadata names 'images'"),
        ("preprocessing", "resize 28x28", "is tensor\\(float\\), the metadata implies tensor\\(uint8\\)"),
    ],
)
def test_metadata_that_does_not_describe_its_graph_is_refused_on_open(plain, tmp_path, key, value, message):
    """Probe 19: a file whose metadata disagrees with its graph opened, reported the metadata's
    embedding_dim (vectors of another size came out) or failed on first use inside ONNX Runtime."""
    proto = onnx.load(str(plain[0]))
    for prop in proto.metadata_props:
        if prop.key == f"visreg_hub.{key}":
            if value is None:  # one channel where the graph takes three
                config = json.loads(prop.value)
                config["input_size"] = [1, *config["input_size"][1:]]
                config["mean"], config["std"] = config["mean"][:1], config["std"][:1]
                prop.value = json.dumps(config)
            else:
                prop.value = value
    path = tmp_path / "edited.onnx"
    onnx.save(proto, str(path))
    with pytest.raises(
        CheckpointError, match=f"edited.onnx.*does not describe its graph.*{message}.*re-export"
    ):
        OnnxEmbedder(path)


def test_validating_against_another_model_names_the_mismatch(plain):
    """Probe 19: validating a graph against a model it was not exported from printed ONNX Runtime's shape
    errors instead of saying so."""
    with pytest.raises(
        UserInputError, match=r"exported from 'tiny-test', not from this model \(embed_dim 32"
    ):
        validate_onnx(tiny_encoder(seed=0, embed_dim=48, num_heads=2), plain[0], batch_sizes=(1,))


def test_validation_fails_clearly_on_other_weights(plain):
    with pytest.raises(OnnxValidationError, match=r"max abs error .* > [0-9.e-]+ at batch") as info:
        validate_onnx(tiny_encoder(seed=1), plain[0], batch_sizes=(1, 3))
    assert not info.value.report.passed and info.value.report.max_abs_error > 1e-2
    assert "report it" in str(info.value)  # fp32 numbers: no export option to suggest


def test_the_fp32_bound_scales_with_the_outputs_so_large_embeddings_pass(tmp_path):
    """Probe 19: with embeddings of norm ~5,000 float32 rounding alone exceeds an absolute 1e-4, so a correct
    export failed its check (and encode() under backend="auto" raised). The bound of each row is 1e-4 x
    max(1, max |PyTorch value|), recomputed here from the model itself."""
    model = tiny_encoder(seed=0)
    with torch.no_grad():
        model.backbone.norm.weight.mul_(3000.0)
    report = export_onnx(model, tmp_path / "big.onnx", validation_batch_sizes=(1, 3))
    assert report.passed
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(1, model.config.in_chans, model.config.img_size, model.config.img_size,
                         generator=generator)  # fmt: skip
    with torch.no_grad():
        scale = float(model(pixels).abs().max())
    assert scale > 100  # the regime the absolute bound failed in
    row = report.rows[0]
    assert row.batch_size == 1 and row.allowed_abs_error == pytest.approx(1e-4 * scale, rel=1e-6)


def test_validation_catches_a_baked_batch_size(model, plain, tmp_path):
    proto = onnx.load(str(plain[0]))
    dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    dim.ClearField("dim_param")
    dim.dim_value = 1  # what a batch traced into the graph looks like
    path = tmp_path / "static.onnx"
    onnx.save(proto, str(path))
    report = validate_onnx(model, path, batch_sizes=(1, 3), raise_on_failure=False)
    assert not report.passed
    failed = [row for row in report.rows if not row.passed]
    assert failed and all(row.batch_size == 3 and row.error for row in failed)
    with pytest.raises(OnnxValidationError, match="ONNX Runtime failed at batch 3"):
        validate_onnx(model, path, batch_sizes=(1, 3))


# ------------------------------------------------------------------------------- OnnxEmbedder.encode
def test_embedder_encode_equals_model_encode_on_photos(model, plain, photo_paths):
    embedder = OnnxEmbedder(plain[0])
    assert embedder.active_provider == "CPUExecutionProvider" and not embedder.fell_back
    assert not embedder.uses_io_binding  # CPU: plain session.run
    ours = embedder.encode(photo_paths, batch_size=3)  # uneven batches: 3 + 1
    expected = model.encode(photo_paths)
    assert ours.shape == (4, 32) and ours.dtype == torch.float32
    assert cosine(ours, expected).min() > 0.9999
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    raw = embedder.encode(photo_paths, normalize=False, convert_to_numpy=True)
    assert isinstance(raw, np.ndarray)
    np.testing.assert_allclose(raw, model.encode(photo_paths, normalize=False).numpy(), atol=1e-4, rtol=0)


def test_embedder_on_error_and_argument_checks(model, plain, photo_paths):
    embedder = OnnxEmbedder(plain[0])
    items = [photo_paths[0], b"not an image", photo_paths[1]]
    result = embedder.encode(items, on_error="skip")
    assert [f.index for f in result.failures] == [1]
    torch.testing.assert_close(
        result.embeddings, model.encode([photo_paths[0], photo_paths[1]]), atol=1e-5, rtol=0
    )
    with pytest.raises(ImageDecodeError, match="input index 1"):
        embedder.encode(items)
    assert embedder.encode([]).shape == (0, 32)
    with pytest.raises(ValueError, match=r"exported with pooling='cls'.*pooling='mean_patch'"):
        embedder.encode(photo_paths, pooling="mean_patch")
    with pytest.raises(ValueError, match="fp32 graph; export with fp16=True"):
        embedder.encode(photo_paths, dtype="fp16")
    with pytest.raises(ValueError, match="runs on CPUExecutionProvider"):
        embedder.encode(photo_paths, device="cuda")
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        embedder.encode(photo_paths, batch_size=0)


@pytest.mark.skipif(
    "CUDAExecutionProvider" in ort.get_available_providers(), reason="this onnxruntime build has CUDA"
)
def test_cuda_requested_but_unavailable_warns_and_reports_cpu(plain, caplog):
    with caplog.at_level(logging.WARNING, logger="visreg_hub.inference.onnx.runtime"):
        embedder = OnnxEmbedder(plain[0], providers="cuda")
    assert embedder.requested_providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert embedder.active_provider == "CPUExecutionProvider" and embedder.fell_back
    messages = " ".join(record.getMessage() for record in caplog.records)
    assert "CUDAExecutionProvider" in messages and "not on the requested CUDAExecutionProvider" in messages
    with pytest.raises(RuntimeError, match="not on the requested CUDAExecutionProvider"):
        OnnxEmbedder(plain[0], providers=["cuda"], allow_fallback=False)
    with pytest.raises(ValueError, match="unknown ONNX Runtime provider 'cdua'"):
        OnnxEmbedder(plain[0], providers="cdua")


# ------------------------------------------------------------------------------ baked preprocessing
def test_baked_graph_on_uint8_photos_matches_the_pil_path(model, baked, photos, photo_paths):
    path, report = baked
    assert report["passed"] and report["preprocessing"]["max_pixel_error"] <= 2
    meta = read_onnx_metadata(path)
    assert meta.input_name == "images" and meta.input_layout == "NHWC" and meta.image_size == BAKED_SIZE
    assert "bicubic" in meta.preprocessing and "x / 255" in meta.preprocessing
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(uint8)"
    # a client's images at the fixed size, fed as uint8 (N, H, W, 3)
    fixed = [image.resize(BAKED_SIZE[::-1], Image.BICUBIC) for image in photos]
    (ours,) = session.run(["embedding"], {"images": np.stack([np.asarray(image) for image in fixed])})
    transform = timm.data.create_transform(**model.data_config)  # the PIL/timm reference path
    expected = torch_forward(model, torch.stack([transform(image) for image in fixed]))
    assert cosine(ours, expected).min() > 0.9999
    np.testing.assert_allclose(ours, expected, atol=2e-3, rtol=0)  # measured 4e-5 on these photos
    # files through the embedder: cut to the graph's aspect, resized to the fixed size with PIL, then the
    # graph's resize + centre crop; the same part of each photo as model.encode(), not a squashed photo
    via_files = OnnxEmbedder(path).encode(photo_paths, normalize=False).numpy()
    direct = model.encode(photo_paths, normalize=False, backend="torch").numpy()
    squashed = [Image.open(p).convert("RGB").resize(BAKED_SIZE[::-1], Image.BICUBIC) for p in photo_paths]
    (old_way,) = session.run(["embedding"], {"images": np.stack([np.asarray(image) for image in squashed])})
    # two resamplings (to the fixed size, then the graph's) cost a little on this 28 px random model: 0.9966
    # and up, where squashing the 3:2 photos gave 0.989
    assert cosine(via_files, direct).min() > max(0.995, cosine(old_way, direct).min())


CASES = [  # interpolation, crop_pct, crop_mode, model size, layout, uint8 input size (H, W)
    ("bicubic", 0.875, "center", 32, "NHWC", (48, 40)),
    ("bicubic", 0.875, "center", 32, "NCHW", (100, 160)),
    ("bicubic", 1.0, "center", 32, "NHWC", (32, 32)),  # identity resize: only normalisation
    ("bilinear", 0.9, "center", 32, "NCHW", (37, 61)),
    ("bilinear", 0.875, "squash", 32, "NHWC", (120, 80)),
    ("bicubic", 0.875, "center", 224, "NHWC", (160, 120)),  # upsampling, the ImageNet setting
]


@pytest.mark.parametrize(("interpolation", "crop_pct", "crop_mode", "size", "layout", "image_size"), CASES)
def test_baked_preprocessing_pixels_match_timm(
    photos, interpolation, crop_pct, crop_mode, size, layout, image_size
):
    data_config = dict(
        input_size=(3, size, size), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        crop_pct=crop_pct, crop_mode=crop_mode, interpolation=interpolation,
    )  # fmt: skip
    spec = PreprocessingSpec.from_data_config(data_config, image_size, layout)
    session = ort.InferenceSession(
        preprocessing_model(spec).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    images = np.stack([np.asarray(p.resize(image_size[::-1], Image.BICUBIC)) for p in photos])
    feed = images if layout == "NHWC" else images.transpose(0, 3, 1, 2).copy()
    (ours,) = session.run(None, {"images": feed})
    transform = timm.data.create_transform(**data_config)
    expected = torch.stack([transform(Image.fromarray(image)) for image in images]).numpy()
    assert ours.shape == expected.shape == (len(photos), 3, size, size)
    levels = np.abs(ours - expected) * np.asarray(data_config["std"]).reshape(1, 3, 1, 1) * 255
    assert levels.max() <= 2.01  # 8-bit levels: ties rounded differently, never a shifted crop
    assert (levels > 0.5).mean() < 0.02


def test_preprocessing_rejects_what_the_graph_cannot_reproduce():
    config = dict(
        input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=0.875, interpolation="bicubic"
    )
    with pytest.raises(ValueError, match="crop_mode='border' is not supported"):
        PreprocessingSpec.from_data_config({**config, "crop_mode": "border"}, (40, 40), "NHWC")
    with pytest.raises(ValueError, match="image_layout must be one of"):
        PreprocessingSpec.from_data_config(config, (40, 40), "HWC")
    with pytest.raises(ValueError, match="not 'nearest'"):
        PreprocessingSpec.from_data_config({**config, "interpolation": "nearest"}, (40, 40), "NHWC")
    with pytest.raises(ValueError, match="has 2 channels"):
        PreprocessingSpec.from_data_config(
            {**config, "input_size": (2, 32, 32), "mean": (0.5,) * 2, "std": (0.5,) * 2}, (40, 40), "NHWC"
        )


def test_baked_preprocessing_of_a_grayscale_model_matches_pil_luma(photos):
    """1-channel models take RGB uint8 and convert it like PIL's convert("L"), bit for bit."""
    data_config = dict(
        input_size=(1, 28, 28), mean=(0.286,), std=(0.353,), crop_pct=0.875, crop_mode="center",
        interpolation="bicubic",
    )  # fmt: skip
    spec = PreprocessingSpec.from_data_config(data_config, (48, 40), "NHWC")
    session = ort.InferenceSession(
        preprocessing_model(spec).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    images = np.stack([np.asarray(p.resize((40, 48), Image.BICUBIC)) for p in photos])  # real colour photos
    (ours,) = session.run(None, {"images": images})
    transform = timm.data.create_transform(**data_config)
    expected = torch.stack([transform(Image.fromarray(image).convert("L")) for image in images]).numpy()
    assert ours.shape == expected.shape == (len(photos), 1, 28, 28)
    levels = np.abs(ours - expected) * 0.353 * 255
    assert levels.max() <= 2.01 and (levels > 0.5).mean() < 0.02  # same tolerance as the RGB cases
    # the luma step alone is exact: a graph with no resize (crop_pct 1, same size) equals PIL exactly
    exact = PreprocessingSpec.from_data_config({**data_config, "crop_pct": 1.0}, (28, 28), "NHWC")
    session = ort.InferenceSession(
        preprocessing_model(exact).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    small = np.stack([np.asarray(p.resize((28, 28), Image.BICUBIC)) for p in photos])
    (pixels,) = session.run(None, {"images": small})
    luma = np.stack([np.asarray(Image.fromarray(image).convert("L")) for image in small])
    np.testing.assert_array_equal(np.rint(pixels[:, 0] * 0.353 * 255 + 0.286 * 255), luma)


# ----------------------------------------------------------------------- fp16 + fusions, backend="onnx"
def test_encode_backend_onnx_fp16_fused(model, photo_paths):
    ours = encode_onnx(model, photo_paths, dtype="fp16", optimize=True)
    assert cosine(ours, model.encode(photo_paths)).min() >= 0.999
    (_fingerprint, embedder), *_ = LIVE_BACKENDS[model].values()
    assert encode_onnx(model, photo_paths[:1], dtype="fp16", optimize=True).shape == (1, 32)
    cached = LIVE_BACKENDS[model][("cls", "fp16", True, None, 0)][1]
    assert cached is embedder  # cached, not re-exported
    meta = embedder.metadata
    assert meta.precision == "fp16" and meta.fusions.get("sdpa_via_mha") == 2  # one attention per block
    proto = onnx.load(str(embedder.path))
    onnx.checker.check_model(proto, full_check=True)  # nodes in topological order after the conversion
    graph = proto.graph
    ops = {node.op_type for node in graph.node}
    assert {"MultiHeadAttention", "SkipLayerNormalization"} <= ops  # ONNX Runtime contrib ops
    big = [t for t in graph.initializer if np.prod(t.dims) >= 32 * 32]
    assert big and all(t.data_type == onnx.TensorProto.FLOAT16 for t in big)  # weights stored in fp16
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # float32 in and out
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    before = weights_fingerprint(model)
    with torch.no_grad():
        model.backbone.cls_token.add_(0.0)  # an in-place update must invalidate the cached export
    assert weights_fingerprint(model) != before
    with pytest.raises(ValueError, match="bfloat16 is not supported by the ONNX backend"):
        encode_onnx(model, photo_paths, dtype="bf16")


def test_weights_fingerprint_covers_every_tensor_and_sees_each_kind_of_change():
    model = tiny_encoder(seed=5)
    model.register_buffer("scale", torch.ones(3))
    before = weights_fingerprint(model)
    assert weights_fingerprint(model) == before  # nothing changed: the cached export is reused
    state = {(t.data_ptr(), t._version) for t in model.state_dict().values()}
    assert state <= set(before)  # every tensor of the state dict takes part
    with torch.no_grad():
        model.scale.mul_(2.0)  # in-place buffer update
    after_buffer = weights_fingerprint(model)
    assert after_buffer != before
    block = model.backbone.blocks[0].attn.qkv
    block.weight = torch.nn.Parameter(block.weight.detach().clone())  # a new tensor in the same place
    assert weights_fingerprint(model) != after_buffer
    replaced = weights_fingerprint(model)
    model.load_state_dict(tiny_encoder(seed=6).state_dict(), strict=False)  # copies in place
    assert weights_fingerprint(model) != replaced


def test_weights_changed_through_param_data_are_not_served_stale(photo_paths, tmp_path, monkeypatch):
    """An EMA written as ``p.data.mul_().add_()`` changes no version counter the parameter sees; the ONNX
    backend must still export again, so its embeddings equal the torch path's on the new weights."""
    monkeypatch.setenv("VISREG_HUB_CACHE", str(tmp_path / "cache"))
    model = tiny_encoder(seed=5, img_size=32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2))
    first = model.encode(photo_paths, backend="onnx")
    target = tiny_encoder(seed=6, img_size=32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2))
    for mine, theirs in zip(model.parameters(), target.parameters(), strict=True):
        mine.data.mul_(0.5).add_(0.5 * theirs.data)  # one EMA step, through .data
    assert weights_fingerprint(model) == weights_fingerprint(model)  # the version counters did not move
    after = model.encode(photo_paths, backend="onnx")
    expected = model.encode(photo_paths, backend="torch")
    cosine = torch.nn.functional.cosine_similarity(after, expected, dim=1)
    assert cosine.min().item() > 0.9999
    assert torch.nn.functional.cosine_similarity(first, expected, dim=1).min().item() < 0.999
    nan_model = tiny_encoder(seed=7, img_size=32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2))
    with torch.no_grad():
        nan_model.backbone.pos_embed.data[0, -1, 0] = float("nan")  # NaN weights compare equal to themselves
    from visreg_hub.inference.onnx.backend import WeightsWatch

    assert WeightsWatch(nan_model).unchanged(nan_model)


# ------------------------------------------------------------------------------------- bad inputs
def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"ONNX model not found: .*missing.onnx"):
        OnnxEmbedder(tmp_path / "missing.onnx")
    with pytest.raises(FileNotFoundError, match="it is a folder"):
        OnnxEmbedder(tmp_path)
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a protobuf\n" * 10)
    with pytest.raises(CheckpointError, match=r"not a readable ONNX model|not an ONNX model"):
        OnnxEmbedder(text)
    from onnx import TensorProto, helper

    value = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [value], [value])
    graph.output[0].name = "y"
    foreign = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(graph), str(foreign))
    with pytest.raises(CheckpointError, match="no visreg_hub metadata"):
        OnnxEmbedder(foreign)


def test_from_pretrained_on_an_onnx_file_names_the_onnx_embedder(tmp_path):
    import visreg_hub
    from visreg_hub.errors import ModelNotFoundError

    graph = tmp_path / "mini-int8.onnx"
    graph.write_bytes(b"graph")
    with pytest.raises(ModelNotFoundError, match=r"is a file; .*OnnxEmbedder\(path\)"):
        visreg_hub.from_pretrained(str(graph))


def test_bad_calibration_images_and_providers_are_refused_before_the_export(
    model, photo_paths, tmp_path, monkeypatch, caplog
):
    """A missing path is "not found" (not "could not be decoded"), even beside good ones; an empty folder
    and a misspelt provider are refused too, all before a graph is traced; an undecodable file among good
    ones is skipped with a warning that names it."""
    from visreg_hub.inference.onnx import export as export_module
    from visreg_hub.inference.onnx.quantize import calibration_inputs

    def no_export(*args, **kwargs):
        raise AssertionError("the export started")

    monkeypatch.setattr(export_module, "export_core", no_export)
    missing, empty = tmp_path / "nope.jpg", tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "m.onnx"
    for images, words in (
        (missing, r"calibration_images not found: .*nope\.jpg; pass existing image files or folders"),
        ([*photo_paths, missing], r"not found: .*nope\.jpg"),
        (empty, r"calibration_images .*empty: directory contains no image files"),
    ):
        with pytest.raises(ValueError, match=words):
            export_onnx(model, out, int8=True, calibration_images=images)
    with pytest.raises(ValueError, match="unknown ONNX Runtime provider 'bogus'"):
        export_onnx(model, out, validation_providers="bogus")
    assert not out.exists()
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    with caplog.at_level(logging.WARNING, logger="visreg_hub.inference.onnx.quantize"):
        inputs = calibration_inputs(model.data_config, [*photo_paths, broken])
    assert len(inputs) == len(photo_paths)
    assert "calibrating on 4 of 5 images: 1 could not be decoded" in caplog.text
    assert "broken.jpg" in caplog.text
    assert "static int8 calibrated on only 4 image(s)" in caplog.text  # too few to trust its ranges
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="visreg_hub.inference.onnx.quantize"):
        calibration_inputs(model.data_config, photo_paths * 16)  # 64: enough, no warning
    assert "calibrated on only" not in caplog.text


def test_an_output_folder_is_refused_before_any_export(model, tmp_path, capsys):
    from visreg_hub.cli import main

    folder = tmp_path / "dir.onnx"
    folder.mkdir()
    plain_folder = tmp_path / "exports"  # the usual mistake: an output folder, as other exporters take
    plain_folder.mkdir()
    with pytest.raises(ValueError, match=r"dir\.onnx is a folder; name a \.onnx file inside it"):
        export_onnx(model, folder)
    inside = r"exports is a folder; name a \.onnx file inside it, e\.g\. .*model\.onnx"
    with pytest.raises(ValueError, match=inside):
        export_onnx(model, plain_folder)
    model.save_pretrained(tmp_path / "tiny")
    for target in (folder, plain_folder):
        for extra in ([], ["--overwrite"]):
            assert main(["export", "onnx", str(tmp_path / "tiny"), str(target), *extra]) == 1
            err = capsys.readouterr().err
            assert "is a folder; name a .onnx file inside it" in err and "pass --overwrite" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.onnx", "exports", "tiny"]
    assert not any(plain_folder.iterdir()) and not any(folder.iterdir())


def test_cli_refuses_bad_provider_and_calibration_images_before_loading_the_model(
    model, photo_paths, tmp_path, monkeypatch, capsys
):
    import visreg_hub.hub
    from visreg_hub.cli import main

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(visreg_hub.hub, "from_pretrained", no_load)
    (tmp_path / "empty").mkdir()
    base = ["export", "onnx", "some-model", str(tmp_path / "m.onnx")]
    cases = (
        (["--provider", "bogus"], "--provider: unknown ONNX Runtime provider 'bogus'"),
        (["--int8", "--calibration-images", str(tmp_path / "nope")], "--calibration-images not found"),
        (["--int8", "--calibration-images", str(photo_paths[0]), str(tmp_path / "nope")], "not found"),
        (["--int8", "--calibration-images", str(tmp_path / "empty")], "contains no image files"),
        (["--calibration-images", str(photo_paths[0])], "--calibration-images only applies with --int8"),
    )
    for flags, words in cases:
        assert main([*base, *flags]) == 1
        err = capsys.readouterr().err
        assert words in err and "could not be decoded" not in err, (flags, err)


def test_export_argument_errors_before_exporting(model, tmp_path):
    with pytest.raises(ValueError, match=r"must end with .onnx"):
        export_onnx(model, tmp_path / "model.pt")
    with pytest.raises(ValueError, match=r"opset must be an integer in \[18"):
        export_onnx(model, tmp_path / "m.onnx", opset=13)
    with pytest.raises(ValueError, match="cls_last4"):
        export_onnx(model, tmp_path / "m.onnx", pooling="cls_last4")
    with pytest.raises(ValueError, match="image_size only applies with with_preprocessing"):
        export_onnx(model, tmp_path / "m.onnx", image_size=64)
    for size in (100_000, (64, 5000), 0):  # validation would build images of this size (OOM-killed)
        with pytest.raises(ValueError, match=r"image_size must be an int or \(H, W\) in 1\.\.4096"):
            export_onnx(model, tmp_path / "m.onnx", with_preprocessing=True, image_size=size)
    with pytest.raises(ValueError, match="dynamic_image_size=True needs a model built with"):
        export_onnx(tiny_encoder(dynamic_img_size=False), tmp_path / "m.onnx", dynamic_image_size=True)
    assert not list(tmp_path.iterdir())


def test_static_batch_int8_export_calibrates_with_batches_the_graph_takes(static_int8):
    meta = read_onnx_metadata(static_int8)
    assert meta.precision == "int8" and meta.quantization == "static, 4 calibration images"
    assert not meta.dynamic_batch
    (value,) = onnx.load(str(static_int8)).graph.input
    assert value.type.tensor_type.shape.dim[0].dim_value == 1


def test_validate_judges_int8_graphs_by_the_threshold_their_export_used(model, plain, static_int8, tmp_path,
                                                                       capsys):  # fmt: skip
    from export.validate import build_parser, main
    from visreg_hub.inference.onnx.export import INT8_MIN_COSINE

    assert validate_onnx(model, static_int8).min_cosine_required == INT8_MIN_COSINE
    assert validate_onnx(model, plain[0], batch_sizes=(1,)).min_cosine_required == 0.999
    assert validate_onnx(model, static_int8, min_cosine=0.5).min_cosine_required == 0.5
    model.save_pretrained(tmp_path / "tiny")
    assert main([str(tmp_path / "tiny"), str(static_int8)]) == 0
    out = capsys.readouterr().out
    assert f"cosine >= {INT8_MIN_COSINE}" in out and "validation passed" in out
    help_text = build_parser().format_help()
    assert "fp16 and int8" in help_text and "fp16 min cosine" not in help_text


def test_benchmark_skips_batch_sizes_a_static_batch_graph_cannot_take(static_int8, capsys):
    from export.benchmark import main

    argv = [str(static_int8), "--batch-sizes", "1,8,32", "--warmup", "0", "--repeats", "1", "--threads", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "fixed batch of 1 (--static-batch); skipping batch sizes 8,32" in out
    assert "| 1 |" in out and "| 8 |" not in out


def test_validate_cli(model, plain, tmp_path, capsys):
    from export.validate import main

    model.save_pretrained(tmp_path / "tiny")
    assert main([str(tmp_path / "tiny"), str(plain[0]), "--batch-sizes", "1,3"]) == 0
    out = capsys.readouterr().out
    assert "| 3 | 28x28 | patch_tokens |" in out and "validation passed" in out
    tiny_encoder(seed=2).save_pretrained(tmp_path / "other")
    assert main([str(tmp_path / "other"), str(plain[0]), "--batch-sizes", "1"]) == 1


# ------------------------------------------------------------------------------ GPU (not run by default)
@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or "CUDAExecutionProvider" not in ort.get_available_providers(),
    reason="needs a CUDA GPU, a CUDA build of torch and onnxruntime-gpu",
)
def test_cuda_provider_with_io_binding(model, plain, photo_paths):
    embedder = OnnxEmbedder(plain[0], providers="cuda", allow_fallback=False)
    assert embedder.active_provider == "CUDAExecutionProvider" and embedder.uses_io_binding
    ours = embedder.encode(photo_paths, batch_size=3, device="cuda")
    assert cosine(ours, model.encode(photo_paths)).min() > 0.9999
    fp16 = OnnxEmbedder.from_model(model, providers="cuda", fp16=True, optimize=True)  # validated on CUDA
    assert fp16.active_provider == "CUDAExecutionProvider"
    assert cosine(fp16.encode(photo_paths), model.encode(photo_paths)).min() >= 0.999


def test_model_encode_backend_switch(model, photo_paths):
    """``model.encode(..., backend="onnx")`` is the ONNX path with the torch path's contract."""
    torch_embeddings = model.encode(photo_paths)
    with pytest.warns(DeprecationWarning, match="from_pretrained"):
        onnx_embeddings = model.encode(photo_paths, backend="onnx")
    assert onnx_embeddings.shape == torch_embeddings.shape
    assert cosine(onnx_embeddings, torch_embeddings).min() > 0.9999
    with pytest.warns(DeprecationWarning):
        skipped = model.encode([photo_paths[0], b"not an image"], backend="onnx", on_error="skip")
    assert [failure.index for failure in skipped.failures] == [1]
    assert cosine(skipped.embeddings, torch_embeddings[:1]).min() > 0.9999
    wrong = pytest.raises(ValueError, match="backend must be 'torch' or 'onnx'")
    with wrong, pytest.warns(DeprecationWarning):
        model.encode(photo_paths, backend="tensorrt")


_PINNED_CHILD = r"""
import json, os, sys
cpu = int(sys.argv[2])
os.sched_setaffinity(0, {cpu})  # as `taskset -c CPU` would, before ONNX Runtime starts any thread
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from visreg_hub.inference.onnx.runtime import create_session

weight = numpy_helper.from_array(np.eye(512, dtype=np.float32), "w")
x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 512])
y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 512])
graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [weight])
onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), sys.argv[1])
session = create_session(sys.argv[1], providers="cpu").session
for _ in range(20):
    session.run(None, {"x": np.ones((64, 512), np.float32)})
masks = {open(f"/proc/self/task/{t}/status").read().split("Cpus_allowed_list:")[1].split()[0]
         for t in os.listdir("/proc/self/task")}
print(json.dumps(sorted(masks)))
"""


@pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity")
    or len(os.sched_getaffinity(0)) < 2
    or not Path("/proc/self/task").is_dir(),
    reason="needs Linux and at least two usable CPUs",
)
def test_session_threads_stay_on_the_cpus_the_process_may_use(tmp_path):
    """Under a CPU mask (taskset), no ONNX Runtime thread may be pinned outside it: ORT's default pins
    one thread per physical core of the machine, so without the explicit thread count a second thread
    lands on another core (observed: `taskset -c 0` + a session -> a thread on core 1)."""
    cpu = min(os.sched_getaffinity(0))
    script = tmp_path / "child.py"
    script.write_text(_PINNED_CHILD)
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "m.onnx"), str(cpu)],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [str(cpu)]


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_a_failed_export_leaves_the_existing_file_and_nothing_else(model, plain, tmp_path, monkeypatch):
    """The graph is written and checked beside the output and renamed over it only when every step passed:
    a crash in the check, in int8 quantisation, or a failed check leave a good file there untouched."""
    from visreg_hub.inference.onnx import export as export_module

    good, _ = plain
    out = tmp_path / "model.onnx"
    out.write_bytes(good.read_bytes())
    before = _tree(tmp_path)

    def crash(*args, **kwargs):
        raise MemoryError("out of memory in the check")

    with monkeypatch.context() as patch:
        patch.setattr(export_module, "validate_onnx", crash)
        with pytest.raises(MemoryError):
            export_onnx(model, out, validation_batch_sizes=(1,))
    assert _tree(tmp_path) == before and [p.name for p in tmp_path.iterdir()] == ["model.onnx"]

    with monkeypatch.context() as patch:
        patch.setattr(export_module, "quantize_int8", crash)
        with pytest.raises(MemoryError):
            export_onnx(model, out, int8=True, validation_batch_sizes=(1,))
    assert _tree(tmp_path) == before and [p.name for p in tmp_path.iterdir()] == ["model.onnx"]

    def fail_the_check(model, path, **kwargs):  # the real check, then declared failed
        report = validate_onnx(model, path, **kwargs)
        raise OnnxValidationError("ONNX Runtime disagrees with PyTorch", report)

    with monkeypatch.context() as patch:
        patch.setattr(export_module, "validate_onnx", fail_the_check)
        with pytest.raises(
            OnnxValidationError, match=r"kept as .*model\.failed\.onnx; .*model\.onnx was not written"
        ) as info:
            export_onnx(model, out, validation_batch_sizes=(1,), patch_tokens=False)
    failed = tmp_path / "model.failed.onnx"
    assert info.value.report.path == str(failed)
    assert (tmp_path / "model.onnx").read_bytes() == before["model.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.failed.onnx", "model.onnx"]
    assert read_onnx_metadata(failed).outputs == ("embedding",)  # the failed graph, kept for inspection

    report = export_onnx(model, out, validation_batch_sizes=(1,))  # a passing export replaces the file
    assert report.path == str(out) and read_onnx_metadata(out).outputs == ("embedding",)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_opsets_the_exporter_cannot_write_are_refused_up_front(model, tmp_path):
    # 26-28 are known to onnx but onnxscript's converter leaves an invalid graph (opset-18 header)
    with pytest.raises(ValueError, match=r"opset must be an integer in \[18, 25\], got 26"):
        export_onnx(model, tmp_path / "m.onnx", opset=26)
    assert list(tmp_path.iterdir()) == []


def test_cli_export_guards_and_flag_names(model, tmp_path, capsys):
    """An existing output needs --overwrite; --report-json onto the output, or into a missing folder, is
    refused before the model loads; library keyword names in messages come out as the CLI's flags."""
    from visreg_hub.cli import main

    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    out = tmp_path / "m.onnx"
    out.write_bytes(b"an earlier export")
    assert main(["export", "onnx", str(folder), str(out)]) == 1
    assert f"{out} already exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"an earlier export"
    for report, words in ((out, "is the output file"), (tmp_path / "no" / "r.json", "does not exist"),
                          (tmp_path, "is a folder")):  # fmt: skip
        assert (
            main(["export", "onnx", str(folder), str(out), "--overwrite", "--report-json", str(report)]) == 1
        )
        assert words in capsys.readouterr().err
    assert out.read_bytes() == b"an earlier export"
    assert main(["export", "onnx", str(folder), str(out), "--overwrite", "--image-size", "64"]) == 1
    err = capsys.readouterr().err
    assert "--image-size only applies with --with-preprocessing" in err and "=True" not in err
    assert main(["export", "onnx", str(folder), str(out), "--overwrite", "--int8", "--fp16"]) == 1
    assert "--int8 quantises the plain fp32 graph; drop --fp16, --optimize" in capsys.readouterr().err
    assert main(["export", "onnx", str(folder), str(out), "--overwrite", "--pooling", "bogus"]) == 1
    err = capsys.readouterr().err
    assert "bogus" in err and "--patch-tokens()" not in err  # a method name is not a flag


def test_from_pretrained_refuses_onnx_arguments_it_cannot_honour(model, tmp_path):
    """A torch dtype with the ONNX backend or a misspelt provider fail at load, not at the first encode()
    after a whole export."""
    import visreg_hub

    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    with pytest.raises(ValueError, match="the ONNX graph's is precision="):
        visreg_hub.from_pretrained(str(folder), backend="onnx", dtype="bf16")
    with pytest.raises(ValueError, match="unknown ONNX Runtime provider 'bogus'"):
        visreg_hub.from_pretrained(str(folder), backend="onnx", provider="bogus")
    assert visreg_hub.from_pretrained(str(folder), backend="auto", dtype="bf16").dtype == torch.bfloat16


def test_validation_batch_sizes_are_bounded():
    import argparse

    from visreg_hub.cli_export import MAX_VALIDATION_BATCH, parse_batch_sizes

    assert parse_batch_sizes(f"1,3,{MAX_VALIDATION_BATCH}") == (1, 3, MAX_VALIDATION_BATCH)
    for text in ("100000000", "1,0", "", "a"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_batch_sizes(text)


@pytest.mark.parametrize(
    "crop_pct,size", [(1.0, (28, 28)), (0.875, (28, 28)), (1.0, (40, 28)), (0.9, (48, 40))]
)
def test_preprocessing_graph_has_no_unused_initialisers(crop_pct, size):
    """ONNX Runtime warns at every load about initialisers no node reads (the rounding constants of a
    graph with no resize pass were one), so each one must feed a node."""
    data_config = {"input_size": (1, 28, 28), "interpolation": "bicubic", "crop_pct": crop_pct,
                   "crop_mode": "center", "mean": (0.286,), "std": (0.353,)}  # fmt: skip
    proto = preprocessing_model(PreprocessingSpec.from_data_config(data_config, size, "NHWC"))
    read = {name for node in proto.graph.node for name in node.input}
    assert {init.name for init in proto.graph.initializer} <= read


def test_int8_export_keeps_onnx_runtime_advice_out_of_the_root_logger(model, tmp_path, caplog):
    """ORT's quantiser logs INFO lines ("Ignore MatMul due to non constant B", ...) on the root logger,
    about 24 per export of a 4-block ViT; with logging at INFO they reached the user's log."""
    with caplog.at_level(logging.INFO):
        export_onnx(model, tmp_path / "m.onnx", int8=True, validation_batch_sizes=(1,))
        assert not [r for r in caplog.records if "pre-processing before quantization" in r.getMessage()]
        assert not [r for r in caplog.records if r.name == "root" or r.name.startswith("onnxruntime")]
        logging.info("a user's own INFO line, after the export")  # only the quantiser was silenced
        assert caplog.records[-1].getMessage() == "a user's own INFO line, after the export"
    assert not logging.getLogger().filters  # the filter is gone afterwards
    assert logging.getLogger("onnxruntime.quantization").level == logging.NOTSET


def test_benchmark_names_a_bad_file_in_one_line(tmp_path, capsys):
    """Probe: `python -m export.benchmark` on a text file or a missing path printed a traceback, where
    export.validate prints one line."""
    from export.benchmark import main

    text = tmp_path / "text.onnx"
    text.write_text("not a graph")
    for path, named in ((text, "is not a readable ONNX model"), (tmp_path / "missing.onnx", "missing.onnx")):
        assert main([str(path)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("export.benchmark: error: ") and named in err and "Traceback" not in err


@pytest.mark.parametrize("size", [(256, 79), (79, 256), (101, 64)])
def test_the_box_a_preprocessing_graph_is_fed_from_is_centred_to_the_sub_pixel(size):
    """Probe: the centred box of a photo was cut to whole pixels before the resize, moving the content by up
    to half a pixel (on a 256x79 drawing: cosine 0.948 against encode()). A centred box commutes with a
    mirror: resizing the mirrored photo gives the mirrored result (exactly, as PIL resamples each side
    alike); the rounded box broke that by a mean of 45 levels on sharp content."""
    from PIL import ImageOps

    from visreg_hub.inference.onnx.embedder import _ResizeTo

    width, height = size
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))
    resize = _ResizeTo((64, 64), "bicubic")
    direct = resize(image).numpy().astype(np.int16)
    mirrored = resize(ImageOps.mirror(image)).numpy().astype(np.int16)[:, :, ::-1]
    flipped = resize(ImageOps.flip(image)).numpy().astype(np.int16)[:, ::-1, :]
    assert np.abs(direct - mirrored).max() <= 1 and np.abs(direct - flipped).max() <= 1
