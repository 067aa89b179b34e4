"""Choose a bundled model's default feature tap on a validation split of its TRAINING data (never test).

Usage::

    python scripts/select_pooling.py vit-mini-p7-fmnist --data fmnist

Splits the 60,000 Fashion-MNIST training images into a seeded 5,000-image validation set and a 55,000-image
kNN bank, and prints weighted kNN@20 (cosine, T 0.07) for every pooling of ``visreg_hub.models.POOLINGS``.
Writes nothing: set the winner with ``model.config.replace(pooling=...)`` and re-bundle.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.datasets import read_fmnist
from visreg_hub import from_pretrained
from visreg_hub.models.config import POOLINGS
from visreg_hub.retrieval.metrics import knn_accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--data", choices=("fmnist",), default="fmnist")
    parser.add_argument("--fmnist-dir", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--val-size", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    images, labels = read_fmnist(args.fmnist_dir, "train")
    order = np.random.default_rng(args.seed).permutation(len(labels))
    val, bank = order[: args.val_size], order[args.val_size :]
    model = from_pretrained(args.model)
    for pooling in POOLINGS:
        if pooling in ("cls_last2", "cls_last4") and model.config.depth < int(pooling[-1]):
            continue
        features = model.encode(list(images), pooling=pooling, batch_size=512, convert_to_numpy=True,
                                show_progress_bar=False)  # fmt: skip
        accuracy = knn_accuracy(features[bank], labels[bank], features[val], labels[val], k=20)
        print(f"{pooling:12s} val kNN@20 {100 * accuracy:.2f}", flush=True)


if __name__ == "__main__":
    main()
