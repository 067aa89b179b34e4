"""Make tests/fixtures/ood_mini: a miniature of the OOD suite for CI (real 32 px images, same format).

    python scripts/prepare_ood.py && python scripts/make_ood_fixture.py

Per dataset of ``training/splits/ood-v1.json``: its first 3 classes, the first 4 training and 2 test images
of each (manifest order), each downscaled to fit 32 px and saved as PNG under
``tests/fixtures/ood_mini/<dataset>/``; ``manifest.json`` there lists them with paths relative to the folder.
Per-image credits of the Stellarium images are copied into ``CREDITS.md``.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from training import ood_data, sources  # noqa: E402
from visreg_hub.inference.images import ImageSource, decode_image  # noqa: E402

OUT = REPO / "tests" / "fixtures" / "ood_mini"
CLASSES, TRAIN, TEST, SIDE = 3, 4, 2, 32


def stellarium_credits(root: Path) -> dict[str, str]:
    text = (root / "unpacked/stellarium-data" / ood_data.STELLARIUM / "textures.json").read_text()
    credits = {}
    for block in re.findall(
        r"\{[^{}]*\"imageUrl\"[^{}]*\}|\{[^{}]*\{[^{}]*\}[^{}]*\"imageUrl\"[^{}]*\}", text
    ):
        url = re.search(r'"imageUrl"\s*:\s*"([^"]+)"', block)
        short = re.search(r'"[Ss]hort"\s*:\s*"([^"]+)"', block)
        if url:
            credits[url.group(1)] = short.group(1) if short else "see stellarium-data CREDITS.md"
    return credits


def main() -> None:
    root = sources.sources_root().resolve()
    manifest = json.loads(ood_data.MANIFEST.read_text())
    credits = stellarium_credits(root)
    mini = {**{k: v for k, v in manifest.items() if k != "datasets"}, "datasets": {}}
    credit_lines = []
    for name, entry in manifest["datasets"].items():
        classes = entry["classes"][:CLASSES]
        rows = []
        for label in classes:
            for split, count in (("train", TRAIN), ("test", TEST)):
                picked = [r for r in entry["items"] if r[1] == label and r[2] == split][:count]
                for rel, _, _ in picked:
                    # the library's decoding (alpha composited on white, EXIF orientation), then 32 px
                    image = decode_image(ImageSource(root / rel, rel), max_pixels=None)
                    image.thumbnail((SIDE, SIDE), Image.Resampling.LANCZOS)
                    target = Path(name) / label.replace(" ", "_") / Path(rel).name
                    (OUT / target).parent.mkdir(parents=True, exist_ok=True)
                    image.save(OUT / target, optimize=True)
                    rows.append([target.as_posix(), label, split])
                    if name == "astronomy":
                        credit_lines.append(
                            f"- `{target.as_posix()}`: {credits.get(Path(rel).name, 'see CREDITS.md')}"
                        )
        mini["datasets"][name] = {**{k: v for k, v in entry.items() if k != "items"}, "classes": classes,
                                  "items": sorted(rows)}  # fmt: skip
    (OUT / "manifest.json").write_text(json.dumps(mini, indent=0, sort_keys=True) + "\n")
    (OUT / "CREDITS.md").write_text(
        "# Image credits of the Stellarium nebula thumbnails (stellarium-data 0.22.2-1, textures.json)\n\n"
        + "\n".join(credit_lines)
        + "\n"
    )
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
