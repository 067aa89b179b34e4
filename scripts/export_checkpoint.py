"""Export the backbone of one training checkpoint as a ``from_pretrained`` folder (for a look mid-run).

Usage::

    python scripts/export_checkpoint.py runs/colour-tiny-cpu runs/colour-tiny-cpu/peek [--step 300]

Reads the run's ``config.yaml`` and ``checkpoints/<step or latest>/model.safetensors`` (safetensors only,
strict), and writes ``save_pretrained`` of the encoder. The finished run's own ``final/`` export is what gets
bundled; this is for interim evaluation.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.build import build_model
from training.config import load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    args = parser.parse_args()
    root = args.run / "checkpoints"
    folder = root / f"step-{args.step:08d}" if args.step else root / (root / "latest").read_text().strip()
    config = load_config(args.run / "config.yaml")
    model = build_model(config)
    model.load_state_dict(load_file(folder / "model.safetensors"), strict=True)
    model.encoder.config = model.encoder.config.replace(name=f"{args.run.name}@{folder.name}")
    model.encoder.eval().save_pretrained(args.output, overwrite_card=True)
    print(f"wrote {args.output} from {folder}")


if __name__ == "__main__":
    main()
