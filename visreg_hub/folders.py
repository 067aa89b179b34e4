"""Reading only inside the folder a user named.

A model, index or checkpoint folder may come from someone else, so it is not trusted to send the reader
elsewhere on the machine: a file in it that is a symlink to ``/etc/passwd`` or ``~/.ssh/id_rsa`` would have
its bytes parsed, and their digest or first bytes could end up in an error message or a log. Each loader
asks :func:`outside_target` before opening a file and refuses such links with its own error type.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


def outside_target(folder: Path, path: Path, also_allowed: Iterable[Path] = ()) -> Path | None:
    """Where ``path`` really leads when that is outside ``folder`` (and every ``also_allowed`` folder).

    Returns:
        The resolved target when symlinks take ``path`` out of the allowed folders, else None (a plain
        file, or a link that stays inside; the folder itself may be a link, since the user named it).
    """
    target = path.resolve()
    roots = [folder.resolve(), *(Path(root).resolve() for root in also_allowed)]
    return None if any(target.is_relative_to(root) for root in roots) else target


def check_inside(folder: Path, path: Path, *, error: type[Exception], what: str) -> None:
    """Refuse ``path`` before it is opened when it leads out of ``folder`` (a symlink) or is no regular
    file (a FIFO or a device would block or stream forever).

    Args:
        error: the caller's error type (each loader has its own).
        what: the folder's kind in the message, e.g. "index folder", "embed output folder".
    """
    if outside_target(folder, path) is not None:
        raise error(
            f"{path} is a symlink to a file outside the {what}; visreg_hub reads only inside the folder it "
            f"is given: put the file itself in {folder} instead of the link, or remove the link"
        )
    if (path.exists() or path.is_symlink()) and not path.is_file():
        raise error(f"{path} is not a regular file (a folder, FIFO or device); remove it from the {what}")
