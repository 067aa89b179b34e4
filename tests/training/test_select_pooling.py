"""scripts/select_pooling.py's colour scores: per source, on halves of the training bank fixed by the seed."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from visreg_hub.retrieval.metrics import knn_accuracy

REPO = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("_select_pooling", REPO / "scripts" / "select_pooling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class Item:
    path: str
    label: str


def _bank(labels: list[str], prefix: str) -> list[Item]:
    return [Item(f"{prefix}-{i}", label) for i, label in enumerate(labels)]


def test_colour_scores_use_the_same_halves_for_every_feature():
    select = _script()
    sets = {
        "a": (_bank(["x"] * 6 + ["y"] * 6 + ["z"] * 5, "a"), []),
        "b": (_bank(["p"] * 8 + ["q"] * 7, "b"), []),
    }
    rng = np.random.default_rng(1)
    noise = {item.path: rng.normal(size=8) for bank, _ in sets.values() for item in bank}
    centres = {label: rng.normal(size=8) * 3 for label in "xyzpq"}

    def separable(bank):  # label centre + noise: perfectly separable here
        return np.stack([centres[item.label] + 0.01 * noise[item.path] for item in bank])

    def random(bank):
        return np.stack([noise[item.path] for item in bank])

    assert select.colour_scores(separable, seed=0, sets=sets) == {"a": 100.0, "b": 100.0}
    # noise features, scored against an independent recomputation of the seeded per-class halves
    scores = select.colour_scores(random, seed=3, sets=sets)
    halves_rng = np.random.default_rng(3)
    for name, (bank, _) in sets.items():
        labels = np.array([item.label for item in bank])
        half = np.zeros(len(bank), bool)
        for label in np.unique(labels):
            members = np.flatnonzero(labels == label)
            half[halves_rng.permutation(members)[: len(members) // 2]] = True
        features = random(bank).astype(np.float32)
        _, codes = np.unique(labels, return_inverse=True)
        expected = 100 * knn_accuracy(features[half], codes[half], features[~half], codes[~half], k=10)
        assert scores[name] == expected
    assert select.colour_scores(random, seed=3, sets=sets) == scores  # the seed alone fixes the halves
