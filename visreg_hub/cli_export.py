"""``visreg-hub export onnx MODEL OUT.onnx``: export, validate against PyTorch, print the report.

Registered from :func:`visreg_hub.cli.build_parser` (kept here so cli.py stays short). Thin: parses the
flags and calls :func:`visreg_hub.inference.onnx.export_onnx`.

    visreg-hub export onnx vit-b16-in1k vit-b16.onnx                          # fp32, dynamic batch
    visreg-hub export onnx vit-b16-in1k vit-b16-fp16.onnx --fp16 --optimize   # for ONNX Runtime on a GPU
    visreg-hub export onnx ./my-model model.onnx --with-preprocessing --image-size 480 640
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

from visreg_hub.argtypes import user_path
from visreg_hub.errors import UserInputError

logger = logging.getLogger("visreg_hub.cli")
MAX_VALIDATION_BATCH = 1024


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        sizes = ()
    if not sizes or any(size < 1 for size in sizes):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    if max(sizes) > MAX_VALIDATION_BATCH:  # each batch is built in memory (1e8 images: ~300 GB)
        raise argparse.ArgumentTypeError(
            f"batch sizes up to {MAX_VALIDATION_BATCH} (the check builds each batch in memory), got {text!r}"
        )
    return sizes


def add_onnx_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``export onnx`` (shared with ``python -m export.export``)."""
    parser.add_argument("model", help="registry name, Hub repo (org/name) or model folder")
    parser.add_argument("output", type=user_path, help="the .onnx file to write")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset, 18-25 (default 18)")
    parser.add_argument("--pooling", help="cls | cls_last2 | cls_last4 | mean_patch (default: the model's)")
    parser.add_argument("--static-batch", action="store_true", help="fix the batch size to 1")
    parser.add_argument(
        "--static-image-size", action="store_true", help="fix H, W even if the model accepts other sizes"
    )
    parser.add_argument("--fp16", action="store_true", help="float16 inside the graph (float32 in/out)")
    parser.add_argument("--optimize", action="store_true", help="ORT attention/LayerNorm/GELU fusions")
    parser.add_argument(
        "--int8",
        action="store_true",
        help="int8 linear layers for CPUs (dynamic, or static with calibration)",
    )
    parser.add_argument(
        "--calibration-images",
        nargs="+",
        metavar="PATH",
        help="with --int8: image files or folders (up to 256 images) for static quantisation",
    )
    parser.add_argument("--patch-tokens", action="store_true", help="add the (B,h,w,D) patch_tokens output")
    parser.add_argument(
        "--with-preprocessing",
        action="store_true",
        help="take uint8 RGB images of one fixed size and resize/crop/normalise in the graph",
    )
    parser.add_argument(
        "--image-size", type=int, nargs="+", metavar="N", help="uint8 input size H [W] (default: model's)"
    )
    parser.add_argument("--image-layout", choices=("NHWC", "NCHW"), default="NHWC", help="uint8 input layout")
    parser.add_argument(
        "--validation-batch-sizes",
        type=parse_batch_sizes,
        default=(1, 3, 17, 64),
        help="batch sizes of the ONNX Runtime vs PyTorch check (default 1,3,17,64)",
    )
    parser.add_argument("--provider", help="provider of the check: cpu, cuda, tensorrt (default: best)")
    parser.add_argument("--device", help="where PyTorch runs the model for export and check (default: cpu)")
    parser.add_argument(
        "--report-json", type=user_path, help="also write the validation report as JSON to this file"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing output file (default: refuse)"
    )


def cmd_export_onnx(args: argparse.Namespace) -> int:
    from visreg_hub.hub import from_pretrained
    from visreg_hub.inference.onnx import OnnxValidationError, export_onnx
    from visreg_hub.inference.onnx.export import check_output_path

    output = Path(args.output).expanduser()
    check_output_path(output)  # before loading the model; a folder: --overwrite could not help either
    if (output.exists() or output.is_symlink()) and not args.overwrite:
        raise UserInputError(
            f"{output} already exists; pass --overwrite to replace it, or choose another output"
        )
    _check_report_path(args.report_json, output)
    _check_inputs(args)
    image_size = None
    if args.image_size:
        if len(args.image_size) > 2:
            raise UserInputError(f"--image-size takes H or H W, got {args.image_size}")
        image_size = tuple(args.image_size) if len(args.image_size) == 2 else args.image_size[0]
    model = from_pretrained(args.model, device=args.device or "cpu")
    try:
        report = export_onnx(
            model,
            args.output,
            opset=args.opset,
            pooling=args.pooling,
            dynamic_batch=not args.static_batch,
            dynamic_image_size=False if args.static_image_size else None,
            fp16=args.fp16,
            with_preprocessing=args.with_preprocessing,
            image_size=image_size,
            image_layout=args.image_layout,
            patch_tokens=args.patch_tokens,
            optimize=args.optimize,
            int8=args.int8,
            calibration_images=args.calibration_images,
            validation_batch_sizes=args.validation_batch_sizes,
            validation_providers=args.provider,
        )
    except OnnxValidationError as exc:
        print(exc.report.format_table(), file=sys.stderr)
        _write_report(args.report_json, exc.report)
        raise
    except ValueError as exc:  # the library names its keyword arguments; a CLI user knows the flags
        raise UserInputError(as_flags(str(exc))) from None
    print(report.format_table())
    _write_report(args.report_json, report)
    print(f"wrote {args.output} ({Path(args.output).stat().st_size / 2**20:.1f} MiB), validated: passed")
    return 0


# export_onnx keyword -> the flag that sets it (dynamic_image_size is set by --static-image-size)
_FLAGS = {
    "with_preprocessing": "--with-preprocessing", "image_size": "--image-size",
    "image_layout": "--image-layout", "int8": "--int8", "fp16": "--fp16", "optimize": "--optimize",
    "patch_tokens": "--patch-tokens",
    "calibration_images": "--calibration-images", "validation_batch_sizes": "--validation-batch-sizes",
    "opset": "--opset", "pooling": "--pooling",
}  # fmt: skip


def as_flags(message: str) -> str:
    """``message`` with export_onnx's keyword names (``int8=True``, ``with_preprocessing``) as CLI flags.

    A name followed by ``(`` is a method (``patch_tokens()``), not a keyword, and stays as it is.
    """
    pattern = r"\b(" + "|".join(_FLAGS) + r")(=True)?\b(?!\()"
    return re.sub(pattern, lambda match: _FLAGS[match.group(1)], message)


def _check_inputs(args: argparse.Namespace) -> None:
    """Refuse a misspelt --provider and missing or empty --calibration-images before the model loads
    (export_onnx checks them again before exporting; this spares the download and the load)."""
    from visreg_hub.inference.onnx.quantize import calibration_sources
    from visreg_hub.inference.onnx.runtime import provider_names

    if args.provider is not None:
        try:
            provider_names(args.provider)
        except ValueError as exc:
            raise UserInputError(f"--provider: {exc}") from None
    if args.calibration_images and not args.int8:
        raise UserInputError(
            "--calibration-images only applies with --int8 (static quantisation); add --int8"
        )
    if args.calibration_images:
        try:
            calibration_sources(args.calibration_images)
        except ValueError as exc:
            raise UserInputError(as_flags(str(exc))) from None


def _check_report_path(report: str | None, output: Path) -> None:
    """Refuse a --report-json that would overwrite the graph or cannot be written, before the export."""
    if not report:
        return
    path = Path(report)
    if path.resolve() == output.resolve():
        raise UserInputError(f"--report-json {report} is the output file; name another file for the report")
    if path.is_dir():
        raise UserInputError(f"--report-json {report} is a folder; name a file, e.g. {path / 'report.json'}")
    if not path.parent.resolve().is_dir():
        raise UserInputError(f"--report-json {report}: the folder {path.parent} does not exist")


def _write_report(path: str | None, report) -> None:
    if path:
        Path(path).write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")


def add_export_parser(commands, common: argparse.ArgumentParser) -> None:
    """Add ``export`` (with its ``onnx`` action) to the ``visreg-hub`` sub-commands."""
    parser = commands.add_parser("export", parents=[common], help="export a model for other runtimes")
    formats = parser.add_subparsers(dest="export_format", metavar="FORMAT")
    onnx = formats.add_parser(
        "onnx", parents=[common], help="export to ONNX and check it with ONNX Runtime against PyTorch"
    )
    add_onnx_arguments(onnx)
    onnx.set_defaults(func=cmd_export_onnx)
    parser.set_defaults(func=None, subparser=parser)
