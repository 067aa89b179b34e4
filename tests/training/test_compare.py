"""Method-comparison runner and summary: a real tiny grid resumes and skips; the tables match numpy.

The runner test trains real tiny ViTs (the fixture preset, 2 steps) on the committed Fashion-MNIST fixture,
in-process. The summary test writes eval.json files with known numbers, so every mean, std, paired
difference and verdict can be recomputed independently.
"""

from __future__ import annotations

import json
import logging

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


def tiny_args(out, *extra):
    return compare.parse_args([
        "--out", str(out), "--config", str(FIXTURE_CONFIG),
        "--set", f"data.path={TRAIN}", "data.val_size=0", "train.checkpoint_every=1", "train.log_with=none",
        "train.progress_bar=false", "--steps", "2", "--test-split", str(TEST), "--lt-max", "40",
        "--lt-ratio", "8", "--methods", "visreg", "--seeds", "0", *extra,
    ])  # fmt: skip


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
