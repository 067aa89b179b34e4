"""Building the ONNX graph of a VISReg encoder: export, fusions, fp16, baked preprocessing, saving.

Used by :func:`visreg_hub.inference.onnx.export_onnx`; every function here works on one graph and knows
nothing about ONNX Runtime sessions. Steps, in the order ``export_onnx`` applies them:

1. :func:`export_core`: ``torch.onnx.export(dynamo=True)`` of the encoder with input ``pixel_values``
   (B, C, H, W) float32 (normalised) and outputs ``embedding`` (B, E) [+ ``patch_tokens`` (B, h, w, D)].
2. :func:`fuse_for_ort` (optional): ONNX Runtime contrib-op fusions (MultiHeadAttention,
   SkipLayerNormalization, BiasGelu) by ``onnxscript.rewriter.ort_fusions``; the graph then runs on ONNX
   Runtime only.
3. :func:`convert_fp16` (optional): float16 weights and activations, float32 graph inputs and outputs.
4. :func:`attach_preprocessing` (optional): a uint8 image input and the resize / crop / normalise of
   :class:`PreprocessingSpec` in front of ``pixel_values``.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from visreg_hub.errors import UserInputError
from visreg_hub.models.config import POOLING_BLOCKS

logger = logging.getLogger(__name__)

CORE_INPUT = "pixel_values"
IMAGE_INPUT = "images"
EMBEDDING = "embedding"
PATCH_TOKENS = "patch_tokens"
LAYOUTS = ("NHWC", "NCHW")
# protobuf files cannot exceed 2 GiB: above this, weights go to a side file
_EXTERNAL_DATA_BYTES = 1_800_000_000
# PIL's nearest resize samples with fixed-point coordinates and picks the other neighbour at some exact
# ties (measured: 5 of 36 columns for 48 -> 36 px), which ONNX Resize cannot reproduce: not offered.
_ONNX_MODES = {"bicubic": "cubic", "bilinear": "linear"}


class ExportWrapper(nn.Module):
    """The encoder as a one-input graph: ``pixel_values`` -> ``embedding`` [, ``patch_tokens``].

    One backbone pass feeds both outputs. The pooling mirrors :meth:`VISRegEncoder.forward`; the
    validation after export compares against that method, so a divergence cannot go unnoticed.

    Args:
        encoder: a float32 :class:`~visreg_hub.models.VISRegEncoder` in eval mode.
        pooling: a vector feature tap (``cls``, ``cls_last2``, ``cls_last4``, ``mean_patch``).
        with_patch_tokens: also return the (B, h, w, D) patch-token grid of ``encoder.patch_tokens``.
    """

    def __init__(self, encoder: nn.Module, pooling: str, with_patch_tokens: bool) -> None:
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.with_patch_tokens = with_patch_tokens

    def forward(self, pixel_values: torch.Tensor):
        """(B, C, H, W) float -> (B, E) or ((B, E), (B, h, w, D))."""
        if not self.with_patch_tokens:
            return self.encoder(pixel_values, pooling=self.pooling)
        blocks = POOLING_BLOCKS.get(self.pooling)
        prefix = self.encoder.num_prefix_tokens
        if blocks:
            tokens, per_block = self.encoder.forward_intermediates(
                pixel_values, indices=blocks, norm=True, output_fmt="NLC", return_prefix_tokens=True
            )
            embedding = torch.cat([prefix_tokens[:, 0] for _patches, prefix_tokens in per_block], dim=-1)
        else:
            tokens = self.encoder.forward_features(pixel_values)
            embedding = tokens[:, 0] if self.pooling == "cls" else tokens[:, prefix:].mean(dim=1)
        patch = self.encoder.config.patch_size
        height, width = pixel_values.shape[-2:]
        grid = tokens[:, prefix:].reshape(tokens.shape[0], height // patch, width // patch, tokens.shape[-1])
        return embedding, grid


def export_core(
    encoder: nn.Module,
    *,
    pooling: str,
    with_patch_tokens: bool,
    dynamic_batch: bool,
    dynamic_image_size: bool,
    opset: int,
):
    """``torch.onnx.export`` (dynamo exporter) of :class:`ExportWrapper`; returns the ``onnx_ir.Model``.

    The example batch has 2 images when the batch is dynamic: torch.export specialises sizes 0 and 1,
    and a traced batch of 1 could be baked into reshapes. A static batch is 1.
    """
    config = encoder.config
    wrapper = ExportWrapper(encoder, pooling, with_patch_tokens).eval()
    batch = 2 if dynamic_batch else 1
    example = torch.randn(batch, config.in_chans, config.img_size, config.img_size, device=encoder.device)
    axes: dict[int, Any] = {}
    if dynamic_batch:
        axes[0] = torch.export.Dim("batch", min=1, max=1 << 20)
    if dynamic_image_size:
        axes[2] = torch.export.Dim("height", min=config.patch_size, max=1 << 14)
        axes[3] = torch.export.Dim("width", min=config.patch_size, max=1 << 14)
    outputs = [EMBEDDING, PATCH_TOKENS] if with_patch_tokens else [EMBEDDING]
    with _quiet_exporter_logs():
        program = torch.onnx.export(
            wrapper,
            (example,),
            dynamo=True,
            input_names=[CORE_INPUT],
            output_names=outputs,
            dynamic_shapes={"pixel_values": axes} if axes else None,
            opset_version=opset,
            optimize=True,
            verbose=False,
        )
    return program.model


@contextlib.contextmanager
def _quiet_exporter_logs():
    """Silence the exporter's per-pass INFO lines (hundreds per model) unless their level was set."""
    loggers = [logging.getLogger(name) for name in ("onnx_ir", "onnxscript", "torch.onnx")]
    saved = [log.level for log in loggers]
    for log in loggers:
        if log.level == logging.NOTSET:
            log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for log, level in zip(loggers, saved):
            log.setLevel(level)


def fuse_for_ort(model):
    """Fuse attention, LayerNorm + residual and GELU into ONNX Runtime contrib ops.

    ``onnxruntime.transformers.optimizer`` does not recognise the attention of graphs from the dynamo
    exporter (it was written for TorchScript-exported BERT graphs: measured 0 Attention fusions on a
    timm ViT-S/16), so this uses the rewriter written for them, ``onnxscript.rewriter.ort_fusions``.

    Args:
        model: the ``onnx_ir.Model`` from :func:`export_core`.

    Returns:
        ``(fused onnx_ir.Model, {fusion name: count})`` with the fusions that applied, e.g.
        ``{"sdpa_via_mha": 12, "skip_layer_normalization": 24, "bias_gelu": 12, ...}``.
    """
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    with _quiet_exporter_logs():
        fused, counts = optimize_for_ort(model)
    applied = {name: int(count) for name, count in counts.items() if count}
    logger.info("ONNX Runtime fusions applied: %s", applied or "none")
    return fused, applied


def convert_fp16(proto):
    """float16 weights and activations with float32 graph inputs/outputs (a Cast at each end).

    Uses ``onnxruntime.transformers.float16`` with its default block list (ops kept in float32).
    """
    import onnx_ir
    from onnxruntime.transformers.float16 import convert_float_to_float16

    converted = convert_float_to_float16(proto, keep_io_types=True, disable_shape_infer=_is_big(proto))
    # the converter appends the input Casts after their consumers; ONNX requires topological order
    model = onnx_ir.serde.deserialize_model(converted)
    model.graph.sort()
    return onnx_ir.serde.serialize_model(model)


# --------------------------------------------------------------------------------------- preprocessing
@dataclass(frozen=True)
class PreprocessingSpec:
    """The resize / crop / normalise baked into a graph for one fixed input image size.

    Derived from the checkpoint's data config exactly as
    :class:`~visreg_hub.inference.preprocess.Preprocessor` resizes a PIL image of ``image_size``: the sizes
    are computed here in Python, so the graph holds constants only.

    Attributes:
        image_size: (H, W) of the uint8 images the graph accepts.
        layout: ``"NHWC"`` (N, H, W, 3) or ``"NCHW"`` (N, 3, H, W).
        resize_size: (h, w) after the resize step.
        crop: (top, left, height, width) of the centre crop, in the resized image.
        interpolation: ``bicubic`` or ``bilinear``.
        mean, std: per-channel normalisation.
        channels: channels the model takes: 3, or 1 for grayscale models, whose graph still accepts RGB
            and converts it to luma exactly as PIL's ``convert("L")`` does (integer ITU-R 601-2 weights).
    """

    image_size: tuple[int, int]
    layout: str
    resize_size: tuple[int, int]
    crop: tuple[int, int, int, int]
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int = 3

    @classmethod
    def from_data_config(
        cls, data_config: dict[str, Any], image_size: tuple[int, int], layout: str
    ) -> PreprocessingSpec:
        """Sizes of timm's eval transform (``crop_mode`` center or squash) for inputs of ``image_size``.

        Raises:
            ValueError: a layout, channel count, crop mode or interpolation the graph cannot reproduce.
        """
        if layout not in LAYOUTS:
            raise UserInputError(f"image_layout must be one of {LAYOUTS}, got {layout!r}")
        channels, out_h, out_w = tuple(data_config["input_size"])
        if channels not in (1, 3):
            raise UserInputError(
                f"with_preprocessing supports RGB (3-channel) and grayscale (1-channel) models, this one "
                f"has {channels} channels; export without with_preprocessing"
            )
        interpolation = data_config["interpolation"]
        if interpolation not in _ONNX_MODES:
            raise UserInputError(
                f"with_preprocessing supports interpolation {list(_ONNX_MODES)}, not {interpolation!r} (PIL "
                "nearest differs from ONNX Resize at ties); export without it and preprocess with PIL"
            )
        height, width = image_size
        crop_pct = data_config.get("crop_pct") or 0.875
        scale = (math.floor(out_h / crop_pct), math.floor(out_w / crop_pct))
        mode = data_config.get("crop_mode") or "center"
        if mode == "squash":
            resized = scale
        elif mode == "center" and scale[0] == scale[1]:  # torchvision resize(int): shortest edge -> scale
            short, long = (width, height) if width <= height else (height, width)
            new_long = int(scale[0] * long / short)
            resized = (new_long, scale[0]) if width <= height else (scale[0], new_long)
        elif mode == "center":  # timm ResizeKeepRatio fitting the shortest side
            ratio = min(height / scale[0], width / scale[1])
            resized = (round(height / ratio), round(width / ratio))
        else:
            raise UserInputError(
                f"crop_mode={mode!r} is not supported with with_preprocessing (center and squash are); "
                "export without it and preprocess with visreg_hub.inference.Preprocessor"
            )
        if resized[0] < out_h or resized[1] < out_w:
            raise UserInputError(
                f"images of {height}x{width} resize to {resized}, smaller than the crop {out_h}x{out_w}"
            )
        # torchvision center_crop: Python round (half to even) of the centred offset
        crop = (round((resized[0] - out_h) / 2.0), round((resized[1] - out_w) / 2.0), out_h, out_w)
        mean = tuple(float(v) for v in data_config["mean"])
        std = tuple(float(v) for v in data_config["std"])
        return cls((height, width), layout, tuple(resized), crop, interpolation, mean, std, channels)

    def describe(self) -> str:
        """One paragraph saying what the graph does to its input (stored in the ONNX metadata)."""
        top, left, crop_h, crop_w = self.crop
        shape = "(N, H, W, 3)" if self.layout == "NHWC" else "(N, 3, H, W)"
        return (
            f"input uint8 RGB {shape} with H, W = {self.image_size}; cast to float32; "
            + (
                "convert to luma like PIL convert('L'): (19595 R + 38470 G + 7471 B + 32768) >> 16; "
                if self.channels == 1
                else ""
            )
            + f"resize to "
            f"{self.resize_size} ({self.interpolation}, PIL-style: antialiased when shrinking, cubic "
            "a=-0.5, half-pixel centres, width then height, each pass rounded half up and clipped to "
            f"[0, 255] like PIL's 8-bit passes); crop rows {top}:{top + crop_h}, "
            f"columns {left}:{left + crop_w}; "
            f"x / 255; (x - mean) / std with mean {self.mean}, std {self.std}"
        )


def preprocessing_nodes(spec: PreprocessingSpec, source: str, target: str):
    """ONNX nodes and initializers turning uint8 ``source`` into normalised float32 ``target``."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []

    def const(name: str, value, dtype) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), f"visreg_pre/{name}"))
        return f"visreg_pre/{name}"

    def node(op: str, inputs: list[str], name: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [f"visreg_pre/{name}"], name=f"visreg_pre/{name}", **attrs))
        return f"visreg_pre/{name}"

    current = source
    if spec.layout == "NHWC":
        current = node("Transpose", [current], "nchw", perm=[0, 3, 1, 2])
    current = node("Cast", [current], "float", to=TensorProto.FLOAT)
    if spec.channels == 1:
        # PIL's convert("L"): (19595 R + 38470 G + 7471 B + 0x8000) >> 16. Every intermediate is an
        # integer below 2**24 and 65536 a power of two, so float32 reproduces it exactly.
        weights = const(
            "luma_weights", np.array([19595, 38470, 7471], np.float32).reshape(1, 3, 1, 1), np.float32
        )
        weighted = node("Mul", [current, weights], "luma_weighted")
        total = node("ReduceSum", [weighted, const("luma_axis", [1], np.int64)], "luma_sum", keepdims=1)
        rounded = node("Add", [total, const("luma_half", 32768.0, np.float32)], "luma_rounded")
        current = node(
            "Floor", [node("Div", [rounded, const("luma_scale", 65536.0, np.float32)], "luma_div")], "luma"
        )
    # PIL resamples width then height, storing each pass as 8-bit: replicate both roundings
    rounding = None
    for axis, new, old in (
        (3, spec.resize_size[1], spec.image_size[1]),
        (2, spec.resize_size[0], spec.image_size[0]),
    ):
        if new == old:
            continue  # PIL skips a pass whose size does not change
        tag = "w" if axis == 3 else "h"
        if rounding is None:  # made by the first pass that runs: unused ones make ONNX Runtime warn
            rounding = (
                const("half", 0.5, np.float32),
                const("zero", 0.0, np.float32),
                const("max", 255.0, np.float32),
            )
        half, low, high = rounding
        current = node(
            "Resize", [current, "", "", const(f"size_{tag}", [new], np.int64)], f"resize_{tag}",
            mode=_ONNX_MODES[spec.interpolation], cubic_coeff_a=-0.5, antialias=1, exclude_outside=1,
            coordinate_transformation_mode="half_pixel", axes=[axis],
        )  # fmt: skip
        current = node("Floor", [node("Add", [current, half], f"add_half_{tag}")], f"round_{tag}")
        current = node("Clip", [current, low, high], f"clip_{tag}")
    top, left, crop_h, crop_w = spec.crop
    if (top, left, crop_h, crop_w) != (0, 0, *spec.resize_size):
        starts, ends = (
            const("crop_start", [top, left], np.int64),
            const("crop_end", [top + crop_h, left + crop_w], np.int64),
        )
        current = node("Slice", [current, starts, ends, const("crop_axes", [2, 3], np.int64)], "crop")
    mean = np.asarray(spec.mean, np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(spec.std, np.float32).reshape(1, -1, 1, 1)
    # the order of Preprocessor.normalize (ToTensor then Normalize), so float32 results agree bit for bit
    current = node("Div", [current, const("c255", 255.0, np.float32)], "scaled")
    current = node("Sub", [current, const("mean", mean, np.float32)], "centred")
    nodes.append(
        helper.make_node(
            "Div", [current, const("std", std, np.float32)], [target], name="visreg_pre/normalised"
        )
    )
    return nodes, inits


def _image_input(spec: PreprocessingSpec, batch):
    from onnx import TensorProto, helper

    height, width = spec.image_size
    dims = [batch, height, width, 3] if spec.layout == "NHWC" else [batch, 3, height, width]
    return helper.make_tensor_value_info(IMAGE_INPUT, TensorProto.UINT8, dims)


def attach_preprocessing(proto, spec: PreprocessingSpec):
    """Replace the float ``pixel_values`` input of ``proto`` by uint8 ``images`` + the spec's nodes."""
    graph = proto.graph
    (core_input,) = [value for value in graph.input if value.name == CORE_INPUT]
    batch_dim = core_input.type.tensor_type.shape.dim[0]
    batch = batch_dim.dim_param or batch_dim.dim_value
    nodes, inits = preprocessing_nodes(spec, IMAGE_INPUT, CORE_INPUT)
    graph.input.remove(core_input)
    graph.input.insert(0, _image_input(spec, batch))
    existing = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + existing)  # topological order: preprocessing first
    graph.initializer.extend(inits)
    return proto


def preprocessing_model(spec: PreprocessingSpec, opset: int = 18):
    """The preprocessing alone as a model (``images`` -> ``pixel_values``), to check it against PIL."""
    from onnx import TensorProto, helper

    nodes, inits = preprocessing_nodes(spec, IMAGE_INPUT, CORE_INPUT)
    output = helper.make_tensor_value_info(
        CORE_INPUT, TensorProto.FLOAT, ["batch", spec.channels, spec.crop[2], spec.crop[3]]
    )
    graph = helper.make_graph(nodes, "visreg_preprocessing", [_image_input(spec, "batch")], [output], inits)
    # IR 8 is what ONNX Runtime 1.14+ reads for opset 18
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", max(opset, 18))], ir_version=8)


# ---------------------------------------------------------------------------------------------- saving
def _is_big(proto) -> bool:
    return sum(len(t.raw_data) for t in proto.graph.initializer) > _EXTERNAL_DATA_BYTES


def save_model(proto, path: Path) -> None:
    """Write ``proto`` to ``path``; weights above ~1.8 GB go to ``<name>.data`` next to it (2 GiB cap)."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    if _is_big(proto):
        location = path.name + ".data"
        logger.info("weights exceed the 2 GiB protobuf limit; writing them to %s", path.with_name(location))
        onnx.save_model(
            proto, path, save_as_external_data=True, all_tensors_to_one_file=True, location=location
        )
    else:
        onnx.save_model(proto, path)
