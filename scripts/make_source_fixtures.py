"""Write ``tests/fixtures/sources/``: a miniature of the unpacked packages for ``training/sources.py`` tests.

Real images from the cached packages (``scripts/prepare_sources.py`` first), downscaled to 32 px so the
fixture stays a few tens of KB, in the packages' own folder layout; one real GIMP pattern file as is.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training import sources

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "sources" / "unpacked"
FILES = {
    "endless-sky-data": ("usr/share/games/endless-sky/images/land",
                         ["beach0.jpg", "beach1.jpg", "beach7-sfiera.jpg", "city0.jpg", "city13-sfiera.jpg",
                          "bwerner0.jpg"]),
    "tuxpaint-stamps-default": ("usr/share/tuxpaint/stamps",
                                ["animals/marsupials/koala.png",
                                 "animals/marsupials/cartoon/kangaroo-silo.png",
                                 "animals/insects/hornet.png"]),
    "openclipart-png": ("usr/share/openclipart/png",
                        ["food/apple_bitten_dan_gerhard_01.png", "food/apple_with_worm_dan_gerh_01.png",
                         "animals/2_dead_frogs_lumen_desig_01.png"]),
}  # fmt: skip


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    for package, (folder, names) in FILES.items():
        for name in names:
            source = sources.package_dir(package) / folder / name
            target = OUT / package / folder / name
            target.parent.mkdir(parents=True, exist_ok=True)
            image = Image.open(source)
            image.thumbnail((32, 32))
            image.save(target, quality=85) if target.suffix == ".jpg" else image.save(target)
        (OUT / package / ".complete").write_text("{}")
    pattern = "usr/share/gimp/2.0/patterns/Stone/granite1.pat"
    (OUT / "gimp-data" / pattern).parent.mkdir(parents=True)
    shutil.copy(sources.package_dir("gimp-data") / pattern, OUT / "gimp-data" / pattern)
    (OUT / "gimp-data" / ".complete").write_text("{}")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
