"""Choose a bundled model's default feature tap on a validation split of its TRAINING data (never test).

Usage::

    python scripts/select_pooling.py vit-mini-p7-fmnist --data fmnist
    python scripts/select_pooling.py runs/colour-tiny-cpu/final --data colour
    python scripts/select_pooling.py vit-tiny-p8-colour --data colour --img-size 96

``fmnist``: the 60,000 Fashion-MNIST training images are split into a seeded 5,000-image validation set and
a 55,000-image kNN bank; weighted kNN@20 (cosine, T 0.07). ``colour``: per labelled source, the labelled
*training* images (the evaluation bank of ``training.source_eval``; the held-out test split is never read)
are halved (seeded, per class): one half is the bank, the other the queries; weighted kNN@10 per source
and averaged, with the colour-histogram baseline on the same halves. Prints the score of every pooling the
model's depth allows (``visreg_hub.models.poolings_for_depth``). Writes nothing: the winner goes into the
bundled config with ``scripts/bundle_model.py --pooling``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.datasets import read_fmnist
from visreg_hub import from_pretrained
from visreg_hub.models.config import poolings_for_depth
from visreg_hub.retrieval.metrics import knn_accuracy


def colour_scores(features_of, seed: int, sets: dict | None = None) -> dict[str, float]:
    """kNN@10 (%) per labelled source between two seeded halves of its training bank (never the test split).

    ``features_of(items)`` maps the bank's items to an ``(n, D)`` array. The halves depend only on ``seed``,
    so every feature (each pooling, the colour histogram) is scored on the same queries. ``sets``: source
    name -> (bank items, test items), default the labelled sources' evaluation sets.
    """
    from training import source_eval, sources

    sets = source_eval.eval_sets(sources.load_split()) if sets is None else sets
    rng = np.random.default_rng(seed)
    scores = {}
    for name, (bank, _test) in sets.items():
        labels = np.array([item.label for item in bank])
        half = np.zeros(len(bank), bool)
        for label in np.unique(labels):
            members = np.flatnonzero(labels == label)
            half[rng.permutation(members)[: len(members) // 2]] = True
        features = np.asarray(features_of(bank), dtype=np.float32)
        _, codes = np.unique(labels, return_inverse=True)
        scores[name] = 100 * knn_accuracy(features[half], codes[half], features[~half], codes[~half], k=10)
    return scores


def print_colour_table(model, seed: int) -> None:
    """One row per pooling, then the colour-histogram baseline (issue 10's hardest), on the same halves."""
    from training import source_eval

    def tap(pooling):
        return lambda bank: model.encode([str(i.path) for i in bank], pooling=pooling, batch_size=128,
                                         convert_to_numpy=True, show_progress_bar=False)  # fmt: skip

    histogram = source_eval.colour_histogram()
    rows = {pooling: tap(pooling) for pooling in poolings_for_depth(model.config.depth)}
    rows["colour histogram 8x8x8"] = lambda bank: histogram([item.path for item in bank])
    header = None
    for name, features_of in rows.items():
        scores = colour_scores(features_of, seed)
        if header is None:
            header = list(scores)
            print(f"{'train-half kNN@10':24s}" + "".join(f"{s[:13]:>14s}" for s in header) + f"{'mean':>8s}")
        cells = "".join(f"{scores[s]:14.1f}" for s in header)
        print(f"{name:24s}{cells}{np.mean(list(scores.values())):8.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--data", choices=("fmnist", "colour"), default="fmnist")
    parser.add_argument("--fmnist-dir", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--val-size", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--img-size", type=int, default=None,
                        help="embed at this input size instead of the model's (position embeddings "
                        "interpolated; PyTorch backend): is a larger input worth its cost?")  # fmt: skip
    args = parser.parse_args()
    if args.img_size is None:
        model = from_pretrained(args.model)
    else:
        model = from_pretrained(args.model, backend="torch")  # an exported graph has a fixed input size
        model.config = dataclasses.replace(model.config, img_size=args.img_size)  # the preprocessing's size
    poolings = poolings_for_depth(model.config.depth)
    if args.data == "colour":
        print_colour_table(model, args.seed)
        return
    images, labels = read_fmnist(args.fmnist_dir, "train")
    order = np.random.default_rng(args.seed).permutation(len(labels))
    val, bank = order[: args.val_size], order[args.val_size :]
    for pooling in poolings:
        features = model.encode(list(images), pooling=pooling, batch_size=512, convert_to_numpy=True,
                                show_progress_bar=False)  # fmt: skip
        accuracy = knn_accuracy(features[bank], labels[bank], features[val], labels[val], k=20)
        print(f"{pooling:12s} val kNN@20 {100 * accuracy:.2f}", flush=True)


if __name__ == "__main__":
    main()
