"""int8 graphs for CPUs: ONNX Runtime's quantisation tools on an exported, validated fp32 graph.

* Dynamic (default): weights of every ``MatMul``/``Gemm`` (the linear layers: qkv, projections, MLP) are
  stored as int8 per output channel; activations are quantised per batch at run time
  (``DynamicQuantizeLinear`` + ``MatMulInteger``), which needs no calibration data. Attention's own
  matrix products, softmax, LayerNorm and GELU stay float32.
* Static (``calibration`` given): the same layers with activation ranges fixed in advance from real images
  (QDQ format, min-max calibration), so nothing is measured at run time.

On CPUs with VNNI (AVX-512 or AVX-VNNI) int8 products run at up to 4x the fp32 multiply rate; what the
whole model gains is measured in ``benchmarks/int8.py`` against ORT fp32 with retrieval recall against the
fp32 embeddings (docs/benchmarks.md). The quantised graph keeps the fp32 graph's metadata with
``precision="int8"`` and the method in ``quantization``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from visreg_hub.errors import UserInputError, require_extra
from visreg_hub.inference.images import ImageSource
from visreg_hub.inference.inputs import expand_inputs
from visreg_hub.inference.preprocess import ImageDataset, Preprocessor
from visreg_hub.native_io import utf8_path

logger = logging.getLogger(__name__)

QUANTIZED_OPS = ["MatMul", "Gemm"]
MAX_CALIBRATION_IMAGES = 256
# why: the static ranges are the min/max over the calibration images; a probe calibrating ViT-tiny on 4
# photos kept 92.5 % of the fp32 nearest neighbours on 333 others, dynamic quantisation 98.5 %
FEW_CALIBRATION_IMAGES = 64


def calibration_sources(images: Any, limit: int = MAX_CALIBRATION_IMAGES) -> list[ImageSource]:
    """The first ``limit`` calibration images of ``images``, checked before anything is exported.

    Paths are checked here, not at decoding, because ``encode()``'s rule (skip a bad item, keep the rest)
    would quietly calibrate on fewer images than the user listed.

    Raises:
        ValueError: a path does not exist, a folder holds no images, or there are no images at all.
    """
    items = [images] if isinstance(images, (str, os.PathLike)) else images
    if isinstance(items, (list, tuple)):
        paths = [item for item in items if isinstance(item, (str, os.PathLike)) and str(item).strip()]
        missing = [str(path) for path in paths if not os.path.exists(os.path.expanduser(path))]
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise UserInputError(
                f"calibration_images not found: {shown}; pass existing image files or folders"
            )
    sources = expand_inputs(images)
    empty = [source for source in sources if source.error is not None]
    if empty:
        first = empty[0]
        raise UserInputError(f"calibration_images {first.label}: {first.error}; pass image files or a folder")
    if not sources:
        raise UserInputError("calibration_images holds no images; pass image files or a folder")
    return sources[:limit]


def calibration_inputs(data_config: dict, images: Any, limit: int = MAX_CALIBRATION_IMAGES) -> np.ndarray:
    """(N, C, H, W) float32 model inputs of real images, preprocessed as ``encode()`` does.

    Args:
        data_config: the checkpoint's data config.
        images: anything ``encode()`` takes (paths, folders, PIL images, arrays); the first ``limit``
            images are used. Missing paths and empty folders are refused (:func:`calibration_sources`);
            files that cannot be decoded are skipped with a warning that names them.
    """
    preprocessor = Preprocessor(data_config)
    dataset = ImageDataset(calibration_sources(images, limit), preprocessor)
    items = [dataset[i] for i in range(len(dataset))]
    pixels = [item.pixels for item in items if item.error is None]
    if not pixels:
        raise UserInputError(
            f"none of the {len(items)} calibration images could be decoded (first: {items[0].error}); "
            "pass JPEG, PNG or other image files"
        )
    if len(pixels) < len(items):
        failed = [str(item.error) for item in items if item.error is not None]
        logger.warning(
            "calibrating on %d of %d images: %d could not be decoded (%s)",
            len(pixels), len(items), len(failed), "; ".join(failed[:3]),
        )  # fmt: skip
    if len(pixels) < FEW_CALIBRATION_IMAGES:
        logger.warning(
            "static int8 calibrated on only %d image(s): activation ranges from so few images can cost "
            "retrieval quality on others (the export's check uses synthetic images); pass %d or more "
            "representative images, or use dynamic quantisation (no --calibration-images)",
            len(pixels), FEW_CALIBRATION_IMAGES,
        )  # fmt: skip
    return preprocessor.normalize(torch.stack(pixels)).numpy()


class _Calibration:
    """``onnxruntime.quantization.CalibrationDataReader`` over batches of preprocessed images.

    ``batch_size`` must be one the graph takes: 1 for a graph exported with a fixed batch.
    """

    def __init__(self, input_name: str, inputs: np.ndarray, batch_size: int = 8) -> None:
        self._feeds = iter(
            {input_name: inputs[start : start + batch_size]} for start in range(0, len(inputs), batch_size)
        )

    def get_next(self):
        return next(self._feeds, None)


def _fixed_batch(path: Path, input_name: str) -> int | None:
    """The batch size baked into ``input_name`` of the graph at ``path``, or None when it is symbolic."""
    onnx = require_extra("onnx", "onnx-cpu")
    graph = onnx.load(str(path), load_external_data=False).graph  # the weights are not needed here
    for value in graph.input:
        if value.name == input_name:
            first = value.type.tensor_type.shape.dim[0]
            return first.dim_value if first.HasField("dim_value") else None
    return None


class _QuantiserNoise(logging.Filter):
    """Drops ONNX Runtime quantiser records below WARNING, and its "run pre-processing" advice."""

    def __init__(self) -> None:
        super().__init__()
        import onnxruntime.quantization

        self._folder = os.path.dirname(onnxruntime.quantization.__file__) + os.sep

    def filter(self, record: logging.LogRecord) -> bool:
        if "consider to run pre-processing before quantization" in record.getMessage():
            return False
        return not (record.levelno < logging.WARNING and record.pathname.startswith(self._folder))


@contextlib.contextmanager
def _quiet_quantiser():
    """Keep ONNX Runtime's quantiser out of users' logs for the duration of a call, and only then.

    The quantiser logs through the *root* logger (``logging.info(...)``): "Quantization parameters for
    tensor ... not specified", "Ignore MatMul due to non constant B", about 24 lines for a 4-block ViT,
    72 for ViT-B, plus the "consider to run pre-processing" advice at every dynamic quantisation (the
    dynamic path skips that pre-pass on purpose; every int8 graph is checked against PyTorch afterwards).
    Its warnings still pass. ``logging.info`` on a root logger without handlers would also call
    ``basicConfig()`` and leave a stderr handler behind, so a NullHandler stands in for the call.
    """
    root, noise = logging.getLogger(), _QuantiserNoise()
    named = logging.getLogger("onnxruntime.quantization")  # its preprocess / shape_inference loggers
    placeholder = logging.NullHandler() if not root.handlers else None
    level = named.level
    root.addFilter(noise)
    if placeholder is not None:
        root.addHandler(placeholder)
    if named.getEffectiveLevel() < logging.WARNING:
        named.setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.removeFilter(noise)
        if placeholder is not None:
            root.removeHandler(placeholder)
        named.setLevel(level)


def quantize_int8(
    source: str | Path,
    target: str | Path,
    *,
    input_name: str,
    calibration: np.ndarray | None = None,
) -> str:
    """Write an int8 version of the fp32 graph ``source`` to ``target``; return how it was quantised.

    Args:
        source: fp32 ``.onnx`` written by ``export_onnx`` (plain graph, not fused).
        target: where to write the int8 graph.
        input_name: the graph's input (``pixel_values`` or ``images``).
        calibration: None for dynamic quantisation; else (N, ...) float32 (or uint8 for baked
            preprocessing) inputs of real images for static quantisation.

    Returns:
        ``"dynamic"`` or ``"static, N calibration images"`` (stored in the metadata).
    """
    quantization = require_extra("onnxruntime.quantization", "onnx-cpu")
    if calibration is not None and len(calibration) == 0:
        raise UserInputError("calibration needs at least one image; pass None for dynamic quantisation")
    # why a scratch folder: ORT's tools pass paths to onnx's C++ shape inference, which takes only UTF-8
    # names; the scratch copy and result have plain names, and Python moves the result to ``target``
    with tempfile.TemporaryDirectory(prefix="visreg-quant-") as scratch:
        scratch = Path(scratch)
        local_source = Path(source)
        if utf8_path(source) is None:
            local_source = Path(shutil.copyfile(source, scratch / "fp32.onnx"))
        result = scratch / "int8.onnx"
        if calibration is None:
            with _quiet_quantiser():
                quantization.quantize_dynamic(
                    local_source, result, weight_type=quantization.QuantType.QInt8, per_channel=True,
                    op_types_to_quantize=QUANTIZED_OPS,
                )  # fmt: skip
            method = "dynamic"
        else:
            prepared = scratch / "prepared.onnx"
            # why: a graph exported with a fixed batch (1) refuses calibration batches of any other size
            batch_size = _fixed_batch(local_source, input_name) or 8
            reader = _Calibration(input_name, calibration, batch_size=batch_size)
            with _quiet_quantiser():
                # why: ORT's static quantiser wants shapes inferred and its own graph clean-ups done first
                quantization.quant_pre_process(str(local_source), str(prepared), skip_symbolic_shape=True)
                quantization.quantize_static(
                    prepared, result, reader,
                    quant_format=quantization.QuantFormat.QDQ,
                    activation_type=quantization.QuantType.QUInt8, weight_type=quantization.QuantType.QInt8,
                    per_channel=True, op_types_to_quantize=QUANTIZED_OPS,
                    calibrate_method=quantization.CalibrationMethod.MinMax,
                )  # fmt: skip
            method = f"static, {len(calibration)} calibration images"
        shutil.move(result, target)
    return method
