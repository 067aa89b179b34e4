"""Resume after ``kill -9`` at random moments: the final output equals an uninterrupted run, no duplicates.

Default run: a forked child embeds 300 real tiles and is SIGKILLed 5 times (fork: no interpreter start-up
per attempt). ``slow``: the CLI in fresh processes over 3,000 tiles, and 2 ranks under ``accelerate
launch``, killed repeatedly.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.bulk.helpers import ROOT, cli, read_output, write_tile_folder
from tests.fixtures_models import tiny_encoder
from visreg_hub.bulk import run_embedding
from visreg_hub.bulk.output import done_shards

pytest.importorskip("pyarrow")


def assert_same_output(resumed, reference):
    rows, vectors, _ = read_output(resumed)
    want_rows, want_vectors, _ = read_output(reference)
    assert len(rows) == len(set(rows)), "an input was embedded twice"
    assert rows == want_rows  # every readable input exactly once, in listing order
    np.testing.assert_array_equal(vectors, want_vectors)  # bit-identical embeddings
    assert (resumed / "failures.jsonl").read_text() == (reference / "failures.jsonl").read_text()
    manifest = json.loads((resumed / "manifest.json").read_text())
    assert manifest["complete"] and manifest["shards_done"] == list(range(manifest["num_shards"]))


def _child(model, inputs, out):
    import torch

    # why: one intra-op thread per process; two spinning OpenMP threads per process on a shared 2-core
    # machine made each run 17x slower
    torch.set_num_threads(1)
    run_embedding(inputs, out, model=model, shard_size=20, batch_size=16)


def _shard_seconds(out) -> float:
    """The median time between two shards of a finished run, from the parquet files' mtimes."""
    stamps = sorted(entry.stat().st_mtime for entry in out.glob("part-*.parquet"))
    return float(np.median(np.diff(stamps)))


def test_kill_9_five_times_then_finish_equals_uninterrupted(tmp_path):
    write_tile_folder(tmp_path / "imgs", 300)
    (tmp_path / "imgs" / "bad.png").write_bytes(b"not an image")
    model = tiny_encoder()
    context = multiprocessing.get_context("fork")
    # the reference runs in a forked child too: same thread count as the killed runs (see _child)
    reference = context.Process(target=_child, args=(model, tmp_path / "imgs", tmp_path / "reference"))
    reference.start()
    reference.join()
    assert reference.exitcode == 0
    shards = len(done_shards(tmp_path / "reference"))
    assert shards == 16  # 301 inputs / 20
    # why: kill on progress, not on a fraction of the reference's wall time. The reference runs cold
    # (first imports, first reads) and a warm run can finish inside that fraction: on CI the first
    # "kill" came after the job was complete. A shard's own time comes from the reference's mtimes.
    shard_seconds = _shard_seconds(tmp_path / "reference")
    out = tmp_path / "out"
    rng = random.Random(0)
    kills, progress = 0, []
    for _attempt in range(12):
        before = len(done_shards(out))
        # a random moment: once 0-2 more shards are done (0: during start-up or the first shard), then a
        # random fraction of a shard's time, so kills land mid-shard, between shards and before the first
        target = before + rng.randint(0, 2)
        child = context.Process(target=_child, args=(model, tmp_path / "imgs", out))
        child.start()
        while len(done_shards(out)) < target and child.is_alive():
            time.sleep(0.002)
        time.sleep(rng.uniform(0, shard_seconds))
        if child.is_alive():
            os.kill(child.pid, signal.SIGKILL)
            kills += 1
        child.join()
        progress.append((before, len(done_shards(out))))
        if kills == 5 or progress[-1][1] == shards:
            break
    assert kills >= 3, f"too few kills landed mid-job: {progress}"
    assert any(0 < after < shards for _, after in progress), progress  # some kills landed mid-job
    finish = context.Process(target=_child, args=(model, tmp_path / "imgs", out))
    finish.start()
    finish.join()
    assert finish.exitcode == 0
    assert_same_output(out, tmp_path / "reference")


@pytest.mark.slow
def test_cli_kill_9_at_random_moments_over_3000_images(tmp_path):
    write_tile_folder(tmp_path / "imgs", 3000)
    model_dir = tmp_path / "model"
    tiny_encoder().save_pretrained(model_dir)
    args = ["embed", tmp_path / "imgs", "--model", model_dir, "--shard-size", 100, "--no-progress"]
    start = time.perf_counter()
    reference = cli(*args, "-o", tmp_path / "reference")
    assert reference.wait() == 0, reference.stderr.read().decode()[-2000:]
    full = time.perf_counter() - start
    rng = random.Random(1)
    kills, lost = 0, []
    while kills < 6:
        before = len(done_shards(tmp_path / "out"))
        # a random moment: once a random number of further shards is done (0: during start-up), plus a
        # random fraction of a shard's time, so kills land mid-shard, between shards and before the first
        target = min(before + rng.randint(0, 6), 29)
        process = cli(*args, "-o", tmp_path / "out")
        deadline = time.perf_counter() + full
        while len(done_shards(tmp_path / "out")) < target and process.poll() is None:
            if time.perf_counter() > deadline:
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 1.5 * full / 30))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.wait()
        lost.append((before, len(done_shards(tmp_path / "out"))))
    final = cli(*args, "-o", tmp_path / "out")
    out, err = final.communicate()
    assert final.returncode == 0, err.decode()[-2000:]
    assert "embedded" in out.decode() and "complete" in out.decode()
    assert any(0 < after < 30 for _, after in lost), lost  # some kills landed mid-job
    assert_same_output(tmp_path / "out", tmp_path / "reference")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _accelerate(args):
    # `accelerate launch --cpu --num_processes 2` starts one process in accelerate 1.x; the torchrun-based
    # launcher with ACCELERATE_USE_CPU gives two real processes (as tests/training does)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(_free_port()), "-m", "visreg_hub.cli"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([*launcher, *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip


@pytest.mark.slow
def test_two_ranks_under_accelerate_launch_killed_and_resumed(tmp_path):
    write_tile_folder(tmp_path / "imgs", 1200)
    model_dir = tmp_path / "model"
    tiny_encoder().save_pretrained(model_dir)
    run_embedding(tmp_path / "imgs", tmp_path / "reference", model=str(model_dir), shard_size=50)
    args = ["embed", tmp_path / "imgs", "-o", tmp_path / "out", "--model", model_dir, "--shard-size", 50,
            "--no-progress"]  # fmt: skip
    rng = random.Random(2)
    kills = 0
    for _ in range(6):  # why not a fixed sleep: on a quiet machine the whole job ends within it
        done_before = len(done_shards(tmp_path / "out"))
        target = min(done_before + rng.randint(2, 6), 23)  # 24 shards: always mid-run
        launch = _accelerate(args)
        while launch.poll() is None and len(done_shards(tmp_path / "out")) < target:
            time.sleep(0.05)
        if launch.poll() is None:
            os.killpg(launch.pid, signal.SIGKILL)  # the launcher and both ranks
            kills += 1
        launch.wait()
        if kills == 2:
            break
    assert kills == 2, "the job finished before it could be killed twice"
    launch = _accelerate(args)
    out, err = launch.communicate()
    assert launch.returncode == 0, err.decode()[-3000:]
    text = out.decode()
    assert text.count("embedded") == 2  # one summary line per rank
    assert_same_output(tmp_path / "out", tmp_path / "reference")


@pytest.mark.parametrize("change", ["vanishes", "appears"])
def test_a_file_that_changes_mid_run_never_shifts_a_written_shard(tmp_path, monkeypatch, change):
    """The listing is streamed twice (count and digest, then embedding). A file that vanished (or appeared)
    in between shifted every later shard's items by one, and those shards were kept: a rerun then had one
    input missing and another twice. Each shard is now checked against its first-pass digest."""
    from visreg_hub.bulk import runner

    model = tiny_encoder(seed=1)
    paths = write_tile_folder(tmp_path / "in", 23, nested=False)  # listing order: t00000 ... t00022
    moved = tmp_path / "aside.png"
    real_summarize = runner.summarize

    def summarize_then_change(sources, shard_size=None):
        summary = real_summarize(sources, shard_size)
        if change == "vanishes":
            paths[12].rename(moved)  # in shard 2 of 5-item shards
        else:
            paths[12].with_name("t00012b.png").write_bytes(paths[12].read_bytes())
        return summary

    monkeypatch.setattr(runner, "summarize", summarize_then_change)
    changed = "changed while they were being embedded: the listing differs from shard 2 on from the 23 items"
    with pytest.raises(runner.output.OutputMismatchError, match=changed):
        run_embedding(tmp_path / "in", tmp_path / "out", model=model, shard_size=5, show_progress_bar=False)
    rows, _, _ = read_output(tmp_path / "out")
    assert [path for path, _ in rows] == [str(p) for p in paths[:10]]  # shards 0 and 1 only, unshifted
    monkeypatch.setattr(runner, "summarize", real_summarize)
    if change == "vanishes":  # back as it was listed: the rerun finishes the same job
        moved.rename(paths[12])
    else:
        paths[12].with_name("t00012b.png").unlink()
    summary = run_embedding(tmp_path / "in", tmp_path / "out", model=model, shard_size=5,
                            show_progress_bar=False)  # fmt: skip
    rows, vectors, _ = read_output(tmp_path / "out")
    assert summary.complete and [path for path, _ in rows] == [str(p) for p in paths]  # each exactly once
    np.testing.assert_allclose(vectors, model.encode(paths, convert_to_numpy=True), atol=1e-5)


def test_a_damaged_shard_is_embedded_again_not_counted_done(tmp_path, caplog):
    """A truncated, an emptied, another job's and a wrong-length part file under valid names: resuming
    embeds those four shards again (and only those) and the folder equals an uninterrupted run."""
    import shutil

    import pyarrow.parquet as pq

    write_tile_folder(tmp_path / "imgs", 100)
    (tmp_path / "imgs" / "bad.png").write_bytes(b"not an image")
    model = tiny_encoder()
    run_embedding(tmp_path / "imgs", tmp_path / "reference", model=model, shard_size=10, batch_size=16)
    other = tmp_path / "other-imgs"
    write_tile_folder(other, 100, nested=False)
    run_embedding(other, tmp_path / "other", model=model, shard_size=10, batch_size=16)
    out = tmp_path / "out"
    shutil.copytree(tmp_path / "reference", out)
    part = out / "part-00002.parquet"
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])  # truncated copy
    (out / "part-00004.parquet").write_bytes(b"")  # emptied
    shutil.copy(tmp_path / "other" / "part-00006.parquet", out / "part-00006.parquet")  # another job's
    table = pq.read_table(out / "part-00008.parquet")  # a row lost, job metadata kept
    shortened = table.slice(0, 9).replace_schema_metadata(table.schema.metadata)
    pq.write_table(shortened, out / "part-00008.parquet")
    with caplog.at_level("WARNING", logger="visreg_hub.bulk.output"):
        summary = run_embedding(tmp_path / "imgs", out, model=model, shard_size=10, batch_size=16)
    assert summary.shards_written == 4 and summary.complete, summary
    messages = [record.getMessage() for record in caplog.records]
    warned = sorted(int(message.split()[1]) for message in messages if "embedded again" in message)
    assert warned == [2, 4, 6, 8], caplog.text
    assert_same_output(out, tmp_path / "reference")


def test_a_damaged_shard_of_another_rank_keeps_the_job_incomplete(tmp_path):
    """Rank 0 finishing last must not declare the job complete over rank 1's damaged shard; once rank 1
    has embedded it again the job is complete and equals an uninterrupted run."""
    write_tile_folder(tmp_path / "imgs", 40)
    model = tiny_encoder()
    run_embedding(tmp_path / "imgs", tmp_path / "reference", model=model, shard_size=10, batch_size=16)
    out = tmp_path / "out"
    for rank in (0, 1):
        run_embedding(tmp_path / "imgs", out, model=model, shard_size=10, rank=rank, world_size=2)
    part = out / "part-00003.parquet"  # rank 1's
    part.write_bytes(part.read_bytes()[:100])
    again = run_embedding(tmp_path / "imgs", out, model=model, shard_size=10, rank=0, world_size=2)
    manifest = json.loads((out / "manifest.json").read_text())
    assert not again.complete and not manifest["complete"] and 3 not in manifest["shards_done"]
    fixed = run_embedding(tmp_path / "imgs", out, model=model, shard_size=10, rank=1, world_size=2)
    assert fixed.complete and fixed.shards_written == 1
    assert_same_output(out, tmp_path / "reference")


def test_a_failures_link_planted_in_the_output_folder_is_refused(tmp_path):
    """Probe 15: a resumed job wrote its failure records (and removed '.*.tmp-*' files) through a
    `.failures` symlink, into the folder it pointed to."""
    from visreg_hub.bulk.output import OutputMismatchError

    write_tile_folder(tmp_path / "imgs", 8, nested=False)
    (tmp_path / "imgs" / "bad.png").write_bytes(b"not an image")
    model = tiny_encoder()
    out = tmp_path / "out"
    run_embedding(tmp_path / "imgs", out, model=model, shard_size=4, rank=0, world_size=2)  # half the job
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / ".keep.tmp-1").write_text("someone's file")
    for entry in (out / ".failures").iterdir():
        entry.unlink()
    (out / ".failures").rmdir()
    (out / ".failures").symlink_to(elsewhere)
    with pytest.raises(OutputMismatchError, match=r"\.failures is a link or a file"):
        run_embedding(tmp_path / "imgs", out, model=model, shard_size=4)
    assert sorted(p.name for p in elsewhere.iterdir()) == [".keep.tmp-1"]


def test_a_failure_record_linked_outside_the_output_folder_is_not_copied_into_it(tmp_path):
    """Probe 20: a resumed job copied the file a planted `.failures/part-NNNNN.jsonl` link pointed to (an
    API key file) into failures.jsonl."""
    from visreg_hub.retrieval.sources import EmbeddingSourceError

    write_tile_folder(tmp_path / "imgs", 8, nested=False)
    model = tiny_encoder()
    out = tmp_path / "out"
    run_embedding(tmp_path / "imgs", out, model=model, shard_size=4, rank=0, world_size=2)  # half the job
    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET-API-KEY\n")
    (out / ".failures").mkdir(exist_ok=True)
    (out / ".failures" / "part-00000.jsonl").symlink_to(secret)
    with pytest.raises(EmbeddingSourceError, match=r"part-00000.jsonl is a symlink to a file outside"):
        run_embedding(tmp_path / "imgs", out, model=model, shard_size=4)
    assert not (out / "failures.jsonl").exists()


def test_ranks_finalize_one_at_a_time_and_read_the_shards_under_the_lock(tmp_path):
    """Probe 19: a rank that listed the done shards just before another rank's last one landed wrote its
    stale ``complete: false`` over that rank's ``complete: true``: every shard was on disk, yet `index
    build` refused the folder. finalize now takes a lock in the folder and lists the shards under it: one
    that waited while the last shard landed declares the job complete."""
    import threading

    from visreg_hub.bulk import output
    from visreg_hub.durable import exclusive_lock

    write_tile_folder(tmp_path / "imgs", 20)
    model = tiny_encoder()
    for folder, ranks in ((tmp_path / "ref", (0, 1)), (tmp_path / "out", (0,))):
        for rank in ranks:
            run_embedding(tmp_path / "imgs", folder, model=model, shard_size=10, rank=rank, world_size=2)
    out = tmp_path / "out"
    stale = json.loads((out / "manifest.json").read_text())
    assert stale["shards_done"] == [0] and not stale["complete"]
    results = []
    with exclusive_lock(out / output.FINALIZE_LOCK):  # another rank is finalizing
        waiting = threading.Thread(target=lambda: results.append(output.finalize(out, stale, 2)))
        waiting.start()
        waiting.join(timeout=1.0)
        assert waiting.is_alive() and not results  # it waits for the lock before listing anything
        for name in ("part-00001.parquet", ".failures"):  # rank 1's last shard lands meanwhile
            source = tmp_path / "ref" / name
            if source.is_file():
                (out / name).write_bytes(source.read_bytes())
    waiting.join(timeout=60)
    manifest = json.loads((out / "manifest.json").read_text())
    assert results == [True] and manifest["complete"] and manifest["shards_done"] == [0, 1]
    assert_same_output(out, tmp_path / "ref")


_HOLD = """
import sys
from pathlib import Path
from visreg_hub.bulk.output import run_lock
with run_lock(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes the pipe
"""


def _holding(folder, rank: int, world_size: int) -> subprocess.Popen:
    """Another process that holds ``folder`` as (rank, world_size) until its stdin closes."""
    held = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(folder), str(rank), str(world_size)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert held.stdout.readline().strip() == "held"
    return held


def test_a_second_run_on_a_busy_folder_is_refused_and_ranks_of_one_job_are_not(tmp_path):
    """Probe: two `embed` runs on one folder both embedded every shard, and a one-rank run removes the
    temporary files of "killed" runs, i.e. the other run's half-written shard. A second run is refused now
    (another process holds the folder), the ranks of one job still run side by side, and the folder is
    free again once the holder ends."""
    from visreg_hub.bulk.output import FolderBusyError

    model = tiny_encoder()
    write_tile_folder(tmp_path / "in", 12)
    out = tmp_path / "out"
    kwargs = {"model": model, "shard_size": 4}
    run_embedding(tmp_path / "in", out, rank=1, world_size=3, **kwargs)  # the job's folder and manifest
    one_rank = _holding(out, 0, 1)
    try:
        with pytest.raises(
            FolderBusyError, match=r"another run of this job is embedding into .*: wait for it"
        ):
            run_embedding(tmp_path / "in", out, **kwargs)
        with pytest.raises(FolderBusyError, match="a one-rank run of this job is embedding"):
            run_embedding(tmp_path / "in", out, rank=2, world_size=3, **kwargs)
    finally:
        one_rank.communicate("")
    rank0 = _holding(out, 0, 3)
    try:
        with pytest.raises(FolderBusyError, match=r"another run of rank 0 is embedding"):
            run_embedding(tmp_path / "in", out, rank=0, world_size=3, **kwargs)
        with pytest.raises(FolderBusyError, match=r"another run of this job is embedding"):
            run_embedding(tmp_path / "in", out, **kwargs)  # one rank for all: not beside the job's ranks
        assert not run_embedding(tmp_path / "in", out, rank=2, world_size=3, **kwargs).complete  # beside it
    finally:
        rank0.communicate("")
    summary = run_embedding(tmp_path / "in", out, **kwargs)  # free again: finishes the job
    assert summary.complete and summary.shards_written == 1 and summary.shards_skipped == 2
