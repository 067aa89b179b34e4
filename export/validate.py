"""``python -m export.validate MODEL FILE.onnx``: check an exported file against its PyTorch model.

Runs :func:`visreg_hub.inference.onnx.validate_onnx` (ONNX Runtime vs PyTorch at the given batch sizes,
max absolute error and cosine per output) and prints the table. Exit code 0 when every criterion holds,
1 otherwise (or on a user error).

    python -m export.validate vit-b16-in1k vit-b16.onnx --batch-sizes 1,3,17,64 --provider cuda
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from visreg_hub.cli_export import parse_batch_sizes
from visreg_hub.errors import VisregHubError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m export.validate", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="registry name, Hub repo or folder of the model that was exported")
    parser.add_argument("onnx", help="the .onnx file written by export_onnx")
    parser.add_argument(
        "--batch-sizes", type=parse_batch_sizes, default=(1, 3, 17, 64), help="default 1,3,17,64"
    )
    parser.add_argument("--provider", help="cpu, cuda or tensorrt (default: the best available)")
    parser.add_argument(
        "--atol",
        type=float,
        default=1e-4,
        help="fp32 max abs error per unit of output scale: the bound is ATOL x max(1, max |PyTorch value|) "
        "(default 1e-4)",
    )
    parser.add_argument(
        "--min-cosine",
        type=float,
        help="min cosine for fp16 and int8 graphs (default from the graph's precision, as its export: "
        "0.999 for fp16, 0.98 for int8)",
    )
    parser.add_argument("--device", default="cpu", help="where PyTorch runs the reference (default cpu)")
    parser.add_argument("--report-json", help="also write the report as JSON to this file")
    parser.add_argument("-v", "--verbose", action="store_true", help="info logging")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr)
    from visreg_hub.hub import from_pretrained
    from visreg_hub.inference.onnx import validate_onnx

    try:
        model = from_pretrained(args.model, device=args.device)
        report = validate_onnx(
            model, args.onnx, batch_sizes=args.batch_sizes, providers=args.provider, atol=args.atol,
            min_cosine=args.min_cosine, raise_on_failure=False,
        )  # fmt: skip
    except (VisregHubError, OSError, ValueError) as exc:
        print(f"export.validate: error: {exc}", file=sys.stderr)
        return 1
    print(report.format_table())
    if args.report_json:
        Path(args.report_json).write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    print("validation " + ("passed" if report.passed else "FAILED"))
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
