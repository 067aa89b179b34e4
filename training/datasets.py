"""Random-access image sets for training and evaluation, decoded to uint8 squares of ``base_size``.

Readers: ``folder`` (ImageFolder layout ``root/<class>/**/*.jpg`` when the root holds only sub-folders,
else a flat unlabelled folder searched recursively), ``filelist`` (lines ``path`` or
``path<whitespace>label``, paths relative to the list), ``fmnist`` (the Debian Fashion-MNIST idx files)
and ``npz`` (arrays ``images`` (N, H, W[, C]) uint8 and optional ``labels``). Files are decoded with the
library's robust decoder (:func:`visreg_hub.inference.images.decode_image`: EXIF, alpha, 16-bit, CMYK),
so training sees images exactly as inference will.
"""

from __future__ import annotations

import gzip
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from training.config import FMNIST_DIR, ConfigError, DataSection
from visreg_hub.errors import ImageDecodeError
from visreg_hub.inference.images import IMAGE_EXTENSIONS, ImageSource, decode_image
from visreg_hub.inference.inputs import list_image_files

logger = logging.getLogger(__name__)

NO_LABEL = -1


# ------------------------------------------------------------------------------------------ image sets
class ImageSet(torch.utils.data.Dataset):
    """Random-access images as uint8 (C, base, base) tensors, with optional integer labels.

    Args:
        items: per-image payload: a file ``Path`` or an (H, W[, C]) uint8 array.
        labels: (N,) int64 labels, or None for an unlabelled set.
        channels: 1 (luma) or 3 (RGB) output channels.
        base_size: output side in pixels.
    """

    def __init__(self, items: Sequence, labels: np.ndarray | None, channels: int, base_size: int) -> None:
        if labels is not None and len(labels) != len(items):
            raise ValueError(f"{len(labels)} labels for {len(items)} images")
        self.items = items
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.channels = channels
        self.base_size = base_size

    def __len__(self) -> int:
        return len(self.items)

    @property
    def num_classes(self) -> int:
        return 0 if self.labels is None or len(self.labels) == 0 else int(self.labels.max()) + 1

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageSet:
        """The images at ``indices`` (labels follow)."""
        indices = np.asarray(indices, dtype=np.int64)
        items = [self.items[i] for i in indices] if isinstance(self.items, list) else self.items[indices]
        labels = None if self.labels is None else self.labels[indices]
        return ImageSet(items, labels, self.channels, self.base_size)

    def label(self, index: int) -> int:
        return NO_LABEL if self.labels is None else int(self.labels[index])

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        """``(image, used)``: the (C, base, base) uint8 image at ``index``, or, when that file does not
        decode, at the next index that does (logged); ``used`` is the index it came from."""
        for offset in range(min(len(self), 16)):
            used = (index + offset) % len(self)
            try:
                return to_base_tensor(self.items[used], self.channels, self.base_size), used
            except ImageDecodeError as exc:
                logger.warning("skipping an undecodable image (%s); using the next one", exc)
        raise ImageDecodeError(f"16 consecutive images from index {index} could not be decoded")

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int, int]:
        """``index`` or ``(index, batch_seed)`` -> (image (C, base, base) uint8, label, batch_seed).

        The label is the image's own: a substitute for an undecodable file brings its label along (the
        kNN bank and the online probe would otherwise learn another class's pixels under this one).
        """
        index, batch_seed = key if isinstance(key, tuple) else (key, 0)
        image, used = self.load(index)
        return image, self.label(used), batch_seed


def to_base_tensor(item, channels: int, base_size: int) -> torch.Tensor:
    """Decode a path / bytes / array and resize its shorter side to ``base_size``, centre-cropped square.

    Returns:
        (channels, base_size, base_size) uint8 tensor.
    """
    if isinstance(item, np.ndarray):
        array = item if item.ndim == 3 else item[:, :, None]
        if array.shape[0] == array.shape[1] == base_size and array.shape[2] == channels:
            return torch.from_numpy(array.transpose(2, 0, 1).copy())  # a copy: the source may be read-only
        image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    else:
        label = str(item) if isinstance(item, Path) else "shard member"
        image = decode_image(ImageSource(item, label))
    image = image.convert("L" if channels == 1 else "RGB")
    width, height = image.size
    scale = base_size / min(width, height)
    size = (max(base_size, round(width * scale)), max(base_size, round(height * scale)))
    if size != image.size:
        image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (size[0] - base_size) // 2, (size[1] - base_size) // 2
    image = image.crop((left, top, left + base_size, top + base_size))
    array = np.array(image, dtype=np.uint8)  # a writable copy (torch warns on read-only arrays)
    array = array[:, :, None] if array.ndim == 2 else array
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


# ------------------------------------------------------------------------------------------ readers
def read_fmnist(folder: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST idx files -> uint8 (N, 28, 28) images and int64 (N,) labels.

    Raises:
        ConfigError: the files are missing; the message says how to install them.
    """
    prefix = {"train": "train", "test": "t10k"}[split]
    folder = Path(folder)
    missing = [
        name
        for name in (f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz")
        if not (folder / name).is_file()
    ]
    if missing:
        raise ConfigError(
            f"Fashion-MNIST files {missing} are not in {folder}: install Debian's package with "
            "`apt-get install dataset-fashion-mnist` (it puts them in /usr/share/datasets/fashion-mnist), "
            "or point at your own copy of the idx files"
        )
    with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "rb") as handle:
        images = np.frombuffer(handle.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "rb") as handle:
        labels = np.frombuffer(handle.read(), np.uint8, offset=8).astype(np.int64)
    return images, labels


def read_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """``images`` uint8 (N, H, W[, C]) and optional ``labels`` (N,) from an .npz file (never unpickled)."""
    import zipfile

    try:
        with np.load(path, allow_pickle=False) as data:
            if not hasattr(data, "files"):  # a bare .npy renamed: np.load returned an array
                raise ConfigError(f"{path} is a single .npy array, not an .npz archive of 'images'")
            if "images" not in data:
                raise ConfigError(f"{path} has no 'images' array (found {sorted(data.files)})")
            images = data["images"]
            labels = data.get("labels")
    except ConfigError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:  # object arrays: ValueError
        detail = (
            "it holds pickled or object data, which is never loaded"
            if "pickle" in str(exc)
            else f"{type(exc).__name__}: {str(exc)[:160]}"
        )
        raise ConfigError(
            f"{path} is not a readable .npz of plain arrays ({detail}); "
            "save it with np.savez(path, images=uint8_array, labels=int_array)"
        ) from None
    if labels is not None:
        if labels.dtype.kind not in "iu" or labels.shape != images.shape[:1]:
            raise ConfigError(
                f"{path}: 'labels' must be integers of shape ({len(images)},), "
                f"got {labels.dtype} {labels.shape}"
            )
        labels = labels.astype(np.int64)
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise ConfigError(f"{path}: 'images' must be uint8 (N, H, W[, C]), got {images.dtype} {images.shape}")
    return images, labels


def scan_folder(root: str | Path) -> tuple[list[Path], np.ndarray | None, list[str]]:
    """Images under ``root``: ImageFolder layout (labels from top-level folders) or flat (no labels).

    Returns:
        (paths, labels or None, class names).
    """
    root = Path(root)
    top_images = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if top_images or not class_dirs:
        paths = list_image_files(root)
        if not paths:
            raise ConfigError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
        return paths, None, []
    paths, labels = [], []
    for label, class_dir in enumerate(class_dirs):
        found = list_image_files(class_dir)
        paths += found
        labels += [label] * len(found)
    if not paths:
        raise ConfigError(f"the class folders under {root} hold no images")
    return paths, np.asarray(labels, dtype=np.int64), [d.name for d in class_dirs]


def read_filelist(list_path: str | Path) -> tuple[list[Path], np.ndarray | None, list[str]]:
    """Lines ``path`` or ``path<whitespace>label`` (``#`` comments); relative paths are relative to the list.

    String labels are numbered in sorted order; integer labels are used as they are.
    """
    list_path = Path(list_path)
    paths, raw_labels = [], []
    for number, line in enumerate(list_path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path_text, label = line, None
        parts = line.split("\t") if "\t" in line else line.rsplit(None, 1)
        if len(parts) == 2 and not (list_path.parent / line).is_file():
            path_text, label = parts[0].strip(), parts[1].strip()
        path = Path(path_text)
        paths.append(path if path.is_absolute() else list_path.parent / path)
        raw_labels.append(label)
        if (label is None) != (raw_labels[0] is None):
            raise ConfigError(f"{list_path}:{number}: some lines have a label and some do not")
    if not paths:
        raise ConfigError(f"file list {list_path} names no images")
    missing = [p for p in paths[:1000] if not p.is_file()]
    if missing:
        raise ConfigError(f"file list {list_path} names missing files, e.g. {missing[0]}")
    if raw_labels[0] is None:
        return paths, None, []
    if all(label.lstrip("-").isdigit() for label in raw_labels):
        return paths, np.asarray([int(label) for label in raw_labels], dtype=np.int64), []
    names = sorted(set(raw_labels))
    ids = {name: i for i, name in enumerate(names)}
    return paths, np.asarray([ids[label] for label in raw_labels], dtype=np.int64), names


def open_image_set(source: str, path: str | None, split: str, data: DataSection) -> ImageSet:
    """A random-access :class:`ImageSet` for ``source`` (every source but ``webdataset``)."""
    if source == "fmnist":
        images, labels = read_fmnist(path or FMNIST_DIR, split)
        return ImageSet(images, labels, data.channels, data.base_size)
    if source == "npz":
        images, labels = read_npz(path)
        return ImageSet(images, labels, data.channels, data.base_size)
    if source == "folder":
        paths, labels, _ = scan_folder(path)
    elif source == "filelist":
        paths, labels, _ = read_filelist(path)
    else:
        raise ConfigError(f"data source {source!r} has no random access; use it for training only")
    return ImageSet(paths, labels, data.channels, data.base_size)


# ------------------------------------------------------------------------------------------ evaluation
def eval_collate(samples: list[tuple[torch.Tensor, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, label, seed) samples -> (B, C, H, W) uint8 images and (B,) labels."""
    return torch.stack([s[0] for s in samples]), torch.tensor([s[1] for s in samples], dtype=torch.long)


def eval_loader(images: ImageSet, rank: int, world: int, batch_size: int, workers: int, collate=None):
    """This rank's share (indices ``rank::world``) of an evaluation set, in order (``collate``: default
    :func:`eval_collate`)."""
    shard = images.subset(np.arange(rank, len(images), world))
    return torch.utils.data.DataLoader(
        shard,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=eval_collate if collate is None else collate,
        shuffle=False,
        # Its own generator: evaluating must not consume the global RNG (exact resume).
        generator=torch.Generator().manual_seed(0),
    )
