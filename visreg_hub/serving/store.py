"""Durable index store: an EmbeddingIndex whose changes survive ``kill -9``.

Folder layout (``--index NAME=FOLDER``)::

    FOLDER/CURRENT              {"generation": G, "snapshot": "snapshot-G", "next_id": N}, replaced atomically
    FOLDER/snapshot-G/          EmbeddingIndex.save() output (manifest with checksums, no pickle)
    FOLDER/log-G.wal            records appended since snapshot G (see :mod:`visreg_hub.serving.wal`)
    FOLDER/manifest.json, ...   optional: an index written by ``visreg-hub index build`` or ``save()``;
                                it is the starting state until the first snapshot, and never modified
    FOLDER/LOCK                 held (``flock``) by the one process that serves the folder; holds its pid

One store per folder: a second ``--index`` entry or a second server on the same folder is refused at
start-up, since two writers would each compact away the other's acknowledged log records.

Write path: validate (every check the in-memory index makes, so a record that would be refused is
never logged), append the record to the log and fsync it, then apply it to the in-memory index, then
return (the HTTP handler acknowledges only now). Start-up: load the snapshot CURRENT names
(or the folder's own index, or a new empty one), replay the log's intact records, cut a torn tail off.

Snapshot (every ``snapshot_every`` records and on shutdown): save to a temporary folder, fsync it,
rename it to ``snapshot-G+1``, create an empty ``log-G+1.wal``, then atomically replace CURRENT
(write, fsync, rename, fsync the folder): that rename is the commit point. A crash before it leaves
the old snapshot and log in charge; a crash after it leaves only garbage that the next start removes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from visreg_hub.durable import fsync_tree, try_lock, write_atomic
from visreg_hub.errors import CheckpointError
from visreg_hub.retrieval.records import IdConflictError  # noqa: F401  (re-exported: the 409 of add)
from visreg_hub.serving.wal import LogRecord, LogWriter, read_log

logger = logging.getLogger(__name__)

CURRENT = "CURRENT"
LOCK = "LOCK"
MAX_CURRENT_BYTES = 4096  # CURRENT holds three small fields
# what snapshots leave behind when interrupted (CURRENT.tmp: the temporary name before visreg_hub.durable;
# ..snapshot-G.tmp.saving-PID: EmbeddingIndex.save's staging folder beside the snapshot's)
_GENERATED = re.compile(
    r"^(snapshot-\d{6}|log-\d{6}\.wal|\.snapshot-\d{6}\.tmp|\.\.snapshot-\d{6}\.tmp\.saving-\d+|CURRENT\.tmp"
    r"|\.CURRENT\.tmp-[0-9a-f]+)$"
)


class IndexStore(Protocol):
    """What the API's index routes need of a served index: :class:`DurableIndex`, or a read-only one
    such as the demo's galleries (``demo/gallery_api.py``). Every method may block (disk I/O, a build):
    routes call them from a worker thread, except :attr:`dim` and :attr:`read_only_reason`, which must
    not."""

    read_only_reason: str | None  # None: writable; else why not and what to do (the 403 of adds, deletes)
    snapshot_error: str | None
    write_error: str | None

    @property
    def dim(self) -> int: ...  # the width of query and stored vectors, known without loading anything

    @property
    def index(self) -> Any: ...  # the EmbeddingIndex (metric, kind, normalize, pooling)

    def __len__(self) -> int: ...

    def search(self, queries: np.ndarray, k: int) -> Any: ...  # SearchResult, or None when empty

    def metadata_of(self, item_id: int) -> tuple[bool, dict | None]: ...

    def close(self) -> None: ...


class DurableIndex:
    """An EmbeddingIndex with an fsynced write-ahead log, atomic snapshots and replay on open.

    Thread-safe: every method takes one lock, so FAISS never sees a search during an add. Methods
    block (disk I/O); call them from a worker thread in async code.

    Args:
        folder: the store's folder (created if missing).
        new_index: builds the empty index when the folder holds no index yet.
        snapshot_every: log records after which :meth:`add`/:meth:`remove` take a snapshot.
        prepare: called with the loaded index before the log is replayed (settings such as ``normalize``
            must hold for the replayed adds exactly as they did when those adds were acknowledged).
    """

    read_only_reason = None

    def __init__(
        self,
        folder: str | Path,
        new_index: Callable[[], Any],
        *,
        snapshot_every: int = 10_000,
        prepare: Callable[[Any], None] | None = None,
    ):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        _check_entries(self.folder)  # before any of them is opened, truncated or deleted
        self._folder_lock = _lock_folder(self.folder)
        self.snapshot_every = int(snapshot_every)
        # log records at which add/remove next try a snapshot; a failed one waits another snapshot_every
        self._snapshot_at = self.snapshot_every
        self.snapshot_error: str | None = None  # why the last snapshot failed, until one succeeds
        self.write_error: str | None = None  # why the last change could not be logged, until one is
        self._lock = threading.Lock()
        try:
            self._open(new_index, prepare)
        except BaseException:
            os.close(self._folder_lock)  # a start that fails releases the folder for the next try
            raise

    def _open(self, new_index: Callable[[], Any], prepare: Callable[[Any], None] | None) -> None:
        """Load the state CURRENT names (or the folder's index, or a new one) and replay the log."""
        from visreg_hub.retrieval import EmbeddingIndex

        state = self._read_current()
        self.generation = int(state.get("generation", 0))
        snapshot = state.get("snapshot")
        # load what CURRENT names before removing anything it does not: a CURRENT that names a missing or
        # broken snapshot must fail with every other file still there, not after they were deleted
        if snapshot is not None:
            self.index = self._load_snapshot(EmbeddingIndex, snapshot)
        elif (self.folder / "manifest.json").is_file():
            self.index = EmbeddingIndex.load(self.folder)
        else:
            self.index = new_index()
        self._remove_garbage(snapshot)
        if prepare is not None:
            prepare(self.index)
        self._ids: set[int] = {int(i) for i in self.index.ids.tolist()}
        log_path = self._log_path(self.generation)
        records, valid = read_log(log_path)
        if log_path.exists() and valid != log_path.stat().st_size:
            logger.warning(
                "%s: cutting a torn tail of %d bytes (a write interrupted by a crash, never acknowledged)",
                log_path,
                log_path.stat().st_size - valid,
            )
        for number, record in enumerate(records):
            try:
                self._apply(record, replay=True)
            except ValueError as exc:
                # such a record comes from an older version, which logged before validating or validated
                # less (vectors too long for finite scores were acknowledged before 0.2.1): keep every
                # row the index takes, drop only the refused ones
                self._replay_row_by_row(record, f"{log_path}: log record {number}", exc)
        self._log = LogWriter(log_path, valid)
        self._log.records = len(records)
        logger.info(
            "index %s: %d items (generation %d, %d log records replayed)",
            self.folder,
            len(self._ids),
            self.generation,
            len(records),
        )

    # ------------------------------------------------------------------ files
    def _log_path(self, generation: int) -> Path:
        return self.folder / f"log-{generation:06d}.wal"

    def _read_current(self) -> dict[str, Any]:
        path = self.folder / CURRENT
        if not path.exists():
            return {}
        with path.open("rb") as handle:
            data = handle.read(MAX_CURRENT_BYTES + 1)
        if len(data) > MAX_CURRENT_BYTES:
            raise CheckpointError(f"{path} is over {MAX_CURRENT_BYTES} bytes, not a store's CURRENT file; "
                                  f"restore it from a backup")  # fmt: skip
        try:
            state = json.loads(data.decode("utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise CheckpointError(f"{path} is not valid JSON ({exc}); restore it from a backup") from exc
        generation = state.get("generation") if isinstance(state, dict) else None
        ok = isinstance(generation, int) and not isinstance(generation, bool) and 0 < generation < 10**6
        if not ok or state.get("snapshot") != f"snapshot-{generation:06d}":
            raise CheckpointError(
                f"{path} is malformed (it must name snapshot-G of its generation G); restore it from a backup"
            )
        return state

    def _load_snapshot(self, index_class, snapshot: str):
        """The index CURRENT names; a missing one is an error that names the snapshots that are there."""
        path = self.folder / snapshot
        if not path.is_dir():
            found = sorted(p.name for p in self.folder.glob("snapshot-*"))
            raise CheckpointError(
                f"{self.folder / CURRENT} names {snapshot}, which is missing (snapshots here: "
                f"{', '.join(found) or 'none'}); nothing was removed. Restore the folder from a backup, or "
                "point CURRENT at the newest snapshot here (its log's later changes are then lost)"
            )
        return index_class.load(path)

    def _remove_garbage(self, snapshot: str | None) -> None:
        """Delete generated files that CURRENT does not name (left by a crash during a snapshot)."""
        keep = {snapshot, self._log_path(self.generation).name}
        for path in self.folder.iterdir():
            if _GENERATED.match(path.name) and path.name not in keep and path.name != CURRENT:
                logger.info("removing %s (left over from an interrupted snapshot)", path)
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()

    # ------------------------------------------------------------------ changes
    def _apply(self, record: LogRecord, *, replay: bool = False) -> None:
        ids = record.ids
        if record.op == "add":
            if replay:  # defensive: a record can never repeat a live id, but do not let it break start-up
                fresh = np.asarray([i not in self._ids for i in ids.tolist()], dtype=bool)
                if not fresh.all():
                    logger.warning("log replay: skipping %d ids already present", int((~fresh).sum()))
                ids, vectors = ids[fresh], record.vectors[fresh]
                metadata = [m for m, keep in zip(record.metadata or [None] * len(fresh), fresh) if keep]
            else:
                vectors, metadata = record.vectors, record.metadata
            if len(ids):
                self.index.add(vectors, ids=ids, metadata=metadata)
                self._ids.update(ids.tolist())
        else:
            present = [i for i in ids.tolist() if i in self._ids]
            if present:
                self.index.remove(np.asarray(present, dtype=np.int64))
                self._ids.difference_update(present)

    def _replay_row_by_row(self, record: LogRecord, where: str, error: ValueError) -> None:
        """Apply the rows of a logged add one at a time, logging the ids the index refuses."""
        if record.op != "add" or len(record.ids) < 2:
            logger.error("%s is skipped, the index refuses it: %s", where, error)
            return
        metadata = record.metadata or [None] * len(record.ids)
        for row, item_id in enumerate(record.ids.tolist()):
            rows = slice(row, row + 1)
            single = LogRecord("add", record.ids[rows], record.vectors[rows], [metadata[row]])
            try:
                self._apply(single, replay=True)
            except ValueError as exc:
                logger.error("%s: item %d is skipped, the index refuses it: %s", where, item_id, exc)

    def add(self, vectors: np.ndarray, metadata: list | None = None, ids: Any = None) -> np.ndarray:
        """Durably add (n, D) vectors; returns their int64 ids once the log record is fsynced.

        Raises:
            IdConflictError: a given id is already in the index.
            ValueError: anything :meth:`EmbeddingIndex.add` refuses (shape, NaN, all-zero vectors of a
                normalising index, ids, metadata); nothing is logged then.
        """
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        with self._lock:
            pending = self.index.validate_add(vectors, metadata, ids)
            record = LogRecord("add", pending.ids, vectors, list(metadata) if metadata is not None else None)
            self._append(record)  # durable from here on
            self._apply(record)
            self._maybe_snapshot()
        return pending.ids

    def remove(self, ids: Any) -> list[int]:
        """Durably remove ids; returns those that were present (nothing is logged if none was)."""
        wanted = [int(i) for i in np.asarray(ids, dtype=np.int64).reshape(-1)]
        with self._lock:
            present = [i for i in dict.fromkeys(wanted) if i in self._ids]
            if present:
                record = LogRecord("remove", np.asarray(present, dtype=np.int64))
                self._append(record)
                self._apply(record)
                self._maybe_snapshot()
        return present

    def _append(self, record: LogRecord) -> None:
        """Log ``record`` (fsynced); an OSError (a full disk, a quota) is kept in :attr:`write_error`
        until a change is logged again, so GET /v1/indexes shows it while /ready stays up for reads."""
        try:
            self._log.append(record)
        except OSError as exc:
            self.write_error = f"{type(exc).__name__}: {exc.strerror or exc}"
            raise
        self.write_error = None

    def metadata_of(self, item_id: int) -> tuple[bool, dict | None]:
        """(present, metadata) of one item, under the lock: (False, None) when the index has no such id."""
        with self._lock:
            if item_id not in self._ids:
                return False, None
            return True, self.index.get_metadata([item_id])[0]

    @property
    def dim(self) -> int:
        """The width of the stored vectors (fixed when the index is created)."""
        return self.index.dim

    @property
    def next_id(self) -> int:
        """The next id handed out when an add names none (the index's counter; it only grows)."""
        return self.index.next_id

    def __contains__(self, item_id: object) -> bool:
        return isinstance(item_id, int) and item_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def search(self, queries: np.ndarray, k: int):
        """``EmbeddingIndex.search`` of (Q, D) ``queries`` under the lock (FAISS must not search during an
        add), for at most the ``k`` items the index holds; None when it holds none.

        why here: a caller's own emptiness or size check, made before the lock, races adds and deletes
        (a search racing the delete of the last item was refused as if its query were wrong).
        """
        with self._lock:
            if len(self.index) == 0:
                return None
            return self.index.search(queries, k=min(k, len(self.index)))

    # ------------------------------------------------------------------ snapshots
    def _maybe_snapshot(self) -> None:
        """Snapshot when the log is long enough. A failure (a full disk, a quota) is logged, not raised:
        the change that triggered it is committed (its log record is fsynced and applied), so its caller
        must hear success; the next attempt waits another ``snapshot_every`` records, and the log keeps
        every change meanwhile."""
        if self._log.records < self._snapshot_at:
            return
        try:
            self._snapshot_locked()
        except Exception as exc:  # any failure: the log still holds every change
            self._snapshot_at = self._log.records + self.snapshot_every
            self.snapshot_error = f"{type(exc).__name__}: {exc}"
            logger.error(
                "index %s: snapshot failed (%s); every change is still in the log %s and is kept. Next try "
                "after %d more changes; free space or fix the folder",
                self.folder, self.snapshot_error, self._log_path(self.generation).name, self.snapshot_every,
            )  # fmt: skip

    def snapshot(self) -> None:
        """Write a snapshot and start an empty log (no-op when the log is empty)."""
        with self._lock:
            if self._log.records:
                self._snapshot_locked()

    def _snapshot_locked(self) -> None:
        old_generation, generation = self.generation, self.generation + 1
        name = f"snapshot-{generation:06d}"
        staging = self.folder / f".{name}.tmp"
        # what an earlier failed attempt at this generation left (CURRENT does not name it)
        for leftover in (staging, self.folder / name):
            shutil.rmtree(leftover, ignore_errors=True)
        self.index.save(staging)
        fsync_tree(staging)
        os.replace(staging, self.folder / name)
        new_log = LogWriter(self._log_path(generation))
        state = {"generation": generation, "snapshot": name, "next_id": self.index.next_id}
        # commit point: once CURRENT is replaced (and its folder synced) the new snapshot and empty log rule
        try:
            text = json.dumps(state)
            write_atomic(self.folder / CURRENT, lambda path: path.write_text(text, encoding="utf-8"))
        except BaseException:
            if self._current_generation() != generation:  # not committed: the old log stays the log
                new_log.close()
                self._log_path(generation).unlink(missing_ok=True)
                raise
            # replaced but (say) the folder sync failed: committed, so every later change must go to the
            # new log, which is the one a restart replays
            logger.warning("index %s: CURRENT names snapshot %s although its write reported an error",
                           self.folder, name)  # fmt: skip
        old_log, self._log, self.generation = self._log, new_log, generation
        self._snapshot_at, self.snapshot_error = self.snapshot_every, None
        with contextlib.suppress(OSError):  # committed: the rest is clean-up (garbage is removed at start)
            old_log.close()
            self._log_path(old_generation).unlink(missing_ok=True)
            shutil.rmtree(self.folder / f"snapshot-{old_generation:06d}", ignore_errors=True)
        logger.info("index %s: snapshot %s of %d items", self.folder, name, len(self._ids))

    def _current_generation(self) -> int | None:
        """The generation CURRENT names on disk now (None when it cannot be read)."""
        try:
            return int(self._read_current().get("generation", 0))
        except Exception:  # unreadable: not committed to this generation
            return None

    def close(self) -> None:
        """Snapshot (so the next start replays nothing), close the log and release the folder. A snapshot
        that fails here is logged: the log holds every change, and the next start replays it."""
        try:
            try:
                self.snapshot()
            except Exception as exc:  # the log is complete: a shutdown must still release the folder
                logger.error("index %s: final snapshot failed (%s: %s); the next start replays the log",
                             self.folder, type(exc).__name__, exc)  # fmt: skip
            with self._lock:
                self._log.close()
        finally:
            os.close(self._folder_lock)  # closing the descriptor releases the flock


def _check_entries(folder: Path) -> None:
    """Refuse links and special files under the store's own names (CURRENT, LOCK, snapshots, logs).

    why: the store truncates its log, overwrites LOCK and deletes old snapshots; through a symlink that
    would truncate, overwrite or load a file elsewhere, and a FIFO would hang the start-up.
    """
    for path in folder.iterdir():
        name = path.name
        if name not in (CURRENT, LOCK) and not _GENERATED.match(name):
            continue
        mode = path.lstat().st_mode
        if stat.S_ISLNK(mode):
            raise CheckpointError(
                f"{path} is a symlink; an index store only reads, writes and deletes its own files, so it "
                "refuses links (one could make it truncate or replace a file elsewhere): put the real file "
                "or folder there, or remove the link"
            )
        wanted_dir = name.startswith(("snapshot-", ".snapshot-", "..snapshot-"))
        if (wanted_dir and not stat.S_ISDIR(mode)) or (not wanted_dir and not stat.S_ISREG(mode)):
            kind = "a folder" if wanted_dir else "a regular file"
            raise CheckpointError(f"{path} is not {kind} as an index store writes it; remove it or restore "
                                  "the folder from a backup")  # fmt: skip


def _lock_folder(folder: Path) -> int:
    """Take the folder's exclusive ``flock`` (released when the returned descriptor closes).

    Raises:
        CheckpointError: another process, or another store in this one, serves the folder.
    """
    fd = try_lock(folder / LOCK)
    if fd is None:
        reader = os.open(folder / LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            holder = os.pread(reader, 32, 0).decode("ascii", "replace").strip() or "unknown"
        finally:
            os.close(reader)
        raise CheckpointError(
            f"index folder {folder} is already served (by pid {holder}); two writers would lose each "
            "other's acknowledged changes: stop the other server, or give each --index its own folder"
        )
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    return fd
