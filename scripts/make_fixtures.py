"""Regenerate the small real-image fixtures committed under tests/fixtures/.

Sources (see ../shared/DATA.md):
- Fashion-MNIST (MIT licence), Debian package ``dataset-fashion-mnist``: 50 training and 20 test images
  per class, the first ones of each class in file order.
- scikit-image sample photos (public domain / CC0 per their docstrings): astronaut, chelsea, coffee,
  rocket, downscaled to 160 px on the long side.

Usage: ``apt-get install dataset-fashion-mnist && python scripts/make_fixtures.py``
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
from PIL import Image

SOURCE = Path("/usr/share/datasets/fashion-mnist")
OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures"


def read_idx(split: str) -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(SOURCE / f"{split}-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(SOURCE / f"{split}-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    return images, labels


def first_per_class(images: np.ndarray, labels: np.ndarray, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)])
    keep.sort()
    return images[keep], labels[keep]


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    subsets = [("train", "fmnist_train_500.npz", 50), ("t10k", "fmnist_test_200.npz", 20)]
    for split, name, per_class in subsets:
        images, labels = first_per_class(*read_idx(split), per_class)
        np.savez_compressed(OUT / name, images=images, labels=labels)
    import skimage.data

    photos = OUT / "photos"
    photos.mkdir(exist_ok=True)
    for name in ["astronaut", "chelsea", "coffee", "rocket"]:
        image = Image.fromarray(getattr(skimage.data, name)())
        image.thumbnail((160, 160), Image.Resampling.LANCZOS)
        image.save(photos / f"{name}.jpg", quality=90)


if __name__ == "__main__":
    main()
