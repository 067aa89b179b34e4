"""``python -m export.export MODEL OUT.onnx [flags]``: the same command as ``visreg-hub export onnx``.

Exports with :func:`visreg_hub.inference.onnx.export_onnx`, validates against PyTorch at batch sizes
1, 3, 17, 64 and prints the report; exit code 1 when validation fails. ``--help`` lists the flags.
"""

from __future__ import annotations

import sys

from visreg_hub.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    """Run ``visreg-hub export onnx`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    return cli_main(["export", "onnx", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
