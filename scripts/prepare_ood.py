"""Prepare the OOD linear-probe suite once: fetch its packages (apt/PyPI, cached), derive its images, and
write the manifest with the seeded split (``training/splits/ood-v1.json``).

    python scripts/prepare_ood.py                  # fetch + derive; checks the committed manifest
    python scripts/prepare_ood.py --write          # (re)write the manifest

After this, ``training/evaluate.py --suite ood MODEL`` needs only local files. The cache is
``$VISREG_SOURCES_DIR`` (default ``~/.cache/visreg_hub/sources``); see ``training/ood_data.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training import ood_data, sources


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", help="sources cache (default $VISREG_SOURCES_DIR or ~/.cache/...)")
    parser.add_argument("--write", action="store_true", help="write the manifest (else compare with it)")
    parser.add_argument("--manifest", default=str(ood_data.MANIFEST))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    packages = sorted({p for d in ood_data.DATASETS.values() for p in d["packages"]})
    sources.fetch(packages, args.root)
    manifest = ood_data.build_manifest(args.root)
    for name, entry in manifest["datasets"].items():
        counts = Counter((row[2], row[1]) for row in entry["items"])
        train = sum(v for (s, _), v in counts.items() if s == "train")
        print(
            f"{name:10s} {len(entry['classes'])} classes, {train} train / {len(entry['items']) - train} test"
        )
    path = Path(args.manifest)
    text = json.dumps(manifest, indent=0, sort_keys=True) + "\n"
    if args.write:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")
    elif not path.is_file() or path.read_text() != text:
        print(f"{path} differs from what these packages give; rerun with --write to replace it")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
