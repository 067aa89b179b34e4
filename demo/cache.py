"""The demo's on-disk index cache: one EmbeddingIndex folder per (model, gallery) pair.

Cache key = sha256 of a canonical JSON document holding

* the model identity: for a local folder its resolved path and the sha256 of ``model.safetensors`` and
  ``config.json``; for a registry or Hub name the name, the pinned revision (if any) and a sha256 of the
  loaded weights; plus the pooling and preprocessing config in both cases;
* the gallery: its resolved root and, for every image file, the relative path, size and mtime (ns);
* :data:`CACHE_FORMAT`, bumped when the way the demo builds indexes changes.

So a changed, added or removed gallery file, other weights, or another preprocessing config all give a
new key and a rebuild; an unchanged pair loads in milliseconds. Each entry is
``<cache_dir>/index-<key[:20]>/``: the EmbeddingIndex files (checksummed manifest) plus ``demo.json``
(what the key was made of, for humans, and the files that failed to decode). Entries are written to a
temporary folder and renamed into place, so a crash never leaves a half-written entry that loads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from visreg_hub.errors import CheckpointError, UserInputError
from visreg_hub.filehash import sha256_file
from visreg_hub.hub.format import CONFIG_NAME, WEIGHTS_NAME, weights_digest
from visreg_hub.inference import encode, list_image_files
from visreg_hub.native_io import name_fields, split_name
from visreg_hub.retrieval import EmbeddingIndex

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
INFO_NAME = "demo.json"


class GalleryError(UserInputError):
    """A gallery folder that holds no usable image (shown to the user, who picked that gallery)."""


@dataclass(frozen=True)
class GalleryFile:
    """One image file of a gallery: path relative to the gallery root, size in bytes, mtime in ns."""

    relpath: str
    size: int
    mtime_ns: int


@dataclass
class CachedIndex:
    """A gallery index ready to search.

    Attributes:
        index: the EmbeddingIndex; ids are positions in ``files``, metadata ``{"path", "label"}``.
        root: the gallery folder (metadata paths are relative to it).
        files: every image file of the gallery at build time, sorted.
        folder: the cache entry the index was loaded from or saved to.
        key: the full cache key.
        built: True when this call embedded the gallery, False when it was loaded from the cache.
        failures: (relative path, reason) of gallery files that could not be decoded.
        seconds: time spent loading or building.
    """

    index: EmbeddingIndex
    root: Path
    files: list[GalleryFile]
    folder: Path
    key: str
    built: bool
    failures: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0


def scan_gallery(root: str | Path) -> list[GalleryFile]:
    """The gallery's image files (recursive, sorted, hidden ones skipped) with their size and mtime.

    Raises:
        NotADirectoryError: ``root`` is not a folder.
        GalleryError: the folder holds no image files.
    """
    root = Path(root).resolve()
    paths = list_image_files(root)
    if not paths:
        # the folder's own name: the message reaches the page's users, who never see server paths
        raise GalleryError(f"gallery folder {root.name!r} contains no image files (png, jpg, webp, ...)")
    files = []
    for path in paths:
        try:
            stat = path.stat()
        except OSError:  # a dangling symlink: listed, so that building the index reports it
            stat = path.lstat()
        files.append(GalleryFile(path.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns))
    return files


def label_of(relpath: str) -> str:
    """A gallery item's label: its top-level folder (``Sneaker/309.png`` -> ``Sneaker``), else its stem."""
    parts = relpath.split("/")
    return parts[0] if len(parts) > 1 else Path(relpath).stem


def model_identity(spec: str, model, revision: str | None = None) -> dict[str, Any]:
    """What identifies the embeddings a model produces (see the module docstring).

    Args:
        spec: what the model was loaded from (folder path, registry name or Hub repo id).
        model: the loaded :class:`~visreg_hub.models.VISRegEncoder`.
        revision: the pinned revision for names, if any.
    """
    identity: dict[str, Any] = {
        "pooling": model.config.pooling,
        "data_config": {key: list(v) if isinstance(v, tuple) else v for key, v in model.data_config.items()},
    }
    folder = Path(spec).expanduser()
    if folder.is_dir():
        identity.update(
            kind="folder",
            path=str(folder.resolve()),
            weights_sha256=sha256_file(folder / WEIGHTS_NAME),
            config_sha256=sha256_file(folder / CONFIG_NAME),
        )
    else:
        identity.update(kind="name", name=spec, revision=revision, weights_sha256=weights_digest(model))
    return identity


def cache_key(identity: dict[str, Any], root: Path, files: list[GalleryFile]) -> str:
    """sha256 hex of the canonical JSON of the model identity, the gallery root and its file list."""
    document = {
        "format": CACHE_FORMAT,
        "model": identity,
        "gallery": str(Path(root).resolve()),
        "files": [[f.relpath, f.size, f.mtime_ns] for f in files],
    }
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


def build_index(
    model, root: Path, files: list[GalleryFile], *, model_name: str, batch_size: int = 64
) -> tuple[EmbeddingIndex, list[tuple[str, str]]]:
    """Embed every gallery file (bad ones skipped and reported) into a flat inner-product index.

    Returns:
        (index, failures): ids are positions in ``files``; failures are (relative path, reason).
    """
    paths = [root / f.relpath for f in files]
    result = encode(
        model, paths, batch_size=batch_size, normalize=True, convert_to_numpy=True, on_error="skip"
    )
    failed = {failure.index: failure.reason for failure in result.failures}
    good = [i for i in range(len(files)) if i not in failed]
    if not good:
        first = next(iter(failed.values())).replace(f"{root}{os.sep}", "")  # paths relative to the gallery
        raise GalleryError(f"no gallery image in {root.name!r} could be decoded; first error: {first}")
    # normalize: queries too are L2-normalised, so scores are cosines whatever a vector query's length
    # (the API's vector queries; the page's are unit already)
    index = EmbeddingIndex(
        model.embedding_dim(),
        metric="ip",
        normalize=True,
        model_name=model_name,
        pooling=model.config.pooling,
    )
    # names that are not UTF-8 are stored readable, with their bytes (ids still map to files[i])
    metadata = [{**name_fields(files[i].relpath), "label": split_name(label_of(files[i].relpath))[0]}
                for i in good]  # fmt: skip
    index.add(result.embeddings, ids=np.asarray(good, dtype=np.int64), metadata=metadata)
    return index, [(files[i].relpath, reason.replace(str(root) + os.sep, "")) for i, reason in failed.items()]


def load_or_build(
    cache_dir: str | Path,
    model,
    identity: dict[str, Any],
    gallery: str | Path,
    *,
    model_name: str,
    batch_size: int = 64,
) -> CachedIndex:
    """The gallery's index for ``model``: from the cache when the key matches, else built and cached.

    A cache entry that fails to load (checksum mismatch, missing file) is logged, removed and rebuilt.
    """
    start = time.perf_counter()
    root = Path(gallery).resolve()
    files = scan_gallery(root)
    key = cache_key(identity, root, files)
    cache_dir = Path(cache_dir)
    folder = cache_dir / f"index-{key[:20]}"
    if folder.is_dir():
        try:
            index = EmbeddingIndex.load(folder)
            index.normalize = True  # as build_index makes it (entries cached before it did lack the flag)
            info = json.loads((folder / INFO_NAME).read_text(encoding="utf-8"))
            if info.get("key") != key:
                raise CheckpointError(f"{folder / INFO_NAME} records another key")
            failures = [tuple(item) for item in info.get("failures", [])]
            seconds = time.perf_counter() - start
            logger.info("loaded the cached index %s (%d vectors) in %.2f s", folder, len(index), seconds)
            return CachedIndex(index, root, files, folder, key, False, failures, seconds)
        except (CheckpointError, FileNotFoundError, ValueError, OSError) as exc:
            logger.warning("cached index %s is unusable (%s); rebuilding it", folder, exc)
            shutil.rmtree(folder, ignore_errors=True)
    logger.info("embedding %d gallery images from %s with %s", len(files), root, model_name)
    index, failures = build_index(model, root, files, model_name=model_name, batch_size=batch_size)
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".building-{key[:12]}-", dir=cache_dir))
    try:
        index.save(staging)
        info = {
            "key": key,
            "model": identity,
            "gallery": str(root),
            "count": len(files),
            "failures": failures,
        }
        (staging / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        try:
            staging.rename(folder)
        except OSError:  # another process cached the same key meanwhile: theirs is as good as ours
            logger.info("cache entry %s appeared meanwhile; keeping it", folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    seconds = time.perf_counter() - start
    logger.info("built and cached %s (%d vectors, %d failures) in %.1f s", folder, len(index), len(failures),
                seconds)  # fmt: skip
    return CachedIndex(index, root, files, folder, key, True, failures, seconds)
