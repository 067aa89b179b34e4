"""The durable index store: log framing, torn tails, replay, atomic snapshots and crashes inside them.

The reference for every check is a plain dict of id -> vector kept by the test and a numpy brute-force
search over it (independent of FAISS, the log and the snapshot code).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from visreg_hub.errors import CheckpointError
from visreg_hub.serving.store import DurableIndex, IdConflictError
from visreg_hub.serving.wal import LogRecord, read_log

DIM = 8
ROOT = Path(__file__).resolve().parents[2]


def new_index():
    from visreg_hub.retrieval import EmbeddingIndex

    return EmbeddingIndex(DIM, metric="ip", normalize=True, model_name="m")


def unit(rng, n):
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def check_matches(store: DurableIndex, expected: dict[int, np.ndarray], meta: dict[int, dict]) -> None:
    """Same ids as ``expected``; every vector finds itself first, with its metadata."""
    assert sorted(int(i) for i in store.index.ids) == sorted(expected)
    assert len(store) == len(expected)
    if not expected:
        return
    ids = np.asarray(sorted(expected))
    queries = np.stack([expected[i] for i in ids])
    result = store.search(queries, k=1)
    np.testing.assert_array_equal(result.ids[:, 0], ids)
    assert [row[0] for row in result.metadata] == [meta.get(int(i)) for i in ids]


def test_log_record_round_trip_and_torn_tail(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "log.wal"
    records = [
        LogRecord("add", np.arange(3, dtype=np.int64), unit(rng, 3), [{"a": 1}, None, {"b": [1, 2]}]),
        LogRecord("remove", np.asarray([1], dtype=np.int64)),
        LogRecord("add", np.asarray([7], dtype=np.int64), unit(rng, 1), None),
    ]
    blobs = [r.encode() for r in records]
    data = b"".join(blobs)
    path.write_bytes(data)
    read, good = read_log(path)
    assert good == len(data) and [r.op for r in read] == ["add", "remove", "add"]
    np.testing.assert_array_equal(read[0].vectors, records[0].vectors)
    assert read[0].metadata == records[0].metadata and read[2].metadata is None
    # every cut inside the last record loses exactly that record
    start = len(blobs[0]) + len(blobs[1])
    for cut in range(start, len(data)):
        path.write_bytes(data[:cut])
        read, good = read_log(path)
        assert len(read) == 2 and good == start, cut
    # a flipped byte in the last record's payload fails its checksum
    flipped = bytearray(data)
    flipped[-3] ^= 0xFF
    path.write_bytes(bytes(flipped))
    assert len(read_log(path)[0]) == 2


def crash(store: DurableIndex) -> None:
    """What kill -9 does to a store's folder: its lock is released, nothing is snapshotted or closed."""
    os.close(store._folder_lock)


def test_a_folder_is_served_by_one_store_only(tmp_path):
    """Two stores on one folder (two --index entries, or two servers) each compacted away the other's
    log: acknowledged adds were lost. The second one is refused; the folder is free again once closed."""
    folder = tmp_path / "idx"
    store = DurableIndex(folder, new_index)
    store.add(unit(np.random.default_rng(0), 1))
    with pytest.raises(CheckpointError, match=rf"already served \(by pid {os.getpid()}\)"):
        DurableIndex(tmp_path / "." / "idx", new_index)
    script = f"from tests.serving.test_store import *; DurableIndex({str(folder)!r}, new_index)"
    other = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert other.returncode != 0 and "already served" in other.stderr  # another process
    store.close()
    assert DurableIndex(folder, new_index).index.count == 1


def test_replay_after_reopen_and_torn_tail_is_cut(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "idx"
    store = DurableIndex(folder, new_index, snapshot_every=1000)
    expected, meta = {}, {}
    for step in range(5):
        vectors = unit(rng, 4)
        metadata = [{"step": step, "j": j} for j in range(4)]
        ids = store.add(vectors, metadata)
        expected.update(zip(ids.tolist(), vectors))
        meta.update(zip(ids.tolist(), metadata))
    for victim in (1, 6, 13):
        assert store.remove([victim]) == [victim]
        del expected[victim], meta[victim]
    assert store.remove([1]) == []  # already gone: nothing logged
    log = folder / "log-000000.wal"
    size = log.stat().st_size
    # no close(): as after kill -9, only the log holds the state; add a torn half record
    with log.open("ab") as handle:
        handle.write(LogRecord("add", np.asarray([99], np.int64), unit(rng, 1), None).encode()[:30])
    crash(store)
    reopened = DurableIndex(folder, new_index)
    assert log.stat().st_size == size  # the torn tail was cut off
    check_matches(reopened, expected, meta)
    assert reopened.next_id == 20  # ids are never reused, even after removing the highest
    more = unit(rng, 2)
    ids = reopened.add(more, None)
    assert ids.tolist() == [20, 21]
    expected.update(zip(ids.tolist(), more))
    crash(reopened)
    check_matches(DurableIndex(folder, new_index), expected, meta)


def test_snapshot_compacts_the_log_atomically(tmp_path):
    rng = np.random.default_rng(2)
    folder = tmp_path / "idx"
    store = DurableIndex(folder, new_index, snapshot_every=3)
    expected = {}
    for _ in range(7):
        vectors = unit(rng, 2)
        expected.update(zip(store.add(vectors).tolist(), vectors))
    # 7 records: snapshots after records 3 and 6, one record in the current log
    assert store.generation == 2
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["CURRENT", "LOCK", "log-000002.wal", "snapshot-000002"]
    assert len(read_log(folder / "log-000002.wal")[0]) == 1
    store.close()  # graceful shutdown: a final snapshot, an empty log
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["CURRENT", "LOCK", "log-000003.wal", "snapshot-000003"]
    assert read_log(folder / "log-000003.wal") == ([], 0)
    check_matches(DurableIndex(folder, new_index), expected, {})


@pytest.mark.parametrize("crash_at", ["staging-rename", "current-rename"])
def test_crash_inside_a_snapshot_keeps_the_old_state(tmp_path, monkeypatch, crash_at):
    rng = np.random.default_rng(3)
    folder = tmp_path / "idx"
    store = DurableIndex(folder, new_index, snapshot_every=10**6)
    expected = {}
    for _ in range(3):
        vectors = unit(rng, 3)
        expected.update(zip(store.add(vectors).tolist(), vectors))
    real_replace = os.replace

    def crashing_replace(src, dst):
        name = Path(dst).name
        if (crash_at == "staging-rename" and name.startswith("snapshot-")) or (
            crash_at == "current-rename" and name == "CURRENT"
        ):
            raise OSError("simulated crash")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crashing_replace)
    with pytest.raises(OSError, match="simulated crash"):
        store.snapshot()
    monkeypatch.setattr(os, "replace", real_replace)
    (folder / ".CURRENT.tmp-4242").write_text("{}")  # what a SIGKILL mid-write would leave
    (folder / "..snapshot-000001.tmp.saving-4242").mkdir()  # ... or in the middle of EmbeddingIndex.save
    crash(store)
    reopened = DurableIndex(folder, new_index)  # the old log is still in charge
    check_matches(reopened, expected, {})
    assert reopened.generation == 0
    assert sorted(p.name for p in folder.iterdir()) == ["LOCK", "log-000000.wal"]  # leftovers removed


def test_existing_index_folder_is_the_base_and_never_modified(tmp_path):
    from visreg_hub.retrieval import EmbeddingIndex

    rng = np.random.default_rng(4)
    folder = tmp_path / "built"
    base = EmbeddingIndex(DIM, metric="ip", normalize=True, model_name="m")
    base_vectors = unit(rng, 5)
    base.add(base_vectors, ids=np.arange(100, 105), metadata=[{"k": i} for i in range(5)])
    base.save(folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    store = DurableIndex(folder, new_index, snapshot_every=2)
    assert store.next_id == 105
    extra = unit(rng, 4)
    for pair in (extra[:2], extra[2:]):
        store.add(pair)
    store.close()
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.name in before} == before
    expected = dict(zip(range(100, 105), base_vectors)) | dict(zip(range(105, 109), extra))
    check_matches(DurableIndex(folder, new_index), expected, {100 + i: {"k": i} for i in range(5)})


def test_bad_writes_log_nothing(tmp_path):
    folder = tmp_path / "idx"
    store = DurableIndex(folder, new_index)
    ids = store.add(unit(np.random.default_rng(5), 1), ids=[7])
    assert ids.tolist() == [7]
    for bad in (
        lambda: store.add(np.ones((1, DIM), np.float32), ids=[7]),
        lambda: store.add(np.ones((2, DIM), np.float32), ids=[8, 8]),
        lambda: store.add(np.ones((1, DIM + 1), np.float32)),
        lambda: store.add(np.full((1, DIM), np.nan, np.float32)),
        lambda: store.add(np.ones((1, DIM), np.float32), metadata=[{}, {}]),
    ):
        with pytest.raises((IdConflictError, ValueError)):
            bad()
    assert len(read_log(folder / "log-000000.wal")[0]) == 1


@pytest.mark.parametrize("content", ["{not json", '{"generation": 1, "snapshot": "../etc"}', "[]"])
def test_malformed_current_is_a_clear_error(tmp_path, content):
    folder = tmp_path / "idx"
    folder.mkdir()
    (folder / "CURRENT").write_text(content)
    with pytest.raises(CheckpointError, match="CURRENT"):
        DurableIndex(folder, new_index)


def test_refused_adds_are_never_logged_and_take_no_id(tmp_path):
    """Everything the in-memory index refuses is refused before the log: an all-zero vector of a
    normalising index, ids past the largest, booleans, metadata JSON cannot hold. After a crash (no
    close) the store reopens, and the next automatic id is the one after the last accepted add."""
    folder = tmp_path / "idx"
    store = DurableIndex(folder, new_index)
    rng = np.random.default_rng(9)
    assert store.add(unit(rng, 1)).tolist() == [0]
    ones = np.ones((1, DIM), np.float32)
    for vectors, kwargs in (
        (np.zeros((1, DIM), np.float32), {}),
        (ones, {"ids": [2**63 - 1]}),  # next_id would leave int64
        (ones, {"ids": [2**64]}),
        (ones, {"ids": np.array([True])}),
        (ones, {"metadata": [{"x": object()}]}),
    ):
        with pytest.raises(ValueError):
            store.add(vectors, **kwargs)
    tiny = np.full((1, DIM), 1e-30, np.float32)  # its float32 squares underflow, but it has a direction
    assert store.add(tiny).tolist() == [1]
    assert len(read_log(folder / "log-000000.wal")[0]) == 2
    crash(store)  # no snapshot: the log is all there is
    reopened = DurableIndex(folder, new_index)
    assert sorted(reopened.index.ids.tolist()) == [0, 1]
    hit = reopened.search(np.ones((1, DIM), np.float32), k=1)
    assert hit.ids[0, 0] == 1 and abs(hit.scores[0, 0] - 1.0) < 1e-5  # normalised in float64
    assert reopened.add(unit(rng, 1)).tolist() == [2]


def test_the_largest_id_keeps_the_store_usable(tmp_path):
    """ids reach MAX_ID = 2**63 - 2, so next_id (MAX_ID + 1) is still an int64: the counter then
    reports exhaustion as a ValueError (a 4xx), and snapshot + reopen work."""
    from visreg_hub.retrieval.records import MAX_ID

    assert np.iinfo(np.int64).max - 1 == MAX_ID
    folder = tmp_path / "idx"
    store = DurableIndex(folder, new_index)
    rng = np.random.default_rng(10)
    assert store.add(unit(rng, 1), ids=[MAX_ID]).tolist() == [MAX_ID]
    assert store.next_id == MAX_ID + 1
    with pytest.raises(ValueError, match="automatic ids are used up"):
        store.add(unit(rng, 1))
    assert store.add(unit(rng, 1), ids=[5]).tolist() == [5]
    store.close()
    reopened = DurableIndex(folder, new_index)
    assert sorted(reopened.index.ids.tolist()) == [5, MAX_ID] and reopened.next_id == MAX_ID + 1


def test_replay_skips_a_record_the_index_refuses(tmp_path, caplog):
    """Logs written by older versions could hold an add that was refused (and never acknowledged)
    after it was logged; start-up skips that record, says so, and keeps the others."""
    from visreg_hub.serving.wal import LogWriter

    folder = tmp_path / "idx"
    folder.mkdir()
    rng = np.random.default_rng(11)
    good = unit(rng, 2)
    writer = LogWriter(folder / "log-000000.wal")
    writer.append(LogRecord("add", np.array([0]), good[:1], None))
    writer.append(LogRecord("add", np.array([1]), np.zeros((1, DIM), np.float32), None))
    writer.append(LogRecord("add", np.array([2]), good[1:], None))
    # review of probe 20: a record of an older version holding one vector now refused (too long for finite
    # scores) among acknowledged ones; the others are kept, not the whole record dropped
    more = unit(rng, 3)
    more[1] *= 1e20
    writer.append(LogRecord("add", np.array([3, 4, 5]), more, [{"n": 3}, {"n": 4}, {"n": 5}]))
    writer.close()
    with caplog.at_level("ERROR"):
        store = DurableIndex(folder, new_index)
    assert "log-000000.wal: log record 1 is skipped, the index refuses it" in caplog.text
    assert "log record 3: item 4 is skipped, the index refuses it" in caplog.text
    check_matches(store, {0: good[0], 2: good[1], 3: more[0], 5: more[2]}, {3: {"n": 3}, 5: {"n": 5}})


def test_loading_a_serve_store_as_an_index_names_its_snapshot(tmp_path):
    """`visreg-hub search` / EmbeddingIndex.load on a serve store said only 'no manifest.json'."""
    from visreg_hub.retrieval import EmbeddingIndex

    folder = tmp_path / "idx"
    store = DurableIndex(folder, new_index, snapshot_every=1)
    store.add(unit(np.random.default_rng(0), 2))  # one record: a snapshot follows
    store.close()
    current = json.loads((folder / "CURRENT").read_text())["snapshot"]
    expected = rf"serve` index store .* pass {re.escape(str(folder / current))}"
    with pytest.raises(FileNotFoundError, match=expected):
        EmbeddingIndex.load(folder)
    assert EmbeddingIndex.load(folder / current).count == 2  # the named folder is the index


def _store_with_items(folder: Path, count: int = 5, *, snapshot: bool = True):
    """A store with ``count`` acknowledged items (snapshot-000001 when ``snapshot``, then 2 logged adds)."""
    rng = np.random.default_rng(3)
    store = DurableIndex(folder, new_index, snapshot_every=10**6)
    vectors = unit(rng, count)
    for row in vectors[: count - 2]:
        store.add(row[None])
    if snapshot:
        store.snapshot()
    for row in vectors[count - 2 :]:
        store.add(row[None])
    store._log.close()
    os.close(store._folder_lock)
    return {int(i): v for i, v in zip(store.index.ids, vectors, strict=True)}


@pytest.mark.parametrize("generation", [2, 7])
def test_a_current_naming_a_missing_snapshot_removes_nothing(tmp_path, generation):
    """Probe 9: CURRENT naming snapshot-000002 made start-up delete snapshot-000001 and its log (every
    acknowledged item) before it found the named snapshot missing."""
    folder = tmp_path / "idx"
    expected = _store_with_items(folder)
    before = sorted(p.name for p in folder.iterdir())
    state = {"generation": generation, "snapshot": f"snapshot-{generation:06d}", "next_id": 5}
    (folder / "CURRENT").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=r"names snapshot-0000\d\d, which is missing .*snapshot-000001"):
        DurableIndex(folder, new_index)
    assert sorted(p.name for p in folder.iterdir()) == before
    state = {"generation": 1, "snapshot": "snapshot-000001", "next_id": 5}
    (folder / "CURRENT").write_text(json.dumps(state))
    check_matches(DurableIndex(folder, new_index), expected, {})  # the fix the message names works


@pytest.mark.parametrize("name", ["log-000001.wal", "LOCK", "CURRENT", "snapshot-000001"])
def test_store_files_that_are_links_are_refused_before_anything_is_written(tmp_path, name):
    """A log linked to a file elsewhere was truncated to 0 bytes and then appended to; a linked LOCK got
    the server's pid written over the target; a linked snapshot was loaded."""
    folder = tmp_path / "idx"
    _store_with_items(folder)
    real = folder / name
    elsewhere = tmp_path / "elsewhere"
    real.rename(elsewhere)
    real.symlink_to(elsewhere, target_is_directory=elsewhere.is_dir())
    snapshot_of = {p: p.read_bytes() for p in [elsewhere] if p.is_file()}
    with pytest.raises(CheckpointError, match="is a symlink; an index store only reads, writes and deletes"):
        DurableIndex(folder, new_index)
    for path, data in snapshot_of.items():
        assert path.read_bytes() == data  # not truncated, not overwritten


def test_a_fifo_among_the_store_files_is_refused_not_waited_on(tmp_path):
    folder = tmp_path / "idx"
    folder.mkdir()
    os.mkfifo(folder / "log-000000.wal")
    with pytest.raises(CheckpointError, match="is not a regular file"):
        DurableIndex(folder, new_index)


def test_damage_inside_the_log_is_refused_not_cut_off(tmp_path):
    """Only the tail of a log can be torn by a crash. One flipped byte in record 2 of 5 cut the log there
    (losing records 3-5, all acknowledged) with a warning calling it a torn tail."""
    folder = tmp_path / "idx"
    expected = _store_with_items(folder, 6, snapshot=False)
    log = folder / "log-000000.wal"
    data = bytearray(log.read_bytes())
    record = len(data) // 6
    data[record + record // 2] ^= 0xFF  # inside the second record's payload
    log.write_bytes(bytes(data))
    refusal = r"damaged, but an intact record follows .*truncate -s \d+"
    with pytest.raises(CheckpointError, match=refusal) as caught:
        DurableIndex(folder, new_index)
    assert log.read_bytes() == bytes(data)  # nothing was cut
    good = int(re.search(r"truncate -s (\d+)", str(caught.value)).group(1))
    assert good == record
    os.truncate(log, good)  # the fix the message names: keep the intact prefix
    store = DurableIndex(folder, new_index)
    assert sorted(int(i) for i in store.index.ids) == sorted(expected)[:1]


def test_a_failed_snapshot_never_fails_the_change_that_triggered_it(tmp_path, caplog):
    """Probe 19: a snapshot that failed (a full disk) after an add's log record was fsynced and applied made
    the server answer 500 for a committed add, and every later add retried the snapshot and failed the same
    way (a client retrying on 500 made duplicates). Now the change returns, the failure is logged and kept
    in ``snapshot_error``, the next try waits another ``snapshot_every`` changes, and nothing is lost."""
    rng = np.random.default_rng(7)
    folder = tmp_path / "idx"
    store = DurableIndex(folder, new_index, snapshot_every=2)
    first = unit(rng, 1)
    expected = dict(zip(store.add(first).tolist(), first))
    blocker = folder / ".snapshot-000001.tmp"  # a file where the snapshot stages its folder: save fails
    blocker.write_text("in the way")
    with caplog.at_level("ERROR", logger="visreg_hub.serving.store"):
        for _ in range(2):  # change 2 reaches snapshot_every: its snapshot fails, yet it returns
            vectors = unit(rng, 1)
            expected.update(zip(store.add(vectors).tolist(), vectors))
    failures = [r for r in caplog.records if "snapshot failed" in r.getMessage()]
    assert len(failures) == 1 and store.snapshot_error is not None  # change 3 did not retry it
    assert "every change is still in the log" in failures[0].getMessage() and store.generation == 0
    blocker.unlink()  # space again: the next due snapshot (change 4, a remove) succeeds
    removed = store.remove([next(iter(expected))])
    expected.pop(removed[0])
    assert store.generation == 1 and store.snapshot_error is None
    vectors = unit(rng, 1)
    expected.update(zip(store.add(vectors).tolist(), vectors))
    crash(store)
    check_matches(DurableIndex(folder, new_index), expected, {})


def test_leftovers_with_random_names_are_removed_on_open(tmp_path):
    """Probe 19: temporary files are named .CURRENT.tmp-<16 hex> now, but the clean-up still matched
    decimal pids only, so a kill during a CURRENT write left them for good."""
    folder = tmp_path / "idx"
    store = DurableIndex(folder, new_index, snapshot_every=10**6)
    store.add(unit(np.random.default_rng(8), 2))
    store.close()
    (folder / ".CURRENT.tmp-55e1964c46e5cb9b").write_text("{}")
    DurableIndex(folder, new_index).close()
    assert not (folder / ".CURRENT.tmp-55e1964c46e5cb9b").exists()


@pytest.mark.parametrize(
    "header",
    [{"op": "add", "ids": [2**70], "dim": DIM}, {"op": "add", "ids": [1], "dim": 1e400},
     {"op": "remove", "ids": [-(2**70)]}],
    ids=["huge-id", "infinite-dim", "huge-removed-id"],
)  # fmt: skip
def test_a_checksummed_record_out_of_range_is_damage_not_an_overflow(tmp_path, header):
    """Probe 20: a record with a right checksum and an id past int64 (or dim 1e400) crashed
    `serve --index` with OverflowError. It is now an unreadable record like any other: cut as a torn
    tail when last, refused (nothing cut) when intact records follow it."""
    import struct
    import zlib

    from visreg_hub.serving import wal

    body = b"\0" * (4 * DIM) if header["op"] == "add" else b""
    payload = json.dumps(header).encode() + b"\0" + body
    hostile = struct.pack("<2sBBII", wal.MAGIC, wal.VERSION, 0, len(payload), zlib.crc32(payload)) + payload
    good = LogRecord("remove", np.asarray([3], dtype=np.int64)).encode()
    path = tmp_path / "log.wal"
    path.write_bytes(good + hostile)
    assert [r.op for r in read_log(path)[0]] == ["remove"] and read_log(path)[1] == len(good)
    path.write_bytes(good + hostile + good)
    with pytest.raises(CheckpointError, match=rf"record at byte {len(good)} is damaged"):
        read_log(path)
