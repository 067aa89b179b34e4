"""ONNX Runtime against PyTorch on the same inputs: :func:`validate_onnx` and its :class:`ValidationReport`.

Run after every export. Batch sizes 1, 3, 17 and 64 by default: a batch size baked into a reshape during
tracing (the exporter traces with 2 images) shows up as an error or a wrong result at the others. With a
dynamic image size, a second, non-square size is checked too.

Criteria: fp32 graphs must match within ``atol`` times the output's scale (default 1e-4 x max(1, the
largest |value| PyTorch gives for that output): float32 rounding grows with the values, so a model with
embeddings of norm in the thousands is held to the same relative bound); fp16 and int8 graphs must keep
a per-vector cosine of at least ``min_cosine`` with the float32 PyTorch model (default from the graph's
metadata: 0.999 for fp16, 0.98 for int8, as ``export_onnx``).
Graphs with baked preprocessing are checked twice: the network against PyTorch fed the graph's own
preprocessed pixels (same criteria), and the whole graph against the PIL/timm path
(:class:`PreprocessingCheck`: pixel error in 8-bit levels and embedding cosine).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from visreg_hub.errors import UserInputError, VisregHubError, require_extra
from visreg_hub.inference.backends import inference_state
from visreg_hub.inference.onnx.graph import PreprocessingSpec, preprocessing_model
from visreg_hub.inference.onnx.runtime import (
    check_graph_signature,
    create_session,
    onnx_extra,
    read_onnx_metadata,
)
from visreg_hub.inference.preprocess import Preprocessor

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZES = (1, 3, 17, 64)
FP16_MIN_COSINE = 0.999
# why: int8 linear layers move a random-input ViT embedding by a few degrees at most; below this the
# quantisation went wrong (measured on ViT-S/16 and the tiny test model: docs/benchmarks.md)
INT8_MIN_COSINE = 0.98
MAX_PIXEL_LEVELS = 3.0  # baked resize vs PIL, in 8-bit levels; measured at most 2 (rounding of ties)


class OnnxValidationError(VisregHubError, RuntimeError):
    """ONNX Runtime disagrees with PyTorch beyond tolerance; ``.report`` holds every measurement."""

    def __init__(self, message: str, report: ValidationReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class ValidationRow:
    """One output at one batch size and image size.

    Attributes:
        batch_size: images in the batch.
        image_size: (H, W) fed to the graph.
        output: graph output name (``embedding`` or ``patch_tokens``).
        max_abs_error: max |ORT - PyTorch| over all values (nan when the run failed).
        min_cosine: lowest cosine between matching vectors (per image for ``embedding``, per token for
            ``patch_tokens``).
        passed: within the report's criteria.
        error: ONNX Runtime's message when the run itself failed, else "".
        allowed_abs_error: the fp32 bound for this row (``atol`` x max(1, max |PyTorch value|)); None for
            cosine-judged rows (fp16, int8) and failed runs.
    """

    batch_size: int
    image_size: tuple[int, int]
    output: str
    max_abs_error: float
    min_cosine: float
    passed: bool
    error: str = ""
    allowed_abs_error: float | None = None


@dataclass(frozen=True)
class PreprocessingCheck:
    """Whole graph with baked preprocessing vs the PIL/timm path (decode, PIL resize, crop, normalise).

    Attributes:
        num_images: synthetic images compared (smooth random content plus 8-bit noise).
        max_pixel_error: largest |graph pixel - PIL pixel| after the resize and crop, in 8-bit levels.
        fraction_pixels_differing: share of pixel values that differ at all.
        max_abs_error, min_cosine: of the embeddings, graph vs PyTorch on the PIL-preprocessed images.
        passed: ``max_pixel_error <= 3`` levels and ``min_cosine`` above the report's threshold.
    """

    num_images: int
    max_pixel_error: float
    fraction_pixels_differing: float
    max_abs_error: float
    min_cosine: float
    passed: bool


@dataclass(frozen=True)
class ValidationReport:
    """Result of :func:`validate_onnx`.

    Attributes:
        path: the validated ``.onnx`` file.
        provider: ONNX Runtime provider that ran it.
        precision: ``"fp32"`` or ``"fp16"``.
        atol: tolerance relative to each output's scale (fp32: a row passes when its max abs error is
            at most ``atol`` x max(1, max |PyTorch value|)), or None (fp16, int8: cosine criterion only).
        min_cosine_required: cosine threshold (fp16 rows and the preprocessing check).
        rows: one per (batch size, image size, output).
        preprocessing: the PIL comparison for graphs with baked preprocessing, else None.
    """

    path: str
    provider: str
    precision: str
    atol: float | None
    min_cosine_required: float
    rows: tuple[ValidationRow, ...]
    preprocessing: PreprocessingCheck | None = None

    @property
    def passed(self) -> bool:
        return all(row.passed for row in self.rows) and (
            self.preprocessing is None or self.preprocessing.passed
        )

    @property
    def max_abs_error(self) -> float:
        """Worst absolute error over the network rows."""
        return max(row.max_abs_error for row in self.rows)

    @property
    def min_cosine(self) -> float:
        """Worst cosine over the network rows."""
        return min(row.min_cosine for row in self.rows)

    def to_dict(self) -> dict:
        """JSON-compatible dict (for ``--report-json``)."""
        return {**asdict(self), "passed": self.passed}

    def format_table(self) -> str:
        """Markdown table of the rows, then the preprocessing check."""
        criterion = (
            f"max abs <= {self.atol:g} x max(1, max |PyTorch value|)"
            if self.atol is not None
            else f"cosine >= {self.min_cosine_required}"
        )
        lines = [
            f"ONNX Runtime ({self.provider}, {self.precision}) vs PyTorch for {self.path}; "
            f"criterion: {criterion}",
            "",
            "| batch | H x W | output | max abs error | min cosine | ok |",
            "|---:|---|---|---:|---:|---|",
        ]
        for row in self.rows:
            status = "yes" if row.passed else f"NO {row.error}".strip()
            lines.append(
                f"| {row.batch_size} | {row.image_size[0]}x{row.image_size[1]} | {row.output} | "
                f"{row.max_abs_error:.2e} | {row.min_cosine:.7f} | {status} |"
            )
        if self.preprocessing is not None:
            check = self.preprocessing
            lines += [
                "",
                f"Baked preprocessing vs PIL/timm on {check.num_images} images: pixels max "
                f"{check.max_pixel_error:g} levels (limit {MAX_PIXEL_LEVELS:g}), "
                f"{100 * check.fraction_pixels_differing:.3f}% differ; embeddings max abs "
                f"{check.max_abs_error:.2e}, min cosine {check.min_cosine:.7f}: "
                f"{'ok' if check.passed else 'FAILED'}",
            ]
        return "\n".join(lines)


def _compare(onnx_out: np.ndarray, torch_out: np.ndarray) -> tuple[float, float]:
    """Max absolute error and the smallest cosine between matching last-axis vectors."""
    ours, ref = onnx_out.astype(np.float64), torch_out.astype(np.float64)
    ours, ref = ours.reshape(-1, ours.shape[-1]), ref.reshape(-1, ref.shape[-1])
    cosine = (ours * ref).sum(-1) / np.maximum(
        np.linalg.norm(ours, axis=-1) * np.linalg.norm(ref, axis=-1), 1e-30
    )
    return float(np.abs(ours - ref).max()), float(cosine.min())


def _smooth_images(count: int, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """(N, H, W, 3) uint8: photo-like low-frequency content plus 8-bit noise (edges, textures)."""
    images = []
    for _ in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize((size[1], size[0]), Image.BICUBIC), dtype=np.int16)
        noise = rng.integers(-12, 13, smooth.shape)
        images.append(np.clip(smooth + noise, 0, 255).astype(np.uint8))
    return np.stack(images)


def default_min_cosine(precision: str) -> float:
    """The cosine an fp16 or int8 graph (``precision`` from its metadata) must keep with PyTorch."""
    return INT8_MIN_COSINE if precision == "int8" else FP16_MIN_COSINE


def validate_onnx(
    model: torch.nn.Module,
    path: str | Path,
    *,
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES,
    providers: str | list[str] | None = None,
    atol: float = 1e-4,
    min_cosine: float | None = None,
    seed: int = 0,
    raise_on_failure: bool = True,
) -> ValidationReport:
    """Compare an exported graph with the PyTorch encoder it came from.

    Args:
        model: the float32 :class:`~visreg_hub.models.VISRegEncoder` that was exported.
        path: the ``.onnx`` file (its metadata says pooling, outputs, input kind and precision).
        batch_sizes: batch sizes to run; a static-batch graph is run at its batch size only.
        providers: ONNX Runtime providers (None: best available); the report names the one used.
        atol: max absolute error allowed for fp32 graphs, per unit of the output's scale (the bound of a
            row is ``atol`` x max(1, max |PyTorch value|)).
        min_cosine: min per-vector cosine for fp16 and int8 graphs and for the preprocessing check;
            None: :func:`default_min_cosine` of the graph's precision (the threshold its export used).
        seed: seed of the random inputs.
        raise_on_failure: raise :class:`OnnxValidationError` when a criterion fails (else just return).

    Returns:
        The :class:`ValidationReport` (also logged at INFO).

    Raises:
        OnnxValidationError: a criterion failed (the message names the worst row; ``.report`` has all).
    """
    require_extra("onnxruntime", onnx_extra())
    meta = read_onnx_metadata(path)
    if min_cosine is None:
        min_cosine = default_min_cosine(meta.precision)
    _check_same_model(meta, model, path)
    info = create_session(path, providers=providers, fp16=meta.precision == "fp16")
    check_graph_signature(info.session, meta, repr(str(path)))
    session, fp16 = info.session, meta.precision in ("fp16", "int8")  # both judged by cosine
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    sizes = [tuple(meta.image_size)]
    if meta.dynamic_image_size:  # a second, non-square size exercises the position-embedding resampling
        sizes.append((config.img_size + 2 * config.patch_size, config.img_size + config.patch_size))
    if not meta.dynamic_batch:
        batch_sizes = (1,)
    pre_session = spec = None
    if meta.has_preprocessing:
        ort = require_extra("onnxruntime", onnx_extra())
        spec = PreprocessingSpec.from_data_config(meta.data_config, meta.image_size, meta.input_layout)
        pre_session = ort.InferenceSession(
            preprocessing_model(spec, meta.opset).SerializeToString(), providers=["CPUExecutionProvider"]
        )

    def to_graph_layout(images: np.ndarray) -> np.ndarray:  # (N, H, W, 3) -> the graph's layout
        return images if meta.input_layout == "NHWC" else np.ascontiguousarray(images.transpose(0, 3, 1, 2))

    def reference(pixels: torch.Tensor) -> list[np.ndarray]:
        pixels = pixels.to(model.device)
        outputs = [model(pixels, pooling=meta.pooling)]
        if "patch_tokens" in meta.outputs:
            outputs.append(model.patch_tokens(pixels))
        return [out.float().cpu().numpy() for out in outputs]

    rows = []
    with inference_state(model, model.device), torch.inference_mode():
        for size_index, size in enumerate(sizes):
            for batch in batch_sizes if size_index == 0 else batch_sizes[:2]:
                if pre_session is not None:
                    feed = to_graph_layout(_smooth_images(batch, size, rng))
                    pixels = torch.from_numpy(pre_session.run(None, {meta.input_name: feed})[0])
                else:
                    pixels = torch.randn(batch, config.in_chans, *size, generator=generator)
                    feed = pixels.numpy()
                try:
                    got = session.run(list(meta.outputs), {meta.input_name: feed})
                except Exception as exc:  # a baked batch/image size fails inside ONNX Runtime
                    message = str(exc).strip().splitlines()[0][:300]
                    rows.append(ValidationRow(batch, size, "all", float("nan"), float("nan"), False, message))
                    continue
                for name, ours, ref in zip(meta.outputs, got, reference(pixels)):
                    if ours.shape != ref.shape:
                        error = f"shape {ours.shape} != PyTorch {ref.shape}"
                        rows.append(
                            ValidationRow(batch, size, name, float("nan"), float("nan"), False, error)
                        )
                        continue
                    max_abs, cos = _compare(ours, ref)
                    allowed = None if fp16 else atol * max(1.0, float(np.abs(ref).max()))
                    passed = cos >= min_cosine if fp16 else max_abs <= allowed
                    rows.append(ValidationRow(batch, size, name, max_abs, cos, bool(passed), "", allowed))
        check = _check_preprocessing(
            model, session, pre_session, spec, meta, rng, min_cosine, to_graph_layout
        )
    report = ValidationReport(
        str(path), info.active, meta.precision, None if fp16 else atol, min_cosine, tuple(rows), check
    )
    logger.info("%s", report.format_table())
    if raise_on_failure and not report.passed:
        raise OnnxValidationError(_failure_message(report), report)
    return report


# the ModelConfig fields that shape the network: a graph validated against a model that differs in one
# of them was exported from another model (its name, pooling and card data may differ harmlessly)
_NETWORK_FIELDS = ("architecture", "img_size", "patch_size", "embed_dim", "depth", "num_heads", "in_chans",
                   "mlp_ratio", "num_reg_tokens", "qkv_bias", "init_values")  # fmt: skip


def _check_same_model(meta, model: torch.nn.Module, path: str | Path) -> None:
    """Refuse to compare a graph with a model it was not exported from (the comparison would only print
    ONNX Runtime's shape errors, or differences that say nothing about the export)."""
    ours = model.config.to_dict()
    differs = [
        f"{name} {meta.model_config.get(name)!r} (graph) vs {ours.get(name)!r} (model)"
        for name in _NETWORK_FIELDS
        if meta.model_config.get(name) != ours.get(name)
    ]
    if differs:
        exported_from = meta.model_name or meta.model_config.get("architecture", "another model")
        raise UserInputError(
            f"{path} was exported from {exported_from!r}, not from this model ({', '.join(differs)}); "
            "validate it against the model it was exported from"
        )


def _check_preprocessing(model, session, pre_session, spec, meta, rng, min_cosine, to_graph_layout):
    """The whole graph on uint8 images vs PyTorch on the same images preprocessed by PIL (timm's path)."""
    if pre_session is None:
        return None
    preprocessor = Preprocessor(meta.data_config)
    images = _smooth_images(8, spec.image_size, rng)
    pil_uint8 = torch.stack([preprocessor(Image.fromarray(image)) for image in images])  # (N, 3, h, w)
    graph_pixels = pre_session.run(None, {meta.input_name: to_graph_layout(images)})[0]
    std = np.asarray(spec.std, np.float64).reshape(1, -1, 1, 1)
    mean = np.asarray(spec.mean, np.float64).reshape(1, -1, 1, 1)
    levels = (graph_pixels.astype(np.float64) * std + mean) * 255.0  # back to 8-bit levels
    pixel_error = np.abs(levels - pil_uint8.numpy().astype(np.float64))
    reference = model(preprocessor.normalize(pil_uint8).to(model.device), pooling=meta.pooling).float().cpu()
    ours = session.run(["embedding"], {meta.input_name: to_graph_layout(images)})[0]
    max_abs, cos = _compare(ours, reference.numpy())
    max_pixel = float(pixel_error.max())
    return PreprocessingCheck(
        len(images), round(max_pixel, 3), float((pixel_error > 0.5).mean()), max_abs, cos,
        bool(max_pixel <= MAX_PIXEL_LEVELS and cos >= min_cosine),
    )  # fmt: skip


def _failure_message(report: ValidationReport) -> str:
    return (
        f"ONNX export {report.path} does not match PyTorch ({report.precision}, {report.provider}): "
        + failure_summary(report)
    )


def failure_summary(report: ValidationReport) -> str:
    """What failed (the worst row, how many) and what to try, without the file's path."""
    failed = [row for row in report.rows if not row.passed]
    parts = []
    if failed:
        worst = failed[0] if failed[0].error else max(failed, key=lambda r: r.max_abs_error)
        where = f"batch {worst.batch_size}, {worst.image_size[0]}x{worst.image_size[1]}, {worst.output}"
        if worst.error:
            parts.append(f"ONNX Runtime failed at {where}: {worst.error}")
        elif worst.allowed_abs_error is not None:
            parts.append(
                f"max abs error {worst.max_abs_error:.3g} > {worst.allowed_abs_error:.3g} at {where}"
            )
        else:
            parts.append(f"cosine {worst.min_cosine:.6f} < {report.min_cosine_required} at {where}")
        parts.append(f"{len(failed)} of {len(report.rows)} checks failed")
    check = report.preprocessing
    if check is not None and not check.passed:
        parts.append(
            f"baked preprocessing differs from PIL by up to {check.max_pixel_error:g} levels "
            f"(cosine {check.min_cosine:.6f})"
        )
    return "; ".join(parts) + f". {_failure_hint(report, failed)}"


def _failure_hint(report: ValidationReport, failed: list[ValidationRow]) -> str:
    """What to try, for the kind of failure: the hint must fit what went wrong."""
    if any(math.isnan(row.max_abs_error) and not row.error for row in failed):
        return "The outputs hold NaN or inf (a value no tolerance can compare); check the model's weights"
    if any(row.error for row in failed):  # the graph did not run at some batch or image size
        return "Re-export with dynamic_batch=True (or at the batch size it failed at), or a newer opset"
    if report.precision == "fp16":
        return "fp16 loses too much for this model; export in fp32 (fp16=False)"
    if report.precision == "int8":
        return "int8 loses too much for this model; export in fp32, or calibrate on your images (static int8)"
    if failed:  # fp32 numbers that differ beyond float32 rounding: not something an option fixes
        return (
            "fp32 should match to rounding; please report it with this message, and use backend='torch' "
            "for this model meanwhile"
        )
    return "Export without baked preprocessing, or report it if the images are ordinary"
