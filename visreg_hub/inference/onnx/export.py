"""ONNX export of VISReg encoders (needs the ``onnx`` extra).

    import visreg_hub
    from visreg_hub.inference.onnx import OnnxEmbedder

    report = visreg_hub.export_onnx(model, "model.onnx")          # validated against PyTorch
    embedder = OnnxEmbedder("model.onnx")                         # TensorRT > CUDA > CPU
    emb = embedder.encode(["cat.jpg", "dog.png"])                 # same contract as model.encode
    embedder.active_provider                                      # what runs: "CPUExecutionProvider", ...

Graph inputs and outputs (all float32 whatever the precision inside):

* ``pixel_values`` (B, C, H, W): images normalised with the checkpoint's mean/std, as ``model(...)`` takes.
  B is symbolic (``dynamic_batch``), and H, W too when the encoder was built with ``dynamic_img_size``.
* or, with ``with_preprocessing=True``, ``images``: uint8 RGB (B, H, W, 3) (or (B, 3, H, W)) of one fixed
  size (H, W), chosen at export (``image_size``; default the model's input size).
* ``embedding`` (B, E), not L2-normalised; ``patch_tokens`` (B, h, w, D) with ``patch_tokens=True``.

The model name, config, data config, pooling and input description are stored in ``metadata_props``
(:class:`~visreg_hub.inference.onnx.runtime.OnnxMetadata`), which is all :class:`OnnxEmbedder` needs.

What the baked preprocessing does (``with_preprocessing=True``), step by step, for inputs of (H, W):

1. NHWC -> NCHW if needed; uint8 -> float32 (values 0..255, no scaling yet). For a 1-channel
   (grayscale) model, RGB -> luma as PIL's ``convert("L")`` does (integer ITU-R 601-2 weights, rounded).
2. Resize to the size timm's eval transform gives an (H, W) image: shortest side to
   ``floor(img_size / crop_pct)``, the other side ``int(...)``-truncated keeping the aspect ratio (crop_mode
   ``center``), or both sides to that size (``squash``). The sizes are computed at export: constants.
   ONNX ``Resize`` with PIL's filter: ``cubic`` with ``cubic_coeff_a=-0.5`` (PIL bicubic; PyTorch's is
   -0.75) or ``linear``, ``antialias=1`` (the filter widened by the shrink factor, as PIL does),
   ``exclude_outside=1`` (weights renormalised at the borders, as PIL), half-pixel centres. Width first,
   then height, each pass rounded half up and clipped to [0, 255], because PIL stores each pass in 8 bits.
3. Centre crop to the model's input size (offsets rounded as torchvision's ``center_crop``).
4. ``x / 255``, then ``(x - mean) / std`` with the checkpoint's statistics, in float32, in this order.

How it differs from the PIL/timm path (``encode()`` and ``timm.data.create_transform``): PIL filters with
22-bit fixed-point coefficients, the graph in float32, so values that land near a rounding tie differ by 1
level (2 at most). Measured on the test photos over 72 settings (bicubic and bilinear; crop_pct 0.875,
0.9, 1.0; center and squash; model sizes 32 and 224; six input sizes): at most 2 levels; on average
0.27 % of values differ, at most 0.25 % for bicubic and 5.6 % for bilinear. Effect on embeddings:
ViT-S/16 (random init) on the 4 test photos at 320x240 -> 224: max abs error 1.2e-4, cosine 0.9999999;
the tiny test encoder: 4e-5. Not reproduced, hence refused: ``nearest`` (PIL picks the other neighbour
at some exact ties), crop_mode ``border``, models with other than 1 or 3 channels. Decoding (EXIF
rotation, alpha, CMYK, 16-bit) is the client's job: the graph only sees decoded RGB pixels.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visreg_hub.durable import fsync_dir, fsync_file
from visreg_hub.errors import UserInputError, require_extra
from visreg_hub.inference.backends import inference_state
from visreg_hub.inference.onnx.graph import (
    CORE_INPUT,
    EMBEDDING,
    IMAGE_INPUT,
    PATCH_TOKENS,
    PreprocessingSpec,
    attach_preprocessing,
    convert_fp16,
    export_core,
    fuse_for_ort,
    save_model,
)
from visreg_hub.inference.onnx.quantize import calibration_inputs, quantize_int8
from visreg_hub.inference.onnx.runtime import OnnxMetadata, onnx_extra, provider_names
from visreg_hub.inference.onnx.validate import (
    DEFAULT_BATCH_SIZES,
    INT8_MIN_COSINE,
    OnnxValidationError,
    ValidationReport,
    validate_onnx,
)

logger = logging.getLogger(__name__)
# Largest side of a baked-preprocessing graph's uint8 input: the server's default max_pixels is 4096^2.
MAX_IMAGE_SIDE = 4096
# Opsets the exporter writes valid graphs for: 26-28 (onnx 1.23 knows them) fail in onnxscript's version
# converter (no adapter for Gelu beyond 25) and leave an opset-18 header over opset-23 Attention nodes,
# which ONNX Runtime refuses. Raise MAX_OPSET when a test exports and runs a higher one.
MIN_OPSET, MAX_OPSET = 18, 25


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    opset: int = 18,
    pooling: str | None = None,
    dynamic_batch: bool = True,
    dynamic_image_size: bool | None = None,
    fp16: bool = False,
    with_preprocessing: bool = False,
    image_size: int | tuple[int, int] | None = None,
    image_layout: str = "NHWC",
    patch_tokens: bool = False,
    optimize: bool = False,
    int8: bool = False,
    calibration_images: Any = None,
    validation_batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
    validation_providers: str | list[str] | None = None,
) -> ValidationReport:
    """Export an encoder to ONNX, then check the file with ONNX Runtime against PyTorch.

    Args:
        model: a float32 :class:`~visreg_hub.models.VISRegEncoder` (any device; exported in eval mode,
            its training flags are restored afterwards).
        path: the ``.onnx`` file to write (weights above ~1.8 GB go to ``<path>.data`` beside it).
        opset: ONNX opset in [``MIN_OPSET``, ``MAX_OPSET``] = [18, 25] (ONNX Runtime >= 1.14).
        pooling: feature tap of the ``embedding`` output; None: the checkpoint's default.
        dynamic_batch: symbolic batch dimension; False fixes the batch to 1.
        dynamic_image_size: symbolic H and W (multiples of the patch size); None: when the model was built
            with ``dynamic_img_size`` and there is no baked preprocessing.
        fp16: float16 weights and activations (inputs and outputs stay float32); meant for GPUs.
        with_preprocessing: take uint8 RGB images of one fixed ``image_size`` and resize, crop and
            normalise them in the graph the way the checkpoint's data config does with PIL (the module
            docstring lists the steps and the measured difference: at most 2 8-bit levels).
        image_size: (H, W) or H=W of the uint8 input with ``with_preprocessing``; None: the model's input
            size (then the graph does what timm does to an image of that size, e.g. 224 -> 256 -> crop 224).
        image_layout: ``"NHWC"`` (B, H, W, 3) or ``"NCHW"`` (B, 3, H, W) for the uint8 input.
        patch_tokens: add the (B, h, w, D) ``patch_tokens`` output.
        optimize: fuse attention / LayerNorm / GELU into ONNX Runtime contrib ops (the file then runs on
            ONNX Runtime only).
        int8: quantise the linear layers to int8 for CPUs (:mod:`~visreg_hub.inference.onnx.quantize`):
            the fp32 graph is exported and validated first, then quantised and checked against PyTorch
            by cosine (>= ``INT8_MIN_COSINE``).
        calibration_images: with ``int8``, real images (anything ``encode()`` takes: paths, folders, PIL
            images, ...; at most 256 are used) for static quantisation; None: dynamic quantisation (no
            calibration needed).
        validation_batch_sizes: batch sizes of the check against PyTorch.
        validation_providers: providers of that check (None: best available). Validate fp16 graphs on
            the GPU provider they are meant for.

    Returns:
        The :class:`~visreg_hub.inference.onnx.validate.ValidationReport` (``.path`` is the file).

    Raises:
        ValueError: an argument is invalid (the message says how to fix it); checked before the export,
            including the provider names and the calibration images (missing, empty or undecodable).
        OnnxValidationError: ONNX Runtime disagrees with PyTorch (fp32: max abs error > 1e-4 x the
            output's scale; fp16: cosine < 0.999); the graph is kept for inspection as
            ``<name>.failed.onnx``.

    Nothing is written to ``path`` unless every step passes: the graph is written and checked in a
    temporary folder beside it, then renamed over ``path``, so a failed export (a bad option, a failed
    check, a crash) leaves an existing file there as it was.
    """
    onnx = require_extra("onnx", onnx_extra())
    require_extra("onnxscript", onnx_extra())
    require_extra("onnx_ir", onnx_extra())  # installed with onnxscript
    require_extra("onnxruntime", onnx_extra())  # the check after the export runs it: fail before exporting

    path = Path(path).expanduser()
    check_output_path(path)
    plan = _plan(
        model, opset=opset, max_opset=min(MAX_OPSET, onnx.defs.onnx_opset_version()), pooling=pooling,
        dynamic_batch=dynamic_batch, dynamic_image_size=dynamic_image_size, fp16=fp16,
        with_preprocessing=with_preprocessing, image_size=image_size, image_layout=image_layout,
        patch_tokens=patch_tokens, optimize=optimize, int8=int8, calibration_images=calibration_images,
        validation_providers=validation_providers,
    )  # fmt: skip
    started = time.perf_counter()
    proto, meta = _graph(model, plan)
    check = {"batch_sizes": tuple(validation_batch_sizes), "providers": validation_providers}
    with _staged(path) as staged:
        save_model(proto, staged)
        logger.info("exported %s in %.1f s; validating against PyTorch", path, time.perf_counter() - started)
        report = validate_onnx(model, staged, **check)
        if plan.int8:
            method = _quantize_in_place(staged, meta, plan.calibration)
            logger.info("quantised %s to int8 (%s); checking it against PyTorch", path, method)
            report = validate_onnx(model, staged, **check, min_cosine=INT8_MIN_COSINE)
    return dataclasses.replace(report, path=str(path))


@dataclasses.dataclass(frozen=True)
class _ExportPlan:
    """:func:`export_onnx`'s options, checked and resolved against the model: what the graph will be.

    ``spec`` is the baked preprocessing (None: the graph takes normalised ``pixel_values``);
    ``calibration`` the decoded calibration batch of static int8 quantisation (None: dynamic).
    """

    pooling: str
    embedding_dim: int
    opset: int
    dynamic_batch: bool
    dynamic_image_size: bool
    fp16: bool
    optimize: bool
    patch_tokens: bool
    int8: bool
    spec: PreprocessingSpec | None
    image_layout: str
    calibration: Any


def _plan(
    model: nn.Module,
    *,
    opset: int,
    max_opset: int,
    pooling: str | None,
    dynamic_batch: bool,
    dynamic_image_size: bool | None,
    fp16: bool,
    with_preprocessing: bool,
    image_size: int | tuple[int, int] | None,
    image_layout: str,
    patch_tokens: bool,
    optimize: bool,
    int8: bool,
    calibration_images: Any,
    validation_providers: str | list[str] | None,
) -> _ExportPlan:
    """Check every option before anything is exported (the export takes seconds to minutes), including
    the provider names and the calibration images (decoded here: a missing folder fails now).

    Raises:
        UserInputError: the message names the option and how to fix it.
    """
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= max_opset:
        raise UserInputError(f"opset must be an integer in [{MIN_OPSET}, {max_opset}], got {opset!r}")
    if model.dtype != torch.float32:
        raise UserInputError(
            f"export needs a float32 model, got {model.dtype}; call model.float() first "
            "(fp16=True makes a half-precision graph)"
        )
    config = model.config
    pooling = config.pooling if pooling is None else pooling
    embedding_dim = model.embedding_dim(pooling)  # validates the pooling name
    if dynamic_image_size is None:
        dynamic_image_size = config.dynamic_img_size and not with_preprocessing
    if dynamic_image_size and not config.dynamic_img_size:
        raise UserInputError("dynamic_image_size=True needs a model built with dynamic_img_size=True")
    spec = None
    if with_preprocessing:
        size = config.data_config["input_size"][1:] if image_size is None else image_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        if len(size) != 2 or any(
            isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_IMAGE_SIDE for v in size
        ):
            raise UserInputError(
                f"image_size must be an int or (H, W) in 1..{MAX_IMAGE_SIDE} (the fixed uint8 input size; "
                f"validation runs the graph on images of it), got {image_size!r}"
            )
        spec = PreprocessingSpec.from_data_config(config.data_config, size, image_layout)
    elif image_size is not None:
        raise UserInputError(
            "image_size only applies with with_preprocessing=True (the fixed uint8 input size)"
        )
    if int8 and (fp16 or optimize or with_preprocessing or patch_tokens):
        raise UserInputError(
            "int8=True quantises the plain fp32 graph; "
            "drop fp16, optimize, with_preprocessing and patch_tokens"
        )
    if calibration_images is not None and not int8:
        raise UserInputError("calibration_images only applies with int8=True (static quantisation)")
    if validation_providers is not None:
        provider_names(validation_providers)  # a misspelt provider fails now, not after the export
    calibration = None
    if calibration_images is not None:
        calibration = calibration_inputs(config.data_config, calibration_images)
    return _ExportPlan(
        pooling=pooling, embedding_dim=embedding_dim, opset=opset, dynamic_batch=dynamic_batch,
        dynamic_image_size=bool(dynamic_image_size), fp16=fp16, optimize=optimize, patch_tokens=patch_tokens,
        int8=int8, spec=spec, image_layout=image_layout, calibration=calibration,
    )  # fmt: skip


def _graph(model: nn.Module, plan: _ExportPlan) -> tuple[Any, OnnxMetadata]:
    """The dynamo export of ``model`` turned into the planned graph (fused, fp16, preprocessing in front),
    as an ``onnx.ModelProto`` carrying its :class:`OnnxMetadata`."""
    onnx_ir = require_extra("onnx_ir", onnx_extra())
    from visreg_hub import __version__

    with inference_state(model, model.device):
        core = export_core(
            model, pooling=plan.pooling, with_patch_tokens=plan.patch_tokens,
            dynamic_batch=plan.dynamic_batch, dynamic_image_size=plan.dynamic_image_size, opset=plan.opset,
        )  # fmt: skip
    fusions: dict[str, int] = {}
    if plan.optimize:
        core, fusions = fuse_for_ort(core)
    proto = onnx_ir.serde.serialize_model(core)
    if plan.fp16:
        proto = convert_fp16(proto)
    spec, config = plan.spec, model.config
    if spec is not None:
        proto = attach_preprocessing(proto, spec)
    meta = OnnxMetadata(
        model_name=config.name or "", model_config=config.to_dict(), data_config=dict(config.data_config),
        pooling=plan.pooling, embedding_dim=plan.embedding_dim,
        outputs=(EMBEDDING, PATCH_TOKENS) if plan.patch_tokens else (EMBEDDING,),
        precision="fp16" if plan.fp16 else "fp32", input_name=IMAGE_INPUT if spec else CORE_INPUT,
        input_layout=plan.image_layout if spec else "NCHW",
        image_size=spec.image_size if spec else (config.img_size, config.img_size),
        dynamic_batch=plan.dynamic_batch, dynamic_image_size=plan.dynamic_image_size,
        preprocessing=spec.describe() if spec else "", fusions=fusions, opset=plan.opset,
        library_version=__version__,
    )  # fmt: skip
    meta.write_to(proto)
    proto.doc_string = (
        f"visreg_hub {config.name or config.architecture} image encoder ({plan.pooling} pooling)"
    )
    return proto, meta


def _quantize_in_place(staged: Path, meta: OnnxMetadata, calibration: Any) -> str:
    """Replace the validated fp32 graph at ``staged`` by its int8 quantisation (static with
    ``calibration``, else dynamic), with the metadata saying so; returns the method used."""
    onnx = require_extra("onnx", onnx_extra())
    scratch = staged.with_name("int8-scratch.onnx")
    method = quantize_int8(staged, scratch, input_name=meta.input_name, calibration=calibration)
    quantized = onnx.load(str(scratch))
    dataclasses.replace(meta, precision="int8", quantization=method).write_to(quantized)
    save_model(quantized, staged)
    return method


def check_output_path(path: Path) -> None:
    """Refuse an output path that is a folder (``os.replace`` would fail only after the whole export) or
    does not end with ``.onnx``; checked before any model is loaded or exported."""
    if path.is_dir():  # first: a folder named "x.onnx" is still a folder
        raise UserInputError(
            f"{path} is a folder; name a .onnx file inside it, e.g. {path / 'model.onnx'}, or another path"
        )
    if path.suffix.lower() != ".onnx":
        raise UserInputError(f"the output must end with .onnx, got {str(path)!r}")


def _failed_name(path: Path) -> Path:
    return path.with_name(path.stem + ".failed.onnx")


@contextlib.contextmanager
def _staged(path: Path):
    """Yield ``<folder>/.<name>.tmp-<pid>/<name>`` to write and check; on success rename it over ``path``.

    A folder rather than a file name: a graph with external weights names its ``<name>.data`` file inside
    itself, so the staged graph must already carry the final name. On an OnnxValidationError the staged
    graph moves to ``<name>.failed.onnx`` for inspection (its report then names that file); on any failure
    ``path`` is left as it was.
    """
    stage = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    staged = stage / path.name
    try:
        try:
            yield staged
        except OnnxValidationError as exc:
            failed = _failed_name(path)
            if not (staged.with_name(staged.name + ".data")).exists():  # a self-contained graph: keep it
                os.replace(staged, failed)
                report = dataclasses.replace(exc.report, path=str(failed))
                raise OnnxValidationError(
                    f"{exc} (the graph is kept as {failed}; {path} was not written)", report
                ) from None
            raise
        data = staged.with_name(staged.name + ".data")
        final_data = path.with_name(path.name + ".data")
        if data.exists():
            fsync_file(data)
            os.replace(data, final_data)
        else:  # a smaller re-export: the old external weights would be stale beside the new graph
            final_data.unlink(missing_ok=True)
        fsync_file(staged)
        os.replace(staged, path)
        fsync_dir(path.parent)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
