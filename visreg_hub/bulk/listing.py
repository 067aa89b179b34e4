"""The input listing of a bulk embedding job, streamed: folders, file lists and webdataset tar shards.

Inputs, in the order given:

* a folder: its image files, recursively, each directory's entries sorted by name, hidden names
  skipped (only one directory's names are held at a time);
* a ``.txt`` file: one image path per line (relative paths are relative to the list's folder; blank
  lines and lines starting with ``#`` are skipped);
* a ``.tar`` shard in webdataset layout: members grouped by key (the member path up to the first dot of
  its file name), ``key.jpg`` (or another image extension) plus optional ``key.json`` / ``key.cls``;
* an image file.

An entry that cannot be embedded is still an item, with ``error`` set (one failure record, nothing
else lost): an unlistable folder, a symlink loop, a dangling link or FIFO with an image name, a folder
or non-regular file named in a ``.txt`` list, a tar image member over :data:`MAX_IMAGE_BYTES`, a second
copy of one tar member name, a tar link member without data.

The listing is read twice (a cheap first pass for its digest and count, then the embedding pass),
never held in memory. Its digest names every item in order, so a resumed job can tell whether it is
looking at the same inputs.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from visreg_hub.errors import UserInputError, VisregHubError
from visreg_hub.inference.images import IMAGE_EXTENSIONS
from visreg_hub.inference.inputs import walk_image_entries

TAR_SUFFIXES = (".tar",)
LIST_SUFFIXES = (".txt",)
_IMAGE_EXTS = tuple(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)
MAX_SIDE_BYTES = 1 << 20  # a name.json / name.cls side file larger than this is not metadata
# why: a tar member is read whole into memory before the decoder's pixel cap can refuse it, so one
# crafted multi-GB member would be one multi-GB allocation; larger image members are failures
MAX_IMAGE_BYTES = 256 * 2**20


class InputError(VisregHubError, FileNotFoundError):
    """An input of ``embed`` is missing or of a kind it cannot read."""


@dataclass
class Item:
    """One listed image.

    Attributes:
        path: the image file, or the tar shard holding it (absolute).
        key: None for files; the member key inside the tar shard.
        member: tar member name of the image (None for files or a key without an image).
        payload: the member's bytes, read in the embedding pass only (None for files).
        cls: text of ``key.cls``; json: text of ``key.json`` (tar members only).
        error: set when the listing already knows the item cannot be embedded.
        refs: where the image and side members' bytes are in the tar, so another process can read
            them without scanning the tar (the Ray engine).
    """

    path: str
    key: str | None = None
    member: str | None = None
    payload: bytes | None = None
    cls: str | None = None
    json: str | None = None
    error: str | None = None
    refs: dict[str, tuple[int, int]] | None = None  # tar members: "image"/"cls"/"json" -> (offset, size)

    def identity(self) -> bytes:
        """What the listing digest hashes for this item."""
        return f"{self.path}\0{self.key or ''}\n".encode("utf-8", "surrogateescape")


def check_inputs(inputs: list[str | os.PathLike]) -> list[str]:
    """Absolute input paths; an InputError for a missing one or one of an unknown kind."""
    if not inputs:
        raise InputError("no inputs given; pass folders, .txt file lists, .tar shards or image files")
    resolved = []
    for item in inputs:
        path = Path(item).expanduser()
        if not path.exists():
            raise InputError(f"input not found: {str(item)!r} (expected a folder, .txt list, .tar or image)")
        suffix = path.suffix.lower()
        if not path.is_dir() and not path.is_file():
            raise InputError(
                f"input {str(item)!r} is not a regular file or a folder (a FIFO, socket or device?); "
                f"pass image files, folders, .txt lists or .tar shards"
            )
        if path.is_file() and suffix not in TAR_SUFFIXES + LIST_SUFFIXES + tuple(IMAGE_EXTENSIONS):
            raise InputError(
                f"input {str(item)!r} is not a folder, .txt file list, .tar shard or image file "
                f"(got suffix {suffix or 'none'!r}); compressed tars: decompress to .tar first"
            )
        resolved.append(os.path.abspath(path))
    check_no_overlap(inputs, resolved)
    return resolved


def check_no_overlap(inputs: list[str | os.PathLike], resolved: list[str]) -> None:
    """Refuse an input named twice, or inside a folder that is also an input: its images would be embedded
    twice (and each would find itself second in every search of the index built from them)."""
    seen: dict[str, str | os.PathLike] = {}
    for item, path in zip(inputs, resolved, strict=True):
        real = os.path.realpath(path)
        if real in seen:
            raise UserInputError(
                f"{str(item)!r} is given twice (also as {str(seen[real])!r}); name each input once, or its "
                "images are embedded twice"
            )
        seen[real] = item
    folders = {real: item for real, item in seen.items() if os.path.isdir(real)}
    for real, item in seen.items():
        parent = os.path.dirname(real)
        while parent != os.path.dirname(parent):  # up to the root
            if parent in folders:
                raise UserInputError(
                    f"{str(item)!r} is inside {str(folders[parent])!r}, also an input; name only the outer "
                    "folder, or its images are embedded twice"
                )
            parent = os.path.dirname(parent)


def _walk(root: str) -> Iterator[Item]:
    """The image files under ``root`` in :func:`~visreg_hub.inference.inputs.walk_image_entries`' order
    (``encode(folder)``'s); what cannot be read is a failed item.

    why: one unreadable folder, symlink loop or dangling link must not abort or silently shrink the
    listing; it becomes a failure record and everything else is still embedded.
    """
    for walked in walk_image_entries(root):
        if walked.unlistable:
            yield Item(path=walked.path, error=f"{walked.path}: {walked.left_out}")
        else:
            yield Item(path=walked.path, error=walked.problem and f"{walked.path}: {walked.problem}")


def _list_file(path: str) -> Iterator[Item]:
    """The items of a ``.txt`` list; a line naming a folder or a non-regular file is a failed item.

    why: the pipeline expands a folder into its images, which would shift every later row of the shard
    onto the wrong vector; a FIFO would block the decoder forever.
    """
    base = os.path.dirname(path)
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as handle:
        for line in handle:
            line = line.rstrip("\r\n")  # only the line ending: a file name may begin or end with a space
            if line.strip() and not line.lstrip().startswith("#"):
                listed = os.path.normpath(os.path.join(base, os.path.expanduser(line)))
                yield Item(path=listed, error=_not_a_file(listed, path))


def _not_a_file(listed: str, source: str) -> str | None:
    """Why the listed path cannot be embedded as one image file, or None (a missing file is left for the
    decoder to report, as for any other unreadable file)."""
    try:
        mode = os.stat(listed).st_mode
    except FileNotFoundError:
        return None
    except OSError as exc:  # ELOOP, EACCES on a parent, ...
        return f"{listed}: cannot read this entry of {source} ({exc.strerror or exc}); fix or remove it"
    if stat.S_ISDIR(mode):
        return (
            f"{listed} (listed in {source}) is a directory; list its image files in the .txt, or pass "
            f"the folder itself as an input"
        )
    if not stat.S_ISREG(mode):
        return f"{listed} (listed in {source}) is not a regular file (a FIFO, socket or device)"
    return None


def split_member(name: str) -> tuple[str, str]:
    """webdataset convention: ``dir/abc.seg.jpg`` -> key ``dir/abc``, extension ``seg.jpg`` (lower case)."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def _read_side(tar: tarfile.TarFile, member: tarfile.TarInfo) -> str | None:
    if member.size > MAX_SIDE_BYTES:
        return None
    handle = tar.extractfile(member)
    return None if handle is None else handle.read().decode("utf-8", "replace").strip()


def _member_data(
    member: tarfile.TarInfo, earlier: dict[str, tarfile.TarInfo]
) -> tuple[tarfile.TarInfo, str | None]:
    """The member holding ``member``'s bytes, or why it has none.

    A regular file holds its own. A hard link (GNU tar writes one for every further name of a hard-linked
    file, e.g. a dataset folder made with ``cp -al``) points at an earlier member of the same archive,
    whose data it shares. Symbolic links and special files have no data in the archive.

    Args:
        member: the member just read.
        earlier: the members read before it, by name (the last of each name, as extraction would leave
            it), each mapped to the member holding its bytes.
    """
    if member.isfile():
        return member, None
    if member.islnk():
        # why not tar.getmember(): it reads the whole member table first; in a truncated shard that raises
        # and every member after this link would be lost. A hard link can only point backwards anyway.
        target = earlier.get(member.linkname)
        if target is not None and target.isfile():
            return target, None
        return member, (
            f"is a hard link to {member.linkname!r}, which is not a file stored earlier in the tar (it is "
            f"missing, comes later or is not a regular file); store the file itself (GNU tar: "
            f"--hard-dereference)"
        )
    kind = "a symbolic link" if member.issym() else "not a regular file"
    return member, f"is {kind} inside the tar; webdataset shards must hold the file itself"


def _tar(path: str, read: Callable[[], bool]) -> Iterator[Item]:
    """Items of one webdataset shard; when ``read()`` is true for the item being built, its payload,
    cls and json are read (the embedding pass reads only the shards it embeds).

    Each key is one item: its first image field (``key.jpg``) is embedded; further image fields of the
    sample (``key.seg.png``, ``key.depth.png``) are its other data and left alone. The same member name
    stored twice is a failed item of its own after the key's item, in member order (the same in both
    listing passes: nothing here depends on ``read()``).
    """
    group: Item | None = None
    extra: list[Item] = []  # failed second copies of the key in ``group``, yielded after it
    names: set[str] = set()  # member names of the key in ``group``
    earlier: dict[str, tarfile.TarInfo] = {}  # members read so far, by name, for hard links
    ended = True  # the archive's end-of-archive marker was found (or a failure already covers the rest)
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                data, unreadable = _member_data(member, earlier)
                earlier[member.name] = data
                if member.isdir():
                    continue
                key, ext = split_member(member.name)
                if group is not None and key != group.key:
                    yield _finish(group)
                    yield from extra
                    group, extra, names = None, [], set()
                if group is None:
                    group = Item(path=path, key=key)
                    wanted = read()
                last = ext.rsplit(".", 1)[-1]
                role = "image" if last in _IMAGE_EXTS else last if last in ("cls", "json") else None
                duplicate = member.name in names
                names.add(member.name)
                if role == "image" and duplicate:
                    # why a failed item, not a log line: rows + failures must account for every image
                    # stored, and a warning would print once per listing pass
                    extra.append(Item(path=path, key=key, member=member.name, error=(
                        f"{path}#{key}: {member.name} is stored twice in the tar; the first copy is "
                        f"embedded, not this one (tar would extract this one); remove the duplicate"
                    )))  # fmt: skip
                    continue
                if role == "image" and group.member is not None:
                    continue  # another image field of the sample (key.seg.png after key.jpg)
                if unreadable is not None:
                    if role == "image" and group.member is None:
                        group.member = member.name
                        group.error = f"{path}#{key}: {member.name} {unreadable}"
                    continue
                if role is not None and (group.refs is None or role not in group.refs):
                    group.refs = {**(group.refs or {}), role: (data.offset_data, data.size)}
                try:
                    if role == "image":  # the key's first image (a second one is handled above)
                        group.member = member.name
                        if data.size > MAX_IMAGE_BYTES:
                            group.error = _too_large(path, key, member.name, data.size)
                        elif wanted:
                            handle = tar.extractfile(data)
                            group.payload = b"" if handle is None else handle.read()
                    # side files: the first of each kind, as for the image (and as the Ray plans record)
                    elif wanted and last == "cls" and group.cls is None:
                        group.cls = _read_side(tar, data)
                    elif wanted and last == "json" and group.json is None:
                        group.json = _read_side(tar, data)
                except (tarfile.TarError, OSError, EOFError) as exc:
                    # a member whose data cannot be read fails alone (the listing stays the same)
                    group.error = f"{path}#{key}: cannot read {member.name}: {exc}"
            ended = _has_end_marker(tar)
    except (tarfile.TarError, OSError, EOFError) as exc:
        # why: a damaged shard loses its remaining members, not the job: one failure names where
        if group is not None:
            yield _finish(group)
            yield from extra
            group, extra, names = None, [], set()
        yield Item(path=path, key="<unreadable rest>", error=f"{path}: tar shard is damaged: {exc}")
    if group is not None:
        yield _finish(group)
        yield from extra
    if not ended:
        yield Item(path=path, key="<end of archive>", error=(
            f"{path}: the tar shard ends without its end-of-archive marker, so it was most likely cut short "
            f"(a partial copy or download): members after the last one listed are missing; copy it again"
        ))  # fmt: skip


def _has_end_marker(tar: tarfile.TarFile) -> bool:
    """Whether a zero block follows the last member, as every tar writer puts there.

    why: Python's tarfile reads an archive cut at (or inside) a member header as a normal end, so a
    truncated shard would silently lose every member after the cut.
    """
    handle = tar.fileobj
    handle.seek(tar.offset)
    block = handle.read(tarfile.BLOCKSIZE)
    return len(block) == tarfile.BLOCKSIZE and not block.strip(b"\0")


def read_refs(item: Item, handle) -> Item:
    """Fill ``payload``/``cls``/``json`` of a tar item from its ``refs`` (``handle``: the open tar file).

    The refs come from a plan file on shared storage, so sizes are capped before anything is read.
    """
    for role, (offset, size) in (item.refs or {}).items():
        if role != "image" and size > MAX_SIDE_BYTES:
            continue
        if role == "image" and size > MAX_IMAGE_BYTES:
            item.error = _too_large(item.path, item.key, "the image member", size)
            continue
        handle.seek(offset)
        data = handle.read(size)
        if len(data) != size:
            item.error = f"{item.path}#{item.key}: the tar shard ends inside the {role} member"
        elif role == "image":
            item.payload = data
        else:
            setattr(item, role, data.decode("utf-8", "replace").strip())
    return item


def _too_large(path: str, key: str | None, member: str, size: int) -> str:
    return (
        f"{path}#{key}: {member} is {size} bytes, over the cap of {MAX_IMAGE_BYTES} bytes per image "
        f"(visreg_hub.bulk.listing.MAX_IMAGE_BYTES); shrink or re-encode the image"
    )


def _finish(group: Item) -> Item:
    if group.member is None and group.error is None:
        group.error = (
            f"{group.path}#{group.key}: no image member ({', '.join(_IMAGE_EXTS)}) among this key's "
            f"consecutive members; webdataset needs all files of a key next to each other in the tar"
        )
    return group


def iter_items(inputs: list[str], *, read: Callable[[int], bool] | None = None) -> Iterator[Item]:
    """Stream the listing of ``inputs`` (absolute paths from :func:`check_inputs`), in order.

    Args:
        inputs: absolute paths.
        read: ``read(i)`` says whether item i's tar bytes and side files are needed (the embedding
            pass); None lists names only.
    """
    position = 0

    def wanted() -> bool:
        return read is not None and read(position)

    for source in inputs:
        suffix = os.path.splitext(source)[1].lower()
        if os.path.isdir(source):
            items = _walk(source)
        elif suffix in LIST_SUFFIXES:
            items = _list_file(source)
        elif suffix in TAR_SUFFIXES:
            items = _tar(source, wanted)
        else:
            items = iter([Item(path=source)])
        for item in items:
            yield item
            position += 1


@dataclass(frozen=True)
class ListingSummary:
    """Digest (sha256 over every item's identity, in order) and number of items of a listing.

    ``shard_digests[s]`` is the digest of shard ``s``'s items alone (when summarised with a shard size):
    the embedding pass checks each shard against it before writing it, so a file that disappears or
    appears mid-run can never shift the items of the shards written after it.
    """

    digest: str
    count: int
    shard_digests: tuple[str, ...] = ()


def summarize(inputs: list[str], shard_size: int | None = None) -> ListingSummary:
    """One streaming pass over the listing: its digest, count and (with ``shard_size``) shard digests."""
    digest = hashlib.sha256()
    shard_digests: list[str] = []
    shard = hashlib.sha256()
    count = 0
    for item in iter_items(inputs):
        identity = item.identity()
        digest.update(identity)
        shard.update(identity)
        count += 1
        if shard_size and count % shard_size == 0:
            shard_digests.append(shard.hexdigest())
            shard = hashlib.sha256()
    if shard_size and count % shard_size:
        shard_digests.append(shard.hexdigest())
    return ListingSummary(digest.hexdigest(), count, tuple(shard_digests))
