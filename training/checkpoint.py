"""Crash-safe checkpoint folders: write to a temporary folder, fsync, rename; pointer files; pruning.

Layout under ``<output_dir>/checkpoints``::

    step-00001000/        complete checkpoints (:mod:`training.state_io` files, trainer_state.json and
                          manifest.json with the sha256 of every file, see :mod:`training.manifest`)
    .tmp-step-00002000/   a checkpoint being written (never loaded; removed on the next start)
    latest                text file naming the newest complete checkpoint (replaced atomically)
    best                  text file naming the best one (highest kNN accuracy, else lowest loss)

A folder only gets its ``step-*`` name by ``os.rename`` after every rank has written into it and its
files are fsynced, and ``latest`` is replaced with ``os.replace`` after that, so a process killed at any
moment leaves ``latest`` naming a complete checkpoint. The folders must be on a file system shared by
all nodes. On resume the manifest is verified first; a checkpoint with a missing, truncated or corrupt
file is skipped with a warning naming the problem, and the newest intact one is used instead.

Test hook: with ``VISREG_TEST_CHECKPOINT_SLEEP=<step>:<seconds>`` the writer of step ``<step>`` creates
``HOOK_SLEEPING`` inside the temporary folder and sleeps there, so a test can ``kill -9`` it mid-write.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

from training.manifest import verify_manifest, write_manifest
from training.state_checks import read_json
from training.state_io import TrainingParts, save_training_state
from visreg_hub.durable import fsync_dir, fsync_tree, write_atomic
from visreg_hub.errors import CheckpointError

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
RUN_ID_KEY = "run_id"  # in STATE_FILE: the identity of the run (output folder) that wrote the checkpoint
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_MAX_STATE_BYTES = 1024 * 1024
SLEEP_HOOK_ENV = "VISREG_TEST_CHECKPOINT_SLEEP"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def write_pointer(root: Path, name: str, target: str) -> None:
    """Atomically make ``root/name`` contain ``target`` (write a temporary file, then ``os.replace``)."""
    write_atomic(root / name, lambda path: path.write_text(target + "\n", encoding="utf-8"))


def read_pointer(root: Path, name: str) -> Path | None:
    """The complete checkpoint folder ``root/name`` points to, or None (also for a malformed pointer)."""
    pointer = root / name
    if not pointer.is_file():
        return None
    try:
        with open(pointer, "rb") as handle:
            target = handle.read(64).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not _STEP_DIR.match(target):  # only a sibling step folder, never a path elsewhere
        return None
    folder = root / target
    return folder if is_complete(folder) and not folder.is_symlink() else None


def is_complete(folder: Path) -> bool:
    return folder.is_dir() and _STEP_DIR.match(folder.name) is not None and (folder / STATE_FILE).is_file()


_WARNED_LINKS: set[str] = set()  # a resume lists the checkpoints several times: say it once per link


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete ``step-*`` folders, oldest first.

    A ``step-*`` symlink is skipped (with a warning): a run's checkpoints are folders it wrote, and a link
    planted there would make ``--resume auto`` load another run's state (the checkpoint folder is not
    trusted). A step folder named explicitly with ``--resume PATH`` may still be a link: the user named it.
    """
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if not is_complete(path):
            continue
        if path.is_symlink():
            if str(path) not in _WARNED_LINKS:
                _WARNED_LINKS.add(str(path))
                logger.warning("ignoring %s: a symlink, not a checkpoint this run wrote", path)
            continue
        found.append(path)
    return sorted(found)


def linked_checkpoints(root: Path) -> list[Path]:
    """The ``step-*`` symlinks under ``root`` that :func:`complete_checkpoints` skips, oldest first."""
    if not root.is_dir():
        return []
    return sorted(path for path in root.iterdir() if path.is_symlink() and _STEP_DIR.match(path.name))


def remove_entry(path: Path) -> None:
    """Delete a file, a folder tree, or a symlink itself (never the link's target)."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


def remove_stale_temporaries(root: Path) -> None:
    """Delete ``.tmp-*`` entries left by a process killed while writing (a symlink: the link only)."""
    if not root.is_dir():
        return
    for path in root.iterdir():
        if not path.name.startswith(".tmp-") or not (path.is_dir() or path.is_symlink()):
            continue
        what = "the leftover link" if path.is_symlink() else "the incomplete checkpoint"
        logger.warning("removing %s %s (a previous run stopped while writing)", what, path)
        remove_entry(path)
        if os.path.lexists(path):  # why: the log line above must not claim a removal that failed
            logger.warning("could not remove %s; delete it by hand", path)


def new_run_id() -> str:
    """A fresh run identity (recorded in every checkpoint's trainer_state.json)."""
    return uuid.uuid4().hex


def run_id_of(folder: Path) -> str | None:
    """The run identity a checkpoint records, or None (written before run ids, or unreadable).

    Read before the manifest is verified (to refuse early), so the file is treated as untrusted: size
    capped, and anything but a well-formed id counts as unknown.
    """
    try:
        state = read_state(folder)
    except CheckpointError:
        return None
    value = state.get(RUN_ID_KEY) if isinstance(state, dict) else None
    return value if isinstance(value, str) and _RUN_ID.match(value) else None


def run_ids(root: Path) -> set[str | None]:
    """The run identities of the complete checkpoints under a ``checkpoints`` folder (None: unknown)."""
    return {run_id_of(folder) for folder in complete_checkpoints(root)}


def resume_candidates(resume: str) -> list[Path]:
    """The checkpoint folders ``--resume PATH`` may load: one step folder, or all of a run (unverified)."""
    folder = Path(resume).expanduser()
    if (folder / "checkpoints" / "latest").is_file():
        folder = folder / "checkpoints"
    if folder.is_dir() and (folder / "latest").is_file():
        return complete_checkpoints(folder)
    return [folder]


def _newest_first(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``: the ``latest`` pointer's target first, then newest to oldest."""
    latest = read_pointer(root, "latest")
    others = [path for path in reversed(complete_checkpoints(root)) if path != latest]
    return ([latest] if latest is not None else []) + others


def _newest_intact(root: Path, resume: str) -> tuple[Path, set[str]]:
    problems = []
    for folder in _newest_first(root):
        try:
            return folder, verify_manifest(folder)
        except CheckpointError as exc:
            problems.append(str(exc))
            logger.warning("skipping checkpoint %s: %s; trying the previous one", folder.name, exc)
    why = f" ({'; '.join(problems)})" if problems else " (no complete step folder; see the warnings above)"
    raise CheckpointError(
        f"--resume {resume!r}: no intact checkpoint under {root}{why}; "
        "resume from another copy, or start afresh with --overwrite (replaces the run) or another "
        "train.output_dir"
    )


def resolve_resume(root: Path, resume: str | None) -> tuple[Path, set[str]] | None:
    """The checkpoint to resume from and its verified file names, or None (start afresh).

    ``resume`` is None (fresh), ``"auto"`` (the newest intact checkpoint under ``root``, none: fresh), a
    run's output folder or a ``checkpoints`` folder (the newest intact one in it), or one ``step-*``
    folder (used only if intact). Every rank calls this and reaches the same answer from the same files.

    Raises:
        CheckpointError: no intact checkpoint where one was asked for, naming what is wrong.
    """
    if resume is None:
        return None
    if resume == "auto":
        links = linked_checkpoints(root)
        if not _newest_first(root) and links:  # like a corrupt checkpoint: an error, never a fresh start
            raise CheckpointError(
                f"--resume 'auto': no intact checkpoint under {root} ({', '.join(p.name for p in links)}: "
                "symlinks, never followed, since a run's checkpoints are folders it wrote); resume from "
                "the linked folder with --resume PATH, or start afresh with --overwrite (replaces the run) "
                "or another train.output_dir"
            )
        if not _newest_first(root):
            logger.info("--resume auto: no checkpoint under %s, starting from scratch", root)
            return None
        return _newest_intact(root, resume)
    folder = Path(resume).expanduser()
    if (folder / "checkpoints" / "latest").is_file():  # a run's output folder
        folder = folder / "checkpoints"
    if folder.is_dir() and (folder / "latest").is_file():  # a checkpoints folder
        return _newest_intact(folder, resume)
    if not folder.exists():
        raise CheckpointError(
            f"--resume {resume!r}: no such file or folder; pass a run folder, its checkpoints folder or a "
            "step-XXXXXXXX folder (or --resume auto for this run's own output folder)"
        )
    if folder.is_file() and folder.name in ("latest", "best"):  # the pointer file, not what it points at
        raise CheckpointError(
            f"--resume {resume!r} is a checkpoint pointer file; pass its run folder ({folder.parent.parent}) "
            "to resume from the newest intact checkpoint, or the step folder it names"
        )
    if not is_complete(folder):
        raise CheckpointError(
            f"--resume {resume!r} is not a complete checkpoint folder (expected a step-XXXXXXXX folder "
            f"holding {STATE_FILE}); pass the run folder to use its newest intact checkpoint, or --resume "
            "auto for this run's own output folder"
        )
    try:
        return folder, verify_manifest(folder)
    except CheckpointError as exc:
        raise CheckpointError(
            f"--resume {resume!r}: {exc}; pass an older step folder or the run folder to use the newest "
            "intact checkpoint"
        ) from None


def _sleep_hook(temporary: Path, step: int) -> None:
    spec = os.environ.get(SLEEP_HOOK_ENV)
    if not spec:
        return
    hook_step, _, seconds = spec.partition(":")
    if int(hook_step) == step:
        (temporary / "HOOK_SLEEPING").write_text(str(os.getpid()), encoding="utf-8")
        time.sleep(float(seconds or 60))


def save_checkpoint(
    accelerator, root: Path, step: int, state: dict, keep_last: int, is_best: bool, parts: TrainingParts
) -> Path:
    """Write a complete checkpoint of ``parts``; all ranks call this (each writes its generator states).

    Args:
        accelerator: the run's ``Accelerator``.
        root: the ``checkpoints`` folder.
        step: the optimiser step the state is at.
        state: JSON-able trainer state written to ``trainer_state.json``.
        keep_last: complete checkpoints to keep besides the best.
        is_best: make ``best`` point to this checkpoint.
        parts: the live objects to save (see :mod:`training.state_io`).

    Returns:
        The final folder.
    """
    name = step_dir_name(step)
    temporary, final = root / f".tmp-{name}", root / name
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        remove_entry(temporary)
        temporary.mkdir()
    accelerator.wait_for_everyone()
    save_training_state(temporary, parts, accelerator.process_index, accelerator.is_main_process)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (temporary / STATE_FILE).write_text(
            json.dumps(state, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        write_manifest(temporary)  # last: every file is complete when it is hashed
        fsync_tree(temporary)
        _sleep_hook(temporary, step)
        retired = root / f".tmp-old-{name}"
        remove_entry(retired)
        if os.path.lexists(final):  # the same step saved again: move the old copy aside, never delete first
            os.rename(final, retired)
        os.rename(temporary, final)
        remove_entry(retired)  # a symlink (planted, never followed): the link only
        fsync_dir(root)
        write_pointer(root, "latest", name)
        if is_best:
            write_pointer(root, "best", name)
        prune(root, keep_last)
        logger.info("checkpoint saved: %s", final)
    accelerator.wait_for_everyone()
    return final


def prune(root: Path, keep_last: int) -> None:
    """Delete complete checkpoints except the newest ``keep_last``, ``latest`` and ``best``."""
    keep = {path.name for path in complete_checkpoints(root)[-keep_last:]}
    for pointer in ("latest", "best"):
        target = read_pointer(root, pointer)
        if target is not None:
            keep.add(target.name)
    for path in complete_checkpoints(root):
        if path.name not in keep:
            shutil.rmtree(path, ignore_errors=True)


def read_state(folder: Path) -> dict:
    """The ``trainer_state.json`` of a checkpoint folder (size-capped: it may be read before the manifest
    is verified); any failure is a :class:`CheckpointError` naming the file."""
    return read_json(folder / STATE_FILE, max_bytes=_MAX_STATE_BYTES)


def recorded_settings(folder: Path) -> tuple[Any, Path | None]:
    """The settings (``TrainingConfig.to_dict()``) a checkpoint was written with, and where they came from.

    A checkpoint records them in its trainer_state.json; for one written before it did (older versions)
    the ``config.yaml`` of its run folder (``folder/../../config.yaml``) stands in, read size-capped and
    without YAML aliases (a 334-byte alias bomb expanded to gigabytes): the last settings any run wrote
    there, so only a hint (see :func:`training.checks.check_resume_settings`). ``(None, None)`` when
    neither can be read.
    """
    state = read_state(folder)
    if isinstance(state, dict) and "config" in state:
        return state["config"], folder / STATE_FILE
    saved = folder.parent.parent / "config.yaml"
    try:
        if not saved.is_file() or saved.stat().st_size > _MAX_STATE_BYTES:
            return None, None
        text = saved.read_text(encoding="utf-8")
        if any(isinstance(event, yaml.AliasEvent) for event in yaml.parse(text, Loader=yaml.SafeLoader)):
            raise yaml.YAMLError("aliases are not allowed in a run's config.yaml")
        return yaml.safe_load(text), saved
    except (OSError, ValueError, yaml.YAMLError, RecursionError) as exc:  # ValueError: a bad date, huge ints
        logger.warning("%s cannot be read (%s); the resume cannot compare its settings", saved, exc)
        return None, None
