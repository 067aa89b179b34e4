"""Resuming is exact, and a crash while writing a checkpoint never breaks the previous one.

Exactness: an uninterrupted 9-step run and a run stopped after 4 steps (``train.stop_after``) then resumed
with ``--resume auto`` end with bit-identical parameters, optimiser moments, schedule and slice step
(``torch.equal`` on every tensor). The run crosses an epoch boundary (6 steps per epoch), resumes
mid-epoch, accumulates gradients over 2 micro-batches and uses stochastic depth, so the data position,
the per-batch crop seeds, the accumulation and the restored RNG streams all have to be right.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from tests.training.helpers import REPO, single_thread, tiny_config, train, trained_tensors  # noqa: F401
from training import checkpoint as ckpt

EXACT = [
    "train.max_steps=9",
    "train.per_device_batch_size=32",  # 2 micro-batches of 32 per global batch of 64
    "train.checkpoint_every=0",
    "model.drop_path_rate=0.1",  # consumes the global RNG: its state must be restored too
    "eval.knn_every=0",
]


def _metrics(path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def test_interrupted_and_resumed_run_equals_the_uninterrupted_run(tmp_path):
    reference = train(tiny_config(tmp_path / "straight", *EXACT))
    assert reference.state.global_step == 9 and reference.state.epoch == 1

    stopped = train(tiny_config(tmp_path / "stopped", *EXACT, "train.stop_after=4"))
    assert stopped.summary["stopped_early"] and stopped.state.global_step == 4
    root = tmp_path / "stopped" / "checkpoints"
    assert ckpt.read_pointer(root, "latest").name == "step-00000004"
    assert not (tmp_path / "stopped" / "final").exists()

    with open(tmp_path / "stopped" / "metrics.jsonl", "a") as handle:  # a line from a lost future, torn
        handle.write('{"step": 6, "loss/total": 1}\n{"ste')
    resumed = train(tiny_config(tmp_path / "stopped", *EXACT), resume="auto")
    assert resumed.start_step == 4 and resumed.state.global_step == 9  # trained 5 steps, not 9 afresh
    # the log reads like the uninterrupted run's: training lines at the same steps, nothing twice or out
    # of order, no torn line left (the stopped run also evaluated when it stopped, at step 4)
    logs = {name: _metrics(tmp_path / name / "metrics.jsonl") for name in ("straight", "stopped")}
    assert [r["step"] for r in logs["stopped"] if "loss/total" in r] == [
        r["step"] for r in logs["straight"] if "loss/total" in r
    ]
    steps = [r["step"] for r in logs["stopped"]]
    assert steps == sorted(steps) and len({(r["step"], *sorted(r)) for r in logs["stopped"]}) == len(steps)
    expected, got = trained_tensors(reference), trained_tensors(resumed)
    assert expected.keys() == got.keys()
    different = [name for name in expected if not torch.equal(expected[name], got[name])]
    assert different == []
    # Sanity: the comparison is sensitive (the state at step 4 differs from the state at step 9).
    assert not torch.equal(
        expected["model.encoder.backbone.cls_token"],
        trained_tensors(stopped)["model.encoder.backbone.cls_token"],
    )
    # resuming the finished run again changes nothing: no step, no checkpoint, no metrics line twice
    before = (tmp_path / "stopped" / "metrics.jsonl").read_text()
    again = train(tiny_config(tmp_path / "stopped", *EXACT), resume="auto")
    assert again.state.global_step == 9 and (tmp_path / "stopped" / "metrics.jsonl").read_text() == before
    assert again.summary["checkpoint"].endswith("step-00000009")


def _run_until_inside_the_step_4_checkpoint_write(tmp_path) -> tuple[Path, subprocess.Popen]:
    """A 6-step fixture run in a subprocess, returned while it sleeps inside writing checkpoint 4
    (step 2 is complete; step 4's files exist, not yet renamed)."""
    output = tmp_path / "run"
    config_args = [
        "--config", str(REPO / "training" / "configs" / "fmnist-fixture-cpu.yaml"),
        f"data.path={REPO / 'tests' / 'fixtures' / 'fmnist_train_500.npz'}",
        f"train.output_dir={output}", "train.max_steps=6", "train.checkpoint_every=2",
        "train.progress_bar=false", "train.log_with=none", "train.per_device_batch_size=32",
        "train.global_batch_size=32",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", ckpt.SLEEP_HOOK_ENV: "4:120"}
    command = [sys.executable, str(REPO / "training" / "pretrain.py"), *config_args]
    process = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    marker = output / "checkpoints" / ".tmp-step-00000004" / "HOOK_SLEEPING"
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "the checkpoint writer never reached the hook"
        time.sleep(0.2)
    return output, process


def test_sigterm_ends_a_run_like_ctrl_c_with_a_message_and_a_loadable_checkpoint(tmp_path):
    """A scheduler's preemption (SIGTERM), here inside a checkpoint write: exit 143 with one line naming
    --resume auto, and the previous checkpoint is still the latest."""
    output, process = _run_until_inside_the_step_4_checkpoint_write(tmp_path)
    os.kill(process.pid, signal.SIGTERM)
    assert process.wait(timeout=60) == 143
    err = process.stderr.read().decode()
    process.stderr.close()
    said = r"terminated \(SIGTERM\); stopped at step \d+; continue from its last checkpoint, step-00000002, "
    assert re.search(said + r"with --resume auto", err), err
    assert "Traceback" not in err
    latest = ckpt.read_pointer(output / "checkpoints", "latest")
    assert latest is not None and ckpt.read_state(latest)["global_step"] == 2


def test_kill_during_checkpoint_write_leaves_the_previous_checkpoint_loadable(tmp_path):
    output, process = _run_until_inside_the_step_4_checkpoint_write(tmp_path)
    os.kill(process.pid, signal.SIGKILL)  # inside the write: files of step 4 exist, not yet renamed
    process.wait(timeout=30)
    process.stderr.close()
    root = output / "checkpoints"
    assert (root / ".tmp-step-00000004" / "model.safetensors").is_file()  # killed mid-write indeed
    latest = ckpt.read_pointer(root, "latest")
    assert latest is not None and latest.name == "step-00000002"
    assert ckpt.read_state(latest)["global_step"] == 2

    batch = ["train.per_device_batch_size=32", "train.global_batch_size=32"]
    config = tiny_config(output, "train.max_steps=6", "train.checkpoint_every=2", *batch)
    from training.engine import Trainer

    resumed = Trainer(config, resume="auto")
    assert resumed.start_step == 2 and resumed.resumed_from.name == "step-00000002"
    assert not (root / ".tmp-step-00000004").exists()  # the half-written one was cleaned up


def _write_shards(folder, images, labels, per_shard: int) -> None:
    import io
    import tarfile

    from PIL import Image

    folder.mkdir(parents=True)
    for shard, start in enumerate(range(0, len(images), per_shard)):
        with tarfile.open(folder / f"train-{shard:04d}.tar", "w") as tar:
            for i in range(start, min(start + per_shard, len(images))):
                buffer = io.BytesIO()
                Image.fromarray(images[i]).save(buffer, format="PNG")
                for suffix, payload in (("png", buffer.getvalue()), ("cls", str(labels[i]).encode())):
                    info = tarfile.TarInfo(f"{i:06d}.{suffix}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))


def test_webdataset_run_resumes_mid_epoch_exactly_with_workers(tmp_path, fmnist_train):
    """Tar shards read by 2 DataLoader workers: stop at step 9 of a 14-step epoch, resume, cross into
    the next epoch; the result equals the uninterrupted run bit for bit."""
    _write_shards(tmp_path / "shards", *fmnist_train, per_shard=125)
    shards = [
        "data.source=webdataset", f"data.path={tmp_path / 'shards'}", "data.val_size=0", "data.num_workers=2",
        "data.shuffle_buffer=50", "data.val_source=npz",
        f"data.val_path={REPO / 'tests/fixtures/fmnist_test_200.npz'}",
        "train.per_device_batch_size=32", "train.global_batch_size=32", "train.max_steps=16",
        "train.checkpoint_every=0", "eval.knn_every=0",
    ]  # fmt: skip
    reference = train(tiny_config(tmp_path / "straight", *shards))
    assert reference.plan.steps_by_epoch[0] == 14 and reference.state.epoch == 1
    train(tiny_config(tmp_path / "stopped", *shards, "train.stop_after=9"))
    resumed = train(tiny_config(tmp_path / "stopped", *shards), resume="auto")
    assert resumed.start_step == 9
    expected, got = trained_tensors(reference), trained_tensors(resumed)
    assert [name for name in expected if not torch.equal(expected[name], got[name])] == []
    assert (
        resumed.summary["knn_accuracy"] is not None
    )  # kNN from the labelled validation split (bank + queries)


def test_an_interrupt_before_the_first_checkpoint_says_there_is_nothing_to_resume(tmp_path):
    """Probe 10: Ctrl-C at step 24 of a run checkpointing every 25 said "continue from the last checkpoint
    with --resume auto", and that then silently started from step 0."""
    from tests.training.helpers import tiny_config
    from training.pretrain import _after_interrupt

    config = tiny_config(tmp_path / "run", "train.checkpoint_every=25")
    said = _after_interrupt(config, None)
    assert "before its first checkpoint (train.checkpoint_every=25): nothing to resume" in said
    assert "--resume" not in said
