"""The numbers of the bundled models, computed one way for docs/results.md and for the model cards.

``scripts/model_table.py`` calls these functions and renders the tables;
``tests/training/test_model_table.py`` recomputes the fixture row on the committed Fashion-MNIST
fixtures and compares it with docs/results.md.

Fashion-MNIST protocol (:func:`fmnist_rows`): frozen features of the 60,000 training and 10,000 test images
(model's own preprocessing via ``encode``); weighted kNN (cosine, T 0.07) at k = 20 and 200 over the whole
training set, on the default pooling; a linear probe (standardised features, logistic regression; the
feature tap and C chosen together on a 10 % validation split of train, refit, tested once;
``training.evaluate.linear_probe``). Raw pixels (784 values in [0, 1]) go through exactly the same kNN and
probe.

Colour protocol: ``training.source_eval`` (held-out split of ``training/sources``).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from visreg_hub.retrieval.metrics import knn_accuracy

PROBE_CS = (1e-2, 1e-1, 1.0, 10.0)
FIXTURE_ROW = re.compile(
    r"^\| fixture check \| `(?P<model>[^`]+)` \| (?P<n_train>\d+) / (?P<n_test>\d+) \| "
    r"(?P<model_knn>[\d.]+) \| (?P<raw_knn>[\d.]+) \|$",
    re.MULTILINE,
)


def encode_array(model, images: np.ndarray, batch_size: int = 512, pooling: str | None = None) -> np.ndarray:
    """(N, H, W[, C]) uint8 -> (N, E) float32 features through ``model.encode`` (not normalised)."""
    return model.encode(list(images), batch_size=batch_size, pooling=pooling, normalize=False,
                        convert_to_numpy=True, show_progress_bar=False)  # fmt: skip


def feature_taps(model) -> tuple[str, ...]:
    """The model's default pooling first, then every other tap its depth allows."""
    from visreg_hub.models import poolings_for_depth

    default = model.config.pooling
    return (default, *[p for p in poolings_for_depth(model.config.depth) if p != default])


def raw_pixel_features(images: np.ndarray) -> np.ndarray:
    """(N, H, W[, C]) uint8 -> (N, H*W*C) float32 in [0, 1]."""
    return images.reshape(len(images), -1).astype(np.float32) / 255.0


def knn_row(train_x, train_y, test_x, test_y, ks=(20, 200)) -> dict[str, float]:
    return {f"knn@{k}": 100.0 * knn_accuracy(train_x, train_y, test_x, test_y, k=k) for k in ks}


def fmnist_rows(
    models: dict, train, test, probe: bool = True, ks=(20, 200), seed: int = 0, cs=PROBE_CS
) -> dict:
    """``{method: {"knn@20", "knn@200", "linear", "linear_c", "linear_tap", "dim"}}`` for each model in
    ``models`` and for raw pixels.

    kNN uses each model's default pooling (what ``encode()`` returns). The linear probe chooses the
    feature tap (:func:`feature_taps`) together with C on its validation split, as DINO's linear evaluation
    chooses how many blocks' CLS tokens to concatenate; raw pixels have one tap.

    Args:
        models: display name -> loaded encoder.
        train, test: (uint8 images (N, 28, 28), int64 labels (N,)) pairs.
    """
    from training.evaluate import linear_probe

    (train_images, train_y), (test_images, test_y) = train, test
    taps = {}  # method -> {tap: (train features, test features)}, the default tap first
    for name, model in models.items():
        taps[name] = {
            tap: (
                encode_array(model, train_images, pooling=tap),
                encode_array(model, test_images, pooling=tap),
            )
            for tap in (feature_taps(model) if probe else (model.config.pooling,))
        }
    taps["raw pixels (784-d)"] = {
        "pixels": (raw_pixel_features(train_images), raw_pixel_features(test_images))
    }
    rows = {}
    for name, method_taps in taps.items():
        default_tap = next(iter(method_taps))
        train_x, test_x = method_taps[default_tap]
        row = knn_row(train_x, train_y, test_x, test_y, ks)
        row["dim"] = int(train_x.shape[1])
        if probe:
            train_taps = {tap: x for tap, (x, _) in method_taps.items()}
            test_taps = {tap: x for tap, (_, x) in method_taps.items()}
            result = linear_probe(train_taps, train_y, test_taps, test_y, val_fraction=0.1, seed=seed, cs=cs)
            row["linear"], row["linear_c"] = result["accuracy"], result["best_c"]
            row["linear_tap"], row["linear_dim"] = result["tap"], int(train_taps[result["tap"]].shape[1])
        rows[name] = row
    return rows


def fixture_row(model, fixtures: Path) -> dict:
    """kNN@20 of ``model`` and of raw pixels on the committed 500 / 200 Fashion-MNIST fixture images."""
    train = np.load(fixtures / "fmnist_train_500.npz")
    test = np.load(fixtures / "fmnist_test_200.npz")
    model_row = knn_row(encode_array(model, train["images"]), train["labels"],
                        encode_array(model, test["images"]), test["labels"], ks=(20,))  # fmt: skip
    raw_row = knn_row(raw_pixel_features(train["images"]), train["labels"],
                      raw_pixel_features(test["images"]), test["labels"], ks=(20,))  # fmt: skip
    return {"n_train": len(train["labels"]), "n_test": len(test["labels"]),
            "model_knn": model_row["knn@20"], "raw_knn": raw_row["knn@20"]}  # fmt: skip


def render_fixture_row(name: str, row: dict) -> str:
    return (f"| fixture check | `{name}` | {row['n_train']} / {row['n_test']} | {row['model_knn']:.2f} | "
            f"{row['raw_knn']:.2f} |")  # fmt: skip


def parse_fixture_row(markdown: str) -> dict:
    """The fixture row written by :func:`render_fixture_row` (the test recomputes it)."""
    match = FIXTURE_ROW.search(markdown)
    if match is None:
        raise ValueError("docs/results.md has no fixture check row; run scripts/model_table.py")
    row = match.groupdict()
    return {"model": row["model"], "n_train": int(row["n_train"]), "n_test": int(row["n_test"]),
            "model_knn": float(row["model_knn"]), "raw_knn": float(row["raw_knn"])}  # fmt: skip


def render_fmnist(rows: dict) -> list[str]:
    lines = ["| method | dim | kNN k=20 | kNN k=200 | linear probe |", "|---|---:|---:|---:|---:|"]
    for name, row in rows.items():
        linear = f"{row['linear']:.2f}" if "linear" in row else "-"
        if row.get("linear_tap") not in (None, "pixels"):
            linear += f" ({row['linear_tap']}, {row['linear_dim']}-d)"
        lines.append(f"| {name} | {row['dim']} | {row['knn@20']:.2f} | {row['knn@200']:.2f} | {linear} |")
    return lines


def render_colour(table: dict, metric: str) -> list[str]:
    """``table``: {method: {source: {metric: value, ...}}} -> one markdown table of ``metric``."""
    methods = list(table)
    sources = list(next(iter(table.values())))
    first = table[methods[0]]
    header = "| method | " + " | ".join(f"{s} ({first[s]['n_test']} test, {first[s]['n_classes']} cl.)"
                                         for s in sources) + " | mean |"  # fmt: skip
    lines = [header, "|---|" + "---:|" * (len(sources) + 1)]
    for method in methods:
        values = [table[method][s][metric] for s in sources]
        cells = " | ".join(f"{v:.1f}" for v in values)
        lines.append(f"| {method} | {cells} | {np.mean(values):.1f} |")
    return lines


def colour_verdict(table: dict, metric: str = "knn") -> str:
    """One plain sentence: on how many sources the first row (ours) beats each other row, the mean gap."""
    names = list(table)
    ours = table[names[0]]
    sources = list(ours)
    parts = []
    for name in names[1:]:
        wins = [s for s in sources if ours[s][metric] > table[name][s][metric]]
        gap = float(np.mean([ours[s][metric] - table[name][s][metric] for s in sources]))
        parts.append(f"{name}: better on {len(wins)} of {len(sources)} sources "
                     f"({', '.join(wins) or 'none'}), mean difference {gap:+.1f} points")  # fmt: skip
    return f"Held-out {metric} of {names[0]} against each other method: " + "; ".join(parts) + "."


def replace_section(document: str, marker: str, body: str) -> str:
    """Replace the text between ``<!-- marker:begin -->`` and ``<!-- marker:end -->`` (append if absent)."""
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in document and end in document:
        head, rest = document.split(begin, 1)
        return head + block + rest.split(end, 1)[1]
    return document.rstrip() + "\n\n" + block + "\n"
