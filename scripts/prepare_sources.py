"""Fetch the real image sources of ``training/sources.py`` (apt + PyPI, cached) and record the test split.

Usage::

    python scripts/prepare_sources.py                 # the colour model's sources: fetch, list, count
    python scripts/prepare_sources.py --only endless_sky tuxpaint
    python scripts/prepare_sources.py --only game_textures   # an opt-in source (550 MB of .debs)
    python scripts/prepare_sources.py --write-split   # (re)draw training/splits/sources-v1.json

Idempotent and resumable: downloaded archives and complete unpacks are reused. The cache is
``$VISREG_SOURCES_DIR`` (default ``~/.cache/visreg_hub/sources``). The committed split is never redrawn
unless ``--write-split`` is given, so held-out test images stay fixed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training import sources

# Per-source test fractions: the big clipart set needs a smaller share to keep evaluation cheap.
TEST_FRACTION = {"endless_sky": 0.3, "tuxpaint": 0.3, "openclipart": 0.3, "ufoai": 0.3, "gimp_patterns": 0.3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only", nargs="+", choices=sorted(sources.LISTINGS),
        help="sources to prepare (default: the colour model's, training.sources.COLOUR_SOURCES)",
    )  # fmt: skip
    parser.add_argument("--root", help=f"cache folder (default ${sources.SOURCES_ENV} or ~/.cache/...)")
    parser.add_argument("--write-split", action="store_true", help="redraw the committed test split")
    parser.add_argument("--split", default=str(sources.DEFAULT_SPLIT))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    names = args.only or list(sources.COLOUR_SOURCES)
    packages = sorted({p for name in names for p in sources.SOURCE_PACKAGES[name]})
    sources.fetch(packages, args.root)
    listed = {name: sources.list_source(name, args.root) for name in names}
    for name, items in listed.items():
        labels = Counter(item.label for item in items if item.label is not None)
        print(f"{name:14s} {len(items):5d} images, {len(labels)} labels: {dict(labels.most_common(8))}")
    if args.write_split:
        labelled = {name: items for name, items in listed.items() if name in sources.LABELLED}
        split = sources.make_split(labelled, TEST_FRACTION, root=args.root)
        path = sources.save_split(split, args.split)
        for name, entry in split["sources"].items():
            print(f"split {name}: {len(entry['test'])} test images over {len(entry['classes'])} classes")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
