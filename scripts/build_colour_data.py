"""Build the colour model's training set: the training split of every source plus random crops of photos.

Usage (what produced the bundled ``vit-tiny-p8-colour``'s data)::

    python scripts/prepare_sources.py
    python scripts/build_colour_data.py runs/colour-data/train.npz

Writes one ``.npz`` with ``images`` (N, S, S, 3) uint8 (S = ``--size``, default 72) for the trainer's
``npz`` source, and ``<out>.json`` with the per-source counts. Images held out by
``training/splits/sources-v1.json`` are never read. Transparent PNGs are composited on white (the library's
decoder), every other image is resized on its shorter side and centre-cropped; the high-resolution photos
(endless-sky, wallpapers, opencv, skimage, stellarium at 1024 px) additionally give ``--crops`` random square
crops each (side 25-100 % of the shorter side), which multiplies the distinct photo views the model sees.
``--sources`` replaces the default list (``training.sources.COLOUR_SOURCES``), e.g. to add the opt-in
``game_textures``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training import sources
from visreg_hub.inference.images import ImageSource, decode_image

# Random crops per training image for the photo sources (the rest contribute one centred view).
CROPS = {"endless_sky": 16, "wallpapers": 40, "opencv": 10, "skimage": 30, "stellarium": 1, "ufoai": 1,
         "gimp_patterns": 4}  # fmt: skip


def load_rgb(path: Path, max_side: int = 1024):
    from PIL import Image

    image = decode_image(ImageSource(path, str(path)), max_pixels=None)
    if max(image.size) > max_side:  # crops never need more than this, and it bounds memory and time
        image.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    return image.convert("RGB")


def square(image, box, size: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(image.resize((size, size), Image.Resampling.BICUBIC, box=box), dtype=np.uint8)


def centre_box(width: int, height: int) -> tuple[int, int, int, int]:
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def views(image, count: int, size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """The centred square plus ``count`` random square crops of side 25-100 % of the shorter side."""
    width, height = image.size
    out = [square(image, centre_box(width, height), size)]
    short = min(width, height)
    for _ in range(count):
        side = max(8, int(short * rng.uniform(0.25, 1.0)))
        left, top = rng.integers(0, width - side + 1), rng.integers(0, height - side + 1)
        out.append(square(image, (int(left), int(top), int(left + side), int(top + side)), size))
    return out


def parse_crops(items: list[str]) -> dict[str, int]:
    """``["ufoai=4", ...]`` -> ``{"ufoai": 4}``, refusing unknown sources and negative counts."""
    out = {}
    for item in items:
        name, sep, count = item.partition("=")
        if not sep or not count.isdigit():
            raise SystemExit(f"--crops {item!r}: expected SOURCE=N with N a whole number, e.g. ufoai=4")
        if name not in sources.LISTINGS:
            known = ", ".join(sorted(sources.LISTINGS))
            raise SystemExit(f"--crops {item!r}: unknown source; choose from {known}")
        out[name] = int(count)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--size", type=int, default=72)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default=str(sources.DEFAULT_SPLIT))
    parser.add_argument("--root")
    parser.add_argument(
        "--crops", nargs="+", default=[], metavar="SOURCE=N",
        help="override the random crops per file of a source, e.g. --crops ufoai=4 (default: CROPS)",
    )  # fmt: skip
    parser.add_argument(
        "--sources", nargs="+", choices=sorted(sources.LISTINGS), default=list(sources.COLOUR_SOURCES),
        help="the sources whose training split is read (default: the bundled colour model's)",
    )  # fmt: skip
    args = parser.parse_args()
    crops = {**CROPS, **parse_crops(args.crops)}
    split = sources.load_split(args.split)
    rng = np.random.default_rng(args.seed)
    arrays, counts = [], {}
    for name in sorted(args.sources):
        train, _ = sources.partition(sources.list_source(name, args.root), split, args.root)
        before = len(arrays)
        for item in train:
            try:
                image = load_rgb(item.path)
            except Exception as exc:
                print(f"skip {item.path}: {exc}", file=sys.stderr)
                continue
            arrays += views(image, crops.get(name, 0), args.size, rng)
        counts[name] = {"files": len(train), "views": len(arrays) - before}
        print(name, counts[name], flush=True)
    images = np.stack(arrays)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.output, images=images)
    args.output.with_suffix(".json").write_text(
        json.dumps(
            {"size": args.size, "seed": args.seed, "crops": crops, "total": len(images), "sources": counts},
            indent=1,
        )
    )
    print(f"wrote {args.output}: {images.shape}")


if __name__ == "__main__":
    main()
