"""Package a trained run as a bundled registry model: rename it, attach its test-set numbers, write it.

Usage (what produced visreg_hub/assets/vit-mini-p7-fmnist)::

    python training/pretrain.py --config training/configs/fmnist-bundle-cpu.yaml
    python training/evaluate.py runs/fmnist-bundle-cpu/final --data fmnist --workers 0 \\
        --out runs/fmnist-bundle-cpu/eval.json --markdown runs/fmnist-bundle-cpu/eval.md
    python scripts/bundle_model.py runs/fmnist-bundle-cpu/final runs/fmnist-bundle-cpu/eval.json \\
        visreg_hub/assets/vit-mini-p7-fmnist --name vit-mini-p7-fmnist

Prints the sha256 of the written weights for the registry entry.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from visreg_hub.hub import from_pretrained

DESCRIPTION = (
    "A small VISReg ViT (4 blocks, width 64, 7 px patches, 1-channel 28 px input) trained from scratch by "
    "visreg_hub on the CPU on the 55,000 Fashion-MNIST training images left after a 5,000-image validation "
    "hold-out. It is the default model of the demo and of the tests' end-to-end paths: small (0.5 MB), "
    "fast on a CPU, and meant for clothing-like grayscale images, not for general photos."
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_folder", type=Path, help="save_pretrained folder written by pretrain.py")
    parser.add_argument("eval_json", type=Path, help="JSON written by training/evaluate.py --out")
    parser.add_argument("output", type=Path)
    parser.add_argument("--name", required=True)
    args = parser.parse_args()

    model = from_pretrained(args.run_folder)
    evaluation = json.loads(args.eval_json.read_text())
    command = f"python {evaluation['command']}"
    split = f"test ({evaluation['num_test']} images; kNN bank and probe: {evaluation['num_train']} train)"
    results = [
        {
            "task": f"image-classification (kNN, k={k}, T={evaluation['knn_temperature']})",
            "dataset": "fashion-mnist",
            "metric": "accuracy",
            "value": value,
            "split": split,
            "command": command,
        }
        for k, value in evaluation["knn"].items()
    ]
    results.append(
        {
            "task": f"image-classification (linear probe, C={evaluation['linear']['best_c']} chosen on a "
            "validation split of train)",
            "dataset": "fashion-mnist",
            "metric": "accuracy",
            "value": evaluation["linear"]["accuracy"],
            "split": split,
            "command": command,
        }
    )
    model.config = model.config.replace(name=args.name, extra={**model.config.extra, "eval_results": results})
    model.save_pretrained(
        args.output, eval_results=results, eval_command=command, datasets=["fashion-mnist"],
        license="apache-2.0", description=DESCRIPTION, load_name=args.name,
    )  # fmt: skip
    digest = hashlib.sha256((args.output / "model.safetensors").read_bytes()).hexdigest()
    print(f"wrote {args.output}; model.safetensors sha256 {digest}")


if __name__ == "__main__":
    main()
