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
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from visreg_hub.errors import require_extra
from visreg_hub.inference.images import expand_inputs
from visreg_hub.inference.preprocess import ImageDataset, Preprocessor
from visreg_hub.native_io import utf8_path

logger = logging.getLogger(__name__)

QUANTIZED_OPS = ["MatMul", "Gemm"]
MAX_CALIBRATION_IMAGES = 256


def calibration_inputs(data_config: dict, images: Any, limit: int = MAX_CALIBRATION_IMAGES) -> np.ndarray:
    """(N, C, H, W) float32 model inputs of real images, preprocessed as ``encode()`` does.

    Args:
        data_config: the checkpoint's data config.
        images: anything ``encode()`` takes (paths, folders, PIL images, arrays); the first ``limit``
            images are used, undecodable ones skipped.
    """
    preprocessor = Preprocessor(data_config)
    dataset = ImageDataset(expand_inputs(images)[:limit], preprocessor)
    pixels = [item.pixels for item in (dataset[i] for i in range(len(dataset))) if item.error is None]
    if not pixels:
        raise ValueError("none of the calibration images could be decoded; pass image files or a folder")
    return preprocessor.normalize(torch.stack(pixels)).numpy()


class _Calibration:
    """``onnxruntime.quantization.CalibrationDataReader`` over batches of preprocessed images."""

    def __init__(self, input_name: str, inputs: np.ndarray, batch_size: int = 8) -> None:
        self._feeds = iter(
            {input_name: inputs[start : start + batch_size]} for start in range(0, len(inputs), batch_size)
        )

    def get_next(self):
        return next(self._feeds, None)


class _PreprocessAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "consider to run pre-processing before quantization" not in record.getMessage()


@contextlib.contextmanager
def _without_preprocess_advice():
    """Drop ONNX Runtime's "consider to run pre-processing" advice, which it logs on the *root* logger at
    every dynamic quantisation (so it lands in users' logs). The dynamic path skips that pre-pass on
    purpose (the static path runs it); every int8 graph is checked against PyTorch after quantisation."""
    root, advice = logging.getLogger(), _PreprocessAdvice()
    root.addFilter(advice)
    try:
        yield
    finally:
        root.removeFilter(advice)


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
        raise ValueError("calibration needs at least one image; pass None for dynamic quantisation")
    # why a scratch folder: ORT's tools pass paths to onnx's C++ shape inference, which takes only UTF-8
    # names; the scratch copy and result have plain names, and Python moves the result to ``target``
    with tempfile.TemporaryDirectory(prefix="visreg-quant-") as scratch:
        scratch = Path(scratch)
        local_source = Path(source)
        if utf8_path(source) is None:
            local_source = Path(shutil.copyfile(source, scratch / "fp32.onnx"))
        result = scratch / "int8.onnx"
        if calibration is None:
            with _without_preprocess_advice():
                quantization.quantize_dynamic(
                    local_source, result, weight_type=quantization.QuantType.QInt8, per_channel=True,
                    op_types_to_quantize=QUANTIZED_OPS,
                )  # fmt: skip
            method = "dynamic"
        else:
            prepared = scratch / "prepared.onnx"
            # why: ORT's static quantiser wants shapes inferred and its own graph clean-ups done first
            quantization.quant_pre_process(str(local_source), str(prepared), skip_symbolic_shape=True)
            quantization.quantize_static(
                prepared, result, _Calibration(input_name, calibration),
                quant_format=quantization.QuantFormat.QDQ,
                activation_type=quantization.QuantType.QUInt8, weight_type=quantization.QuantType.QInt8,
                per_channel=True, op_types_to_quantize=QUANTIZED_OPS,
                calibrate_method=quantization.CalibrationMethod.MinMax,
            )  # fmt: skip
            method = f"static, {len(calibration)} calibration images"
        shutil.move(result, target)
    return method
