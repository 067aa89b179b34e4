"""Per-checkpoint manifest: the sha256 and size of every file, written last, verified before a resume.

``manifest.json``::

    {"format": "visreg-checkpoint-manifest", "version": 1,
     "files": {"model.safetensors": {"size": 123, "sha256": "ab12..."}, ...}}

The manifest catches what a crash, a full disk or a flipped bit leaves behind (truncated, missing,
corrupt files); it is not a signature: whoever can write the folder can rewrite the manifest, so the
loader (:mod:`training.state_io`) still treats every byte as untrusted. Only files listed here are read.
"""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path

from visreg_hub.errors import CheckpointError
from visreg_hub.filehash import sha256_file

MANIFEST_FILE = "manifest.json"
FORMAT = "visreg-checkpoint-manifest"
VERSION = 1
MAX_MANIFEST_BYTES = 1024 * 1024
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")  # plain file names: no paths, no dot-files
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def write_manifest(folder: Path) -> dict:
    """Hash every regular file in ``folder`` (except the manifest) into ``folder/manifest.json``."""
    files = {}
    for path in sorted(folder.iterdir()):
        if path.name == MANIFEST_FILE or not path.is_file() or path.is_symlink():
            continue
        files[path.name] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    record = {"format": FORMAT, "version": VERSION, "files": files}
    (folder / MANIFEST_FILE).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return record


def _read_manifest(folder: Path) -> dict[str, dict]:
    path = folder / MANIFEST_FILE
    if path.is_symlink():  # as for the files it lists: the checkpoint is read from its own folder only
        raise CheckpointError(f"{path} is a symlink; a checkpoint's manifest must be a regular file")
    if not path.is_file():
        raise CheckpointError(
            f"{path} is missing: the checkpoint is incomplete or was written by an older visreg_hub (whose "
            "pickled training state is never loaded); resume from a newer checkpoint or start afresh"
        )
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise ValueError(f"larger than {MAX_MANIFEST_BYTES} bytes")
        record = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path} is unreadable ({type(exc).__name__}: {exc})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT or record.get("version") != VERSION:
        raise CheckpointError(f"{path} is not a {FORMAT} version {VERSION} file")
    files = record.get("files")
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{path}: 'files' should be a non-empty mapping of file name to digest")
    for name, entry in files.items():
        if not _NAME.match(name) or name == MANIFEST_FILE:
            raise CheckpointError(f"{path}: {name!r} is not a plain file name")
        if (
            not isinstance(entry, dict)
            or set(entry) != {"size", "sha256"}
            or isinstance(entry["size"], bool)
            or not isinstance(entry["size"], int)
            or entry["size"] < 0
            or not isinstance(entry["sha256"], str)
            or not _SHA256.match(entry["sha256"])
        ):
            raise CheckpointError(f"{path}: the entry of {name!r} should be {{'size': int, 'sha256': hex}}")
    return files


def verify_manifest(folder: Path) -> set[str]:
    """Check every file the manifest lists (regular file, size, sha256).

    Returns:
        The verified file names (the only ones a loader may read).

    Raises:
        CheckpointError: naming the first problem (missing, truncated, corrupt file; bad manifest).
    """
    files = _read_manifest(folder)
    for name, entry in sorted(files.items()):
        path = folder / name
        try:
            info = path.lstat()
        except FileNotFoundError:
            raise CheckpointError(f"{path} is missing (listed in {MANIFEST_FILE})") from None
        except OSError as exc:
            raise CheckpointError(f"{path} is unreadable ({exc})") from None
        if not stat.S_ISREG(info.st_mode):  # symlinks, fifos, devices: never followed or read
            raise CheckpointError(f"{path} is not a regular file")
        if info.st_size != entry["size"]:
            raise CheckpointError(
                f"{path} has {info.st_size} bytes, the manifest says {entry['size']} (truncated or replaced)"
            )
        if sha256_file(path) != entry["sha256"]:
            raise CheckpointError(
                f"{path} does not match its sha256 in {MANIFEST_FILE} (corrupt or modified)"
            )
    return set(files)
