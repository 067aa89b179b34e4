"""Markdown table of the method comparison written by training/experiments/fmnist_methods.sh.

Usage: ``python training/experiments/summarize.py runs/compare`` (prints the table).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ORDER = ["visreg", "sigreg", "swd", "vicreg", "barlow", "lt-visreg", "lt-visreg-star", "lt-sigreg"]
LABELS = {"lt-visreg": "VISReg (long-tailed)", "lt-visreg-star": "VISReg* (long-tailed, shape x2)",
          "lt-sigreg": "SIGReg (long-tailed)"}  # fmt: skip


def row(name: str, result: dict) -> str:
    knn = result["knn"]
    cells = [
        LABELS.get(name, name),
        f"{knn['20']:.2f}",
        f"{knn['200']:.2f}",
        f"{result['linear']['accuracy']:.2f}",
    ]
    groups = result.get("groups", {}).get("linear probe")
    # a group with no class (e.g. no class under 20 images) has no accuracy: shown as a dash
    cells += (
        [f"{groups[g]:.2f}" if g in groups else "-" for g in ("many", "medium", "few")]
        if groups
        else [""] * 3
    )
    return "| " + " | ".join(cells) + " |"


def main(folder: str) -> None:
    root = Path(folder)
    print("| method | kNN k=20 | kNN k=200 | linear probe | LP many | LP medium | LP few |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in ORDER:
        path = root / name / "eval.json"
        if path.is_file():
            print(row(name, json.loads(path.read_text())))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/compare")
