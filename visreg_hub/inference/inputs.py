"""What ``encode()`` and the command line are given, as a list of images: folders walked, batches split.

:func:`expand_inputs` turns every kind of ``encode()`` input (paths, folders, bytes, file objects, PIL
images, arrays, tensors, lists of them) into one :class:`~visreg_hub.inference.images.ImageSource` per
image, which :func:`~visreg_hub.inference.images.decode_image` then decodes. :func:`walk_image_entries`
is the one folder walk of ``encode(folder)``, ``visreg-hub embed`` and bulk jobs (same files, same order).
Problems found here (an empty folder, a bad batch shape, a text-mode file) become sources that fail on
decode, so one bad input never loses the others.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

from visreg_hub.inference.image_files import DANGLING_LINK_REASON, NOT_REGULAR_REASON, unreadable_entry_reason
from visreg_hub.inference.images import (
    IMAGE_EXTENSIONS,
    SINGLE_INPUT_TYPES,
    ImageSource,
    file_object_source,
    is_file_like,
)
from visreg_hub.inference.pixel_arrays import META_TENSOR_REASON

logger = logging.getLogger(__name__)


class WalkedEntry(NamedTuple):
    """One result of :func:`walk_image_entries`.

    Attributes:
        path: the entry's path (the walk's root joined with the names below it).
        problem: None for an image file; else why it cannot be decoded (see :func:`classify_entry`), or
            for a folder that cannot be listed, why not.
        unlistable: True for such a folder (its images, if any, are not in the walk).
    """

    path: str
    problem: str | None = None
    unlistable: bool = False

    @property
    def left_out(self) -> str:
        """For an unlistable folder: what every caller reports after its path (why, and the fix)."""
        return f"{self.problem}; its images are left out: fix its permissions, or leave it out of the inputs"


def walk_image_entries(root: str | os.PathLike) -> Iterator[WalkedEntry]:
    """The image-named entries under ``root``, streamed depth first with each folder's names sorted (the
    order of sorting the paths by their components: ``a/x.jpg`` before ``a-b.jpg``).

    The one folder walk of ``encode(folder)`` (:func:`list_image_files`), ``visreg-hub embed`` and bulk
    jobs, so that they list the same files in the same order. Files are matched by extension
    (case-insensitive, see ``IMAGE_EXTENSIONS``); hidden files and folders (name starting with ``.``,
    e.g. macOS ``._photo.jpg`` resource forks) are skipped, and so are symlinked folders (never
    followed: no cycles). An image-named entry that cannot be decoded (a dangling link, a symlink loop,
    a FIFO, socket or device) comes with its ``problem``, and a folder that cannot be listed as
    ``unlistable``, so that callers report them instead of the listing silently shrinking.

    why an explicit stack of iterators: a tree deeper than Python's recursion limit is walked too, and
    only one folder's names per level are held in memory.
    """
    pending: list[Iterator[os.DirEntry]] = []
    directory: str | None = os.fspath(root)
    while True:
        if directory is not None:
            try:
                with os.scandir(directory) as scan:
                    pending.append(iter(sorted(scan, key=lambda entry: entry.name)))
            except OSError as exc:
                yield WalkedEntry(directory, f"cannot list this folder ({exc.strerror or exc})", True)
            directory = None
        if not pending:
            return
        entry = next(pending[-1], None)
        if entry is None:
            pending.pop()
        elif not entry.name.startswith("."):
            kind = classify_entry(entry)
            if kind == "dir":
                directory = entry.path
            elif kind is not None:
                yield WalkedEntry(entry.path, None if kind == "file" else kind)


def list_image_files(folder: str | os.PathLike, *, unlistable: list[WalkedEntry] | None = None) -> list[Path]:
    """Image files under ``folder``, recursively, in :func:`walk_image_entries`' order.

    Every image-named entry is listed, also one that cannot be decoded, so that decoding reports it
    instead of the folder silently shrinking. A sub-folder that cannot be listed is left out: appended
    to ``unlistable`` when given (the caller reports it), else with a logged warning.

    Raises:
        NotADirectoryError: ``folder`` is not a directory.
    """
    root = Path(folder)
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a directory; pass a folder of images")
    found: list[Path] = []
    for walked in walk_image_entries(root):
        if not walked.unlistable:
            found.append(Path(walked.path))
        elif unlistable is not None:
            unlistable.append(walked)
        else:
            logger.warning("%s: %s", walked.path, walked.left_out)
    return found


def classify_entry(entry: os.DirEntry) -> str | None:
    """What a folder walk does with one directory entry.

    Returns:
        ``"dir"``: a real folder, to walk into (a symlinked folder is not followed, so a walk has no
        cycles); ``"file"``: an image-named regular file (links followed); None: not an image (skip);
        otherwise why the image-named entry cannot be decoded (without the path): a dangling link, a
        symlink loop or an unreadable entry, a FIFO, socket or device. Such an entry is reported, never
        skipped silently, and never opened (opening a FIFO blocks until a writer appears).
    """
    try:
        if entry.is_dir(follow_symlinks=False):
            return "dir"
        if os.path.splitext(entry.name)[1].lower() not in IMAGE_EXTENSIONS or entry.is_dir():
            return None
        if entry.is_file():
            return "file"
        if entry.is_symlink() and not os.path.exists(entry.path):
            return DANGLING_LINK_REASON
        return NOT_REGULAR_REASON
    except OSError as exc:  # why: DirEntry.is_dir/is_file raise for ELOOP (a symlink loop), EACCES, ...
        return unreadable_entry_reason(exc)


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _is_single(obj: Any) -> bool:
    if isinstance(obj, np.ndarray) and obj.ndim == 1 and obj.dtype.kind in "UO":
        return False  # paths or objects in an array (df["path"].to_numpy()): a list, as sentence-transformers
    return isinstance(obj, SINGLE_INPUT_TYPES) or is_file_like(obj)


def is_single_image(obj: Any) -> bool:
    """``obj`` is one image, not a list, a folder or a 4-D batch (``encode`` then returns a 1-D vector)."""
    if not _is_single(obj):
        return False
    if isinstance(obj, (str, os.PathLike)):
        return not Path(obj).expanduser().is_dir()
    return not (isinstance(obj, (np.ndarray, torch.Tensor)) and obj.ndim == 4)


def expand_inputs(images: Any) -> list[ImageSource]:
    """Flatten ``encode()`` inputs into one :class:`ImageSource` per image.

    Folders expand to their image files (:func:`list_image_files`); a 4-D numpy array (N, H, W, C) or
    tensor (B, C, H, W) expands to its images. The position of an item in the returned list is the
    index that ``encode(..., on_error="skip")`` reports for failures; it equals the input position
    when no folder or 4-D batch was given. Problems found here (empty folder, bad batch shape,
    unsupported type) become items that fail on decode, so one bad input never loses the others.

    Args:
        images: a path, folder, encoded bytes, binary file object, PIL image, array or tensor, or an
            iterable of them. A file object is one image (never iterated as lines).

    Returns:
        The expanded sources, in input order.
    """
    if isinstance(images, Mapping):  # iterating would embed its keys
        reason = "a dict is not a list of images; pass a list (e.g. list(the_dict.values()))"
        return [ImageSource(None, "item 0 (dict)", reason)]
    items = [images] if _is_single(images) else list(images) if isinstance(images, Iterable) else [images]
    sources: list[ImageSource] = []
    for k, obj in enumerate(items):
        label = f"item {k}"
        if isinstance(obj, torch.Tensor) and obj.is_meta:  # .cpu() would raise NotImplementedError
            sources.append(ImageSource(None, label, META_TENSOR_REASON))
            continue
        if isinstance(obj, torch.Tensor):
            # why: decoding runs on the CPU, possibly in forked DataLoader workers, which cannot touch CUDA
            obj = obj.detach().cpu()
        if isinstance(obj, str) and not obj.strip():  # Path("") is ".": never embed a folder by accident
            sources.append(ImageSource(None, f"{label} (empty string)", "empty path; pass a file or folder"))
        elif isinstance(obj, str) and _URL.match(obj.strip()) and not Path(obj).exists():
            reason = "encode() does not fetch URLs; download the file and pass its path (or its bytes)"
            sources.append(ImageSource(None, obj.strip()[:200], reason))
        elif isinstance(obj, (str, os.PathLike)):
            path, start = Path(obj).expanduser(), len(sources)
            if path.is_dir():
                # a folder that cannot be listed is a failed item of its own: the rest is still embedded,
                # and on_error="raise" stops on it instead of returning fewer rows than the folder holds
                for walked in walk_image_entries(path):
                    if walked.unlistable:
                        sources.append(ImageSource(None, walked.path, walked.left_out))
                    else:
                        sources.append(ImageSource(Path(walked.path), walked.path))
                if len(sources) == start:
                    reason = f"directory contains no image files (looked for {', '.join(IMAGE_EXTENSIONS)})"
                    sources.append(ImageSource(None, str(path), reason))
            else:
                sources.append(ImageSource(path, str(path)))
        elif isinstance(obj, (bytes, bytearray, memoryview)):
            sources.append(ImageSource(bytes(obj), f"{label} (bytes)"))
        elif is_file_like(obj):
            sources.append(file_object_source(obj, label))
        elif isinstance(obj, (np.ndarray, torch.Tensor)) and obj.ndim == 4:
            channel_axis = -1 if isinstance(obj, np.ndarray) else 1
            if not 1 <= obj.shape[channel_axis] <= 4:
                layout = "(N, H, W, C)" if channel_axis == -1 else "(B, C, H, W)"
                reason = f"4-D input of shape {tuple(obj.shape)} must be a {layout} batch with 1-4 channels"
                if channel_axis == -1 and 1 <= obj.shape[1] <= 4:  # numpy is channels-last, as PIL's arrays
                    reason += "; channels-first? use array.transpose(0, 2, 3, 1)"
                elif channel_axis == 1 and 1 <= obj.shape[-1] <= 4:  # tensors are channels-first, as torch's
                    reason += "; channels-last? use tensor.permute(0, 3, 1, 2)"
                sources.append(ImageSource(None, label, reason))
            else:
                sources.extend(ImageSource(obj[j], f"{label}[{j}]") for j in range(obj.shape[0]))
        elif isinstance(obj, (Image.Image, np.ndarray, torch.Tensor)):
            sources.append(ImageSource(obj, label))
        else:
            reason = (
                f"unsupported input type {type(obj).__name__}; pass a path, folder, bytes, PIL image, "
                "numpy array (H, W, C) or tensor (C, H, W)"
            )
            sources.append(ImageSource(None, label, reason))
    return sources
