"""Helpers shared by the ``visreg-hub`` sub-commands (:mod:`visreg_hub.cli`, :mod:`visreg_hub.cli_embed`):
warnings, progress bars, model loading and the image inputs of a command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from visreg_hub.errors import UserInputError, printable

logger = logging.getLogger("visreg_hub.cli")


def warn(message: str) -> None:
    """A one-line warning on stderr (control characters escaped: names come from someone's files)."""
    print(f"visreg-hub: warning: {printable(message)}", file=sys.stderr)


def progress(args: argparse.Namespace) -> bool | None:
    """``show_progress_bar`` for ``args``: False with ``--no-progress``, else None (shown on a terminal)."""
    return False if getattr(args, "no_progress", False) else None


def model_reference(name: str) -> str:
    """Local folders are recorded as absolute paths so the index can be searched from any directory
    (:func:`visreg_hub.hub.registry.model_reference`)."""
    from visreg_hub.hub.registry import model_reference as reference

    return reference(name)


def expand_image_inputs(inputs: list[str], *, keep_missing: bool = False) -> list[str]:
    """Absolute image paths: files as given, folders listed.

    Args:
        keep_missing: keep a path that does not exist, or a sub-folder that cannot be listed, for
            ``encode(on_error="skip")`` to report as that item's failure (``--on-error skip``); otherwise it
            is an error before any work.
    """
    from visreg_hub.inference.inputs import list_image_files

    paths: list[str] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            unlistable: list = []
            found = list_image_files(path, unlistable=unlistable)
            if unlistable and not keep_missing:  # fewer rows than the folder holds is no success
                first = unlistable[0]
                raise UserInputError(
                    f"{first.path}: {first.left_out}; or pass --on-error skip to embed the rest and record it"
                )
            if not found and not unlistable:
                raise UserInputError(f"folder {item!r} contains no image files")
            # with skip, the folder itself is an input: encode() reports it as a failed item
            paths.extend(os.path.abspath(p) for p in found)
            paths.extend(os.path.abspath(u.path) for u in unlistable)
        elif path.is_file() or keep_missing:
            paths.append(os.path.abspath(path))
        else:
            raise UserInputError(f"input not found: {item!r} is neither an image file nor a folder")
    return paths


def load_model(name: str, device: str | None):
    """``from_pretrained(name, device=device)``; a bad ``--device`` is one line before any loading."""
    from visreg_hub.devices import resolve_device
    from visreg_hub.hub import from_pretrained

    resolve_device(device)
    logger.info("loading model %s", name)
    return from_pretrained(name, device=device)
