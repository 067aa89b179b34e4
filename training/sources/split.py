"""The held-out split of the labelled sources: drawn once (seeded, stratified), recorded as JSON of
relative paths so every machine holds out the same test images (``training/splits/sources-v1.json``)."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from training.sources.listings import COLOUR_SOURCES, Item, list_source
from training.sources.packages import sources_root

DEFAULT_SPLIT = Path(__file__).resolve().parents[1] / "splits" / "sources-v1.json"


def relative_key(item: Item, root=None) -> str:
    """A machine-independent name for ``item``: its path relative to the sources root."""
    return item.path.resolve().relative_to(sources_root(root).resolve()).as_posix()


def make_split(
    items_by_source: dict[str, list[Item]],
    test_fraction: float | dict[str, float] = 0.3,
    min_class_size: int = 5,
    max_test_per_class: int | None = 60,
    seed: int = 0,
    root=None,
) -> dict:
    """Seeded stratified split of labelled sources.

    Per source and class (sorted by relative path, shuffled by ``seed``), ``round(n * fraction)`` images
    (at least 1, at most ``max_test_per_class``) go to test. Classes with fewer than ``min_class_size``
    images are not evaluated (listed under ``dropped_classes``); their images stay for training.

    Returns:
        ``{"seed", "test_fraction", "min_class_size", "sources": {source: {"test": {relpath: label},
        "classes": [...], "dropped_classes": [...]}}}``.
    """
    rng = np.random.default_rng(seed)
    result = {"seed": seed, "test_fraction": test_fraction, "min_class_size": min_class_size,
              "max_test_per_class": max_test_per_class, "sources": {}}  # fmt: skip
    for source in sorted(items_by_source):
        fraction = test_fraction[source] if isinstance(test_fraction, dict) else test_fraction
        by_class: dict[str, list[str]] = defaultdict(list)
        for item in items_by_source[source]:
            if item.label is not None:
                by_class[item.label].append(relative_key(item, root))
        test, classes, dropped = {}, [], []
        for label in sorted(by_class):
            keys = sorted(by_class[label])
            if len(keys) < min_class_size:
                dropped.append(label)
                continue
            classes.append(label)
            count = max(1, round(len(keys) * fraction))
            count = min(count, max_test_per_class) if max_test_per_class else count
            for index in rng.permutation(len(keys))[:count]:
                test[keys[index]] = label
        result["sources"][source] = {"test": dict(sorted(test.items())), "classes": classes,
                                     "dropped_classes": dropped}  # fmt: skip
    return result


def save_split(split: dict, path: str | os.PathLike = DEFAULT_SPLIT) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(split, indent=1, sort_keys=True) + "\n")
    return path


def load_split(path: str | os.PathLike = DEFAULT_SPLIT) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} is missing; run `python scripts/prepare_sources.py`")
    return json.loads(path.read_text())


def training_keys(split: dict, root=None, names: Iterable[str] | None = None) -> set[str]:
    """``relative_key`` of every image a model trained on ``split`` reads: the train portions of the
    sources ``names`` (default: :data:`COLOUR_SOURCES`, the bundled colour model's).

    What ``scripts/build_colour_data.py`` turns into the colour model's training set; used to say which
    evaluation images a model has seen (unlabelled) during pre-training.
    """
    keys: set[str] = set()
    for name in COLOUR_SOURCES if names is None else names:
        train, _ = partition(list_source(name, root), split, root)
        keys.update(relative_key(item, root) for item in train)
    return keys


def partition(items: list[Item], split: dict, root=None) -> tuple[list[Item], list[Item]]:
    """(train, test) for one source's items under ``split``: test items carry their labels, train items
    are everything else (labels of dropped classes removed)."""
    if not items:
        return [], []
    entry = split["sources"].get(items[0].source)
    if entry is None:  # an unlabelled source: all of it trains
        return list(items), []
    test_keys, classes = entry["test"], set(entry["classes"])
    train, test = [], []
    for item in items:
        key = relative_key(item, root)
        if key in test_keys:
            test.append(Item(item.path, test_keys[key], item.source))
        else:
            train.append(item if item.label in classes else Item(item.path, None, item.source))
    return train, test
