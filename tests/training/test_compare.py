"""Method-comparison runner and summary: a real tiny grid resumes and skips; the tables match numpy.

The runner test trains real tiny ViTs (the fixture preset, 2 steps) on the committed Fashion-MNIST fixture,
in-process. The summary test writes eval.json files with known numbers, so every mean, std, paired
difference and verdict can be recomputed independently.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.training.helpers import FIXTURE_CONFIG, REPO, single_thread  # noqa: F401
from training.experiments import compare, summarize

TRAIN = REPO / "tests" / "fixtures" / "fmnist_train_500.npz"
TEST = REPO / "tests" / "fixtures" / "fmnist_test_200.npz"


@pytest.fixture(autouse=True)
def single_blas_thread():
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        yield


def tiny_argv(out, *extra):
    return [
        "--out", str(out), "--config", str(FIXTURE_CONFIG),
        "--set", f"data.path={TRAIN}", "data.val_size=0", "train.checkpoint_every=1", "train.log_with=none",
        "train.progress_bar=false", "--steps", "2", "--test-split", str(TEST), "--lt-max", "40",
        "--lt-ratio", "8", "--methods", "visreg", "--seeds", "0", *extra,
    ]  # fmt: skip


def tiny_args(out, *extra):
    return compare.parse_args(tiny_argv(out, *extra))


class InterruptingRunner(compare.InProcessRunner):
    """The first training stops after one step (with its checkpoint), then the 'process' dies."""

    def __call__(self, script, argv, log):
        if script == "training/pretrain.py" and not self.calls:
            assert argv[-2:] == ["--resume", "auto"]  # overrides go before the options
            super().__call__(script, [*argv[:-2], "train.stop_after=1", *argv[-2:]], log)
            raise KeyboardInterrupt
        return super().__call__(script, argv, log)


def test_tiny_grid_resumes_skips_and_refuses_a_changed_budget(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="training.engine")
    out = tmp_path / "grid"
    args = tiny_args(out, "--settings", "balanced", "lt")
    with pytest.raises(KeyboardInterrupt):
        compare.run_grid(args, InterruptingRunner())
    first = out / "balanced" / "visreg" / "seed-0"
    assert not (first / "cell.json").exists() and (first / "checkpoints").is_dir()

    caplog.clear()
    outcomes = compare.run_grid(args, compare.InProcessRunner())
    assert outcomes == {"balanced/visreg/seed-0": "done", "lt/visreg/seed-0": "done"}
    resumed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resumed from")]
    assert len(resumed) == 1 and "at step 1" in resumed[0]  # only the interrupted cell, from its checkpoint
    assert json.loads((first / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2
    lt = json.loads((out / "lt" / "visreg" / "seed-0" / "eval.json").read_text())
    assert lt["num_train"] == sum(lt["train_class_counts"].values()) < 500  # the probe saw the long tail
    assert set(lt["groups"]["linear probe"]) == {"many", "medium", "few"}

    # everything done: a rerun trains and evaluates nothing
    again = compare.InProcessRunner()
    assert set(compare.run_grid(args, again).values()) == {"skipped"} and again.calls == []

    # an evaluation lost after training: only the evaluation runs again
    (first / "cell.json").unlink()
    (first / "eval.json").unlink()
    again = compare.InProcessRunner()
    compare.run_grid(args, again)
    assert [script for script, _ in again.calls] == ["training/evaluate.py"]
    assert (first / "cell.json").is_file()

    # a different budget never mixes into the same folder
    changed = tiny_args(out)
    changed.steps = 3
    with pytest.raises(compare.ConfigError, match="different"):
        compare.run_grid(changed, compare.InProcessRunner())

    table = summarize.render(out)
    rows = [line for line in table.splitlines() if line.startswith("| VISReg |")]
    for setting, row in zip(("balanced", "lt"), rows):
        result = json.loads((out / setting / "visreg" / "seed-0" / "eval.json").read_text())
        cells = row.strip("| ").split(" | ")
        knn_column = 4 if setting == "balanced" else 7  # after LP all, many, medium, few
        assert cells[2:4] == ["1/1", f"{result['linear']['accuracy']:.2f}"]
        assert cells[knn_column] == f"{result['knn']['20']:.2f}"
    assert "2 of 2 cells done" in table


def write_cell(root, setting, method, seed, lp, knn, groups=None):
    folder = root / setting / method / f"seed-{seed}"
    folder.mkdir(parents=True)
    result = {"linear": {"accuracy": lp}, "knn": {"20": knn, "200": knn - 1}}
    if groups:
        result["groups"] = {"linear probe": groups, "kNN k=20": groups}
    (folder / "eval.json").write_text(json.dumps(result))
    (folder / "cell.json").write_text("{}")


def synthetic_grid(root):
    methods = {
        "visreg": {
            "label": "VISReg",
            "loss_kwargs": {"reg_weight": 0.6, "shape_weight": 1.0, "num_slices": 512},
        },
        "swd": {"label": "SWD", "loss_kwargs": {"reg_weight": 0.6, "num_slices": 512}},
        "vicreg": {"label": "VICReg", "loss_kwargs": {"invariance_weight": 25.0}},
        "barlow": {"label": "Barlow Twins", "loss_kwargs": {"off_diagonal_weight": 0.0051}},
    }
    grid = {
        "steps": 469, "global_batch_size": 256, "epochs_of_balanced_set": 2.001, "train_images": 60000,
        "settings": {"balanced": {"label": "balanced"}, "lt": {"label": "long-tailed"}},
        "methods": methods,
        "planned": {"settings": ["balanced", "lt"], "methods": list(methods), "seeds": [0, 1, 2]},
    }  # fmt: skip
    root.mkdir()
    (root / "grid.json").write_text(json.dumps(grid))
    visreg = {0: 80.0, 1: 81.0, 2: 80.5}
    for seed, lp in visreg.items():
        write_cell(root, "balanced", "visreg", seed, lp, lp - 3)
        write_cell(root, "balanced", "swd", seed, lp - 2.0 + 0.1 * seed, lp - 5)  # always ~2 behind
        write_cell(root, "balanced", "vicreg", seed, lp + (0.4 if seed % 2 else -0.4), lp - 3)  # sign flips
    write_cell(root, "balanced", "barlow", 1, 70.0, 60.0)  # one seed of three
    (root / "balanced" / "barlow" / "seed-0").mkdir(parents=True)  # started, never finished
    failed = root / "balanced" / "barlow" / "seed-2"
    failed.mkdir(parents=True)
    (failed / "failed.json").write_text(json.dumps({"stage": "train"}))
    (failed / "eval.json").write_text(json.dumps({"linear": {"accuracy": 99.0}, "knn": {"20": 99.0}}))
    write_cell(root, "lt", "visreg", 0, 50.0, 45.0, {"many": 60.0, "medium": 40.0, "few": 20.0})
    return visreg


def test_summary_numbers_verdicts_and_cell_status(tmp_path):
    root = tmp_path / "grid"
    visreg = synthetic_grid(root)
    table = summarize.render(root)
    rows = {}
    for line in table.splitlines():  # the first row of each method: the balanced table
        rows.setdefault(line.split(" | ")[0].strip("| "), line)

    lp = np.array(list(visreg.values()))
    assert f"{lp.mean():.2f} ± {lp.std(ddof=1):.2f}" in rows["VISReg"]  # sample std over 3 seeds
    assert "3/3 |" in rows["VISReg"] and "λ 0.6, shape 1, K 512" in rows["VISReg"]
    # the barlow row has one finished seed out of three: marked incomplete, the failed cell's 99 ignored
    barlow = next(line for line in table.splitlines() if line.startswith("| Barlow Twins | off_diagonal"))
    assert "1/3 (incomplete)" in barlow and "70.00" in barlow and "99" not in barlow

    paired = [line for line in table.splitlines() if line.startswith("| SWD | linear probe | 0, 1, 2")]
    diffs = [2.0 - 0.1 * s for s in range(3)]
    assert paired and ", ".join(f"{d:+.2f}" for d in diffs) in paired[0]
    assert f"{np.mean(diffs):+.2f}" in paired[0] and "ahead of SWD by more than the seed spread" in paired[0]
    vicreg = next(line for line in table.splitlines() if line.startswith("| VICReg | linear probe | 0, 1, 2"))
    vicreg_lp = [lp + (0.4 if seed % 2 else -0.4) for seed, lp in visreg.items()]
    spread = max(np.std(list(visreg.values()), ddof=1), np.std(vicreg_lp, ddof=1))
    assert f"within the seed spread (|+0.13| <= {spread:.2f})" in vicreg
    barlow_pair = next(
        line for line in table.splitlines() if line.startswith("| Barlow Twins | linear probe")
    )
    assert "| 1 |" in barlow_pair and "one shared seed" in barlow_pair

    status = next(line for line in table.splitlines() if line.startswith("| balanced | Barlow Twins |"))
    assert status.split(" | ")[2:] == ["started", "done", "failed (train) |"]
    assert "| lt | VISReg | done | not started | not started |" in table
    assert "11 of 24 cells done" in table
    assert "| VISReg | λ 0.6, shape 1, K 512 | 1/3 (incomplete) | 50.00 | 60.00 | 40.00 | 20.00 |" in table

    doc = tmp_path / "results.md"
    doc.write_text(f"# Results\nkeep me\n{summarize.BEGIN}\nold\n{summarize.END}\ntail stays\n")
    summarize.update_file(doc, table)
    text = doc.read_text()
    assert text.startswith("# Results\nkeep me\n") and text.endswith(f"{summarize.END}\ntail stays\n")
    assert "old" not in text and table in text


# ------------------------------------------------------------------------------------------ interruptions
def bare_grid() -> dict:
    """The parts of grid.json that run_cell reads (no training happens with the fake runners below)."""
    return {
        "config": str(FIXTURE_CONFIG), "extra_overrides": [], "steps": 2, "eval_data": [],
        "methods": {"visreg": {"overrides": []}}, "settings": {"balanced": {"train": [], "eval_args": []}},
    }  # fmt: skip


@pytest.mark.parametrize("code", [130, -2, 143, -15])
def test_a_trainer_stopped_by_a_signal_leaves_its_cell_resumable_not_failed(tmp_path, code):
    cell = compare.Cell("balanced", "visreg", 0)
    assert compare.run_cell(tmp_path, bare_grid(), cell, lambda script, argv, log: code) == "interrupted"
    folder = compare.cell_dir(tmp_path, cell)
    assert not (folder / "failed.json").exists() and not (folder / "train.done").exists()
    # a real error still marks the cell failed
    assert compare.run_cell(tmp_path, bare_grid(), cell, lambda script, argv, log: 1) == "failed"
    assert json.loads((folder / "failed.json").read_text())["exit_code"] == 1


class FailingRunner(compare.InProcessRunner):
    """Every training exits 1 (a divergence) without training anything."""

    def __call__(self, script, argv, log):
        self.calls.append((script, argv))
        return 1


def test_main_exits_nonzero_while_cells_stay_failed_and_names_retry_failed(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(compare, "InProcessRunner", FailingRunner)
    argv = [*tiny_argv(tmp_path / "grid"), "--settings", "balanced", "--in-process"]
    assert compare.main(argv) == 1
    capsys.readouterr()
    assert compare.main(argv) == 1  # the restart skips the failed cell: still not a success
    out, err = capsys.readouterr()
    assert json.loads(out) == {"cells": 1, "skipped-failed": 1}
    assert "1 cell(s) failed" in err and "--retry-failed" in err


DRIVER = """
import sys
from training.experiments import compare

class SleepingRunner(compare.SubprocessRunner):  # every 'training' is a sleeper that reports its pid
    def __call__(self, script, argv, log):
        return super().__call__(sys.argv[1], [str(log.parent / "child.pid")], log)

compare.SubprocessRunner = SleepingRunner
sys.exit(compare.main(sys.argv[2:]))
"""
SLEEPER = """
import os, sys, time
from pathlib import Path
try:
    Path(sys.argv[1]).write_text(str(os.getpid()))
    time.sleep(120)
except KeyboardInterrupt:
    sys.exit(130)  # as pretrain.py does
"""


@pytest.mark.parametrize(("signum", "jobs"), [(signal.SIGTERM, 1), (signal.SIGINT, 2)])
def test_a_stopped_grid_stops_its_trainers_before_unlocking(tmp_path, signum, jobs):
    import fcntl

    (tmp_path / "driver.py").write_text(DRIVER)
    (tmp_path / "sleeper.py").write_text(SLEEPER)
    out = tmp_path / "grid"
    methods = ["visreg", "vicreg"][:jobs]
    argv = [*tiny_argv(out), "--settings", "balanced", "--methods", *methods, "--jobs", str(jobs)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(tmp_path / "driver.py"), str(tmp_path / "sleeper.py"), *argv]
    grid = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    pid_files = [out / "balanced" / m / "seed-0" / "child.pid" for m in methods]
    deadline = time.monotonic() + 120
    while not all(p.is_file() and p.read_text() for p in pid_files) and grid.poll() is None:
        assert time.monotonic() < deadline, "the fake trainers never started"
        time.sleep(0.1)
    grid.send_signal(signum)  # to compare.py only, as `kill PID` does (Ctrl-C's group signal is forwarded)
    _, err = grid.communicate(timeout=90)

    assert grid.returncode == 128 + signum
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(
        f"error: interrupted by {signal.Signals(signum).name}"
    )
    for pid_file in pid_files:
        with pytest.raises(ProcessLookupError):  # stopped and reaped: no orphan writes into the cell
            os.kill(int(pid_file.read_text()), 0)
        assert not (pid_file.parent / "failed.json").exists()  # the rerun resumes the cell
    with open(out / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released


# ------------------------------------------------------------------------------------------ grid.json
def test_grid_sees_an_edit_to_an_extended_parent_config(tmp_path, caplog):
    parent, child = tmp_path / "parent.yaml", tmp_path / "child.yaml"
    parent.write_text(FIXTURE_CONFIG.read_text())
    child.write_text("extends: parent.yaml\ntrain:\n  max_steps: 4\n")
    out = tmp_path / "grid"
    args = tiny_args(out)
    args.config = str(child)
    spec = compare.grid_spec(args)
    compare.open_grid(out, spec, compare.plan(args))

    parent.write_text(FIXTURE_CONFIG.read_text().replace("lr: 2.0e-3", "lr: 1.0e-3"))
    with pytest.raises(compare.ConfigError, match="different merged_config_sha256"):
        compare.open_grid(out, compare.grid_spec(args), compare.plan(args))

    # a grid.json written before the merged hash existed stays usable, and records it
    saved = json.loads((out / "grid.json").read_text())
    old = {k: v for k, v in saved.items() if k != "merged_config_sha256"}
    (out / "grid.json").write_text(json.dumps({**old, "config_sha256": "bytes of child.yaml"}))
    new_spec = compare.grid_spec(args)
    compare.open_grid(out, new_spec, compare.plan(args))
    assert "predates merged_config_sha256" in caplog.text
    saved = json.loads((out / "grid.json").read_text())
    assert saved["merged_config_sha256"] == new_spec["merged_config_sha256"]
