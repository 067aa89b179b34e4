"""training/evaluate.py on real images: numbers match independent computations, test labels never steer.

The model is a tiny random ViT saved with ``save_pretrained`` (the path every trained model takes), the
data the committed real Fashion-MNIST fixtures (500 train / 200 test images).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.fixtures_models import tiny_encoder
from tests.training.helpers import REPO, single_thread  # noqa: F401
from training import evaluate

TRAIN = str(REPO / "tests" / "fixtures" / "fmnist_train_500.npz")
TEST = str(REPO / "tests" / "fixtures" / "fmnist_test_200.npz")


@pytest.fixture(autouse=True)
def single_blas_thread():
    """scikit-learn's BLAS threads oversubscribe two shared cores as badly as torch's do."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        yield


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    tiny_encoder(seed=1, in_chans=1, mean=(0.2860,), std=(0.3530,)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def features(model_folder):
    """Independent features: the fixture images normalised by hand (28 px, crop_pct 1: no resize)."""
    model = tiny_encoder(seed=1, in_chans=1, mean=(0.2860,), std=(0.3530,))
    out = {}
    for name, path in (("train", TRAIN), ("test", TEST)):
        data = np.load(path)
        images = (torch.from_numpy(data["images"]).float().div(255).unsqueeze(1) - 0.2860) / 0.3530
        with torch.inference_mode():
            out[name] = (model(images).numpy(), data["labels"].astype(np.int64))
    return out


def knn_reference(train_x, train_y, test_x, test_y, k: int, temperature: float = 0.07) -> float:
    """DINO's weighted kNN accuracy (%) in float64, written here from the formula (not the library's):
    cosine similarities, the k largest vote exp(s / T) for their label, ties to the smallest label."""

    def unit(x):
        x = x.astype(np.float64)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    sims = unit(test_x) @ unit(train_x).T
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    classes = np.unique(train_y)
    votes = np.zeros((len(test_x), len(classes)))
    for row in range(len(test_x)):
        for j in top[row]:
            votes[row, np.searchsorted(classes, train_y[j])] += np.exp(sims[row, j] / temperature)
    return 100.0 * float(np.mean(classes[votes.argmax(axis=1)] == test_y))


def _run(model_folder, tmp_path, *extra) -> dict:
    out = tmp_path / "eval.json"
    code = evaluate.main([str(model_folder), "--data", "npz", "--train", TRAIN, "--test", TEST,
                          "--out", str(out), *extra])  # fmt: skip
    assert code == 0
    return json.loads(out.read_text())


def test_knn_and_outputs_match_an_independent_computation(model_folder, features, tmp_path):
    results = _run(model_folder, tmp_path)
    (train_x, train_y), (test_x, test_y) = features["train"], features["test"]
    for k in (10, 20, 200):
        expected = knn_reference(train_x, train_y, test_x, test_y, k)
        assert results["knn"][str(k)] == pytest.approx(expected, abs=1e-9)
    assert results["num_train"] == 500 and results["num_test"] == 200 and results["embedding_dim"] == 32
    table = (tmp_path / "eval.md").read_text()
    assert "| kNN k=20 T=0.07 |" in table and f"{results['linear']['accuracy']:.2f}" in table


def test_a_folder_with_an_undecodable_image_is_evaluated_with_on_error_skip(model_folder, tmp_path, capsys):
    """Probe 15: training skips undecodable files, evaluate.py stopped at the first one and suggested
    on_error='skip', a Python keyword it had no flag for."""
    from PIL import Image

    data = np.load(TRAIN)
    for split, rows in (("train", range(0, 200)), ("test", range(200, 300))):
        for i in rows:
            folder = tmp_path / split / f"class{data['labels'][i]}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(data["images"][i]).save(folder / f"{i:03d}.png")
    broken = tmp_path / "train" / f"class{data['labels'][0]}" / "zz-broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    argv = [str(model_folder), "--data", "folder", "--train", str(tmp_path / "train"), "--test",
            str(tmp_path / "test"), "--knn-k", "5", "--out", str(tmp_path / "r.json")]  # fmt: skip
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err
    assert "zz-broken.png" in err and "--on-error skip" in err and "on_error='skip'" not in err
    assert evaluate.main([*argv, "--on-error", "skip"]) == 0
    results = json.loads((tmp_path / "r.json").read_text())
    assert (results["num_train"], results["num_test"]) == (200, 100)  # the broken file and its label left out


def test_the_recorded_command_is_this_calls_with_no_local_paths(model_folder, tmp_path, monkeypatch):
    """Probe 13: evaluate.main(argv) from Python recorded the host process's sys.argv, and cards pushed to
    the Hub carried /home/... paths (data.path=, train.output_dir=, --config) in their command."""
    from training.publish import published_command

    monkeypatch.setattr("sys.argv", ["host.py", "--unrelated", "host", "args"])
    results = _run(model_folder, tmp_path)
    assert results["command"].startswith("training/evaluate.py ") and "host" not in results["command"]
    assert "/tmp" not in results["command"] and "<local>/" + model_folder.name in results["command"]
    monkeypatch.chdir(REPO)
    shown = published_command("training/pretrain.py", [
        "--config", "training/configs/fmnist-fixture-cpu.yaml", f"data.path={REPO}/tests/fixtures/x.npz",
        "train.output_dir=/home/alice/runs/r1", "--resume=~/runs/r0/checkpoints/step-00000004", "seed=3",
    ])  # fmt: skip
    assert shown == (
        "training/pretrain.py --config training/configs/fmnist-fixture-cpu.yaml "
        "data.path=tests/fixtures/x.npz train.output_dir=<local>/r1 --resume=<local>/step-00000004 seed=3"
    )
    # probe 14: more forms that leaked, and one that crashed the export after training
    odd = [
        "data.path=~nosuchuser/x",
        "C:\\Users\\alice\\x.npz",
        "\\\\srv\\share\\y",
        "x=../../etc/p",
        "org/repo",
    ]
    assert (
        published_command("s.py", odd)
        == "s.py data.path=<local> <local>/x.npz <local>/y x=<local>/p org/repo"
    )


def test_linear_probe_choice_never_looks_at_the_test_labels(features):
    (train_x, train_y), (test_x, test_y) = features["train"], features["test"]
    linear = evaluate.linear_probe(train_x, train_y, test_x, test_y, val_fraction=0.1, seed=0)
    scores = {float(c): acc for c, acc in linear["val_accuracies"].items()}
    assert linear["best_c"] == max(scores, key=lambda c: (scores[c], -c))
    assert linear["accuracy"] == pytest.approx(100 * (linear["predictions"] == test_y).mean())
    # Test labels scrambled: the chosen C and the validation scores cannot change, the test score does.
    scrambled = np.random.default_rng(0).permutation(test_y)
    other = evaluate.linear_probe(train_x, train_y, test_x, scrambled, val_fraction=0.1, seed=0)
    assert (other["best_c"], other["val_accuracies"]) == (linear["best_c"], linear["val_accuracies"])
    assert np.array_equal(other["predictions"], linear["predictions"])
    assert other["accuracy"] != linear["accuracy"]


def test_few_shot_uses_n_per_class_over_seeds(features):
    (train_x, train_y), (test_x, test_y) = features["train"], features["test"]
    seen = []
    original = evaluate.select_c

    def spy(x_fit, y_fit, x_val, y_val, cs=evaluate.DEFAULT_CS):
        seen.append((np.bincount(y_fit).tolist(), np.bincount(y_val).tolist()))
        return original(x_fit, y_fit, x_val, y_val, cs)

    evaluate.select_c = spy
    try:
        results = evaluate.few_shot(train_x, train_y, test_x, test_y, shots=[2], seeds=3)
    finally:
        evaluate.select_c = original
    assert seen == [([2] * 10, [5] * 10)] * 3  # 2 per class to fit, a disjoint 5 per class to choose C
    runs = results["2"]["runs"]
    assert len(runs) == 3 and len(set(runs)) > 1  # different draws
    assert results["2"]["mean"] == pytest.approx(np.mean(runs)) and results["2"]["std"] == pytest.approx(
        np.std(runs, ddof=1)  # the sample std, as docs/results.md reports spreads (was the population std)
    )
    report = {"model": "m", "knn": {}, "knn_temperature": 0.07, "linear": {"best_c": 1.0, "accuracy": 50.0},
              "few_shot": results, "data": "npz", "num_train": 1, "num_test": 1, "command": "c"}  # fmt: skip
    row = evaluate.to_markdown(report)
    assert "2-shot linear (3 seeds; C chosen on 5 more labelled images per class)" in row
    # a class with only 4 images: C is chosen on 2 of them (after 2 to fit), and the record says so
    small = np.concatenate([np.flatnonzero(train_y == c)[: 4 if c == 0 else 20] for c in np.unique(train_y)])
    few = evaluate.few_shot(train_x[small], train_y[small], test_x, test_y, shots=[2], seeds=1)
    assert few["2"]["c_chosen_on_per_class"] == 2
    report["few_shot"] = few
    assert "C chosen on 2 to 5 more labelled images per class" in evaluate.to_markdown(report)


def test_long_tail_groups_partition_the_test_accuracy(model_folder, tmp_path):
    results = _run(model_folder, tmp_path, "--long-tail-ratio", "10", "--long-tail-seed", "1")
    counts = results["train_class_counts"]
    assert (
        max(counts.values()) == 50
        and min(counts.values()) == 5
        and results["num_train"] == sum(counts.values())
    )
    groups = results["groups"]["linear probe"]
    assert set(groups) == {"many", "medium", "few"}
    # Each test class has 20 images; the group accuracies, weighted by their class counts, give the total.
    from training.data import class_groups

    per_group = class_groups({int(c): n for c, n in counts.items()}).groups
    sizes = {g: sum(1 for v in per_group.values() if v == g) for g in groups}
    total = sum(groups[g] * sizes[g] for g in groups) / sum(sizes.values())
    assert total == pytest.approx(results["linear"]["accuracy"])


def test_missing_split_is_a_clear_error(model_folder, tmp_path, capsys):
    missing = tmp_path / "missing"  # not a fixed path such as /nonexistent: a machine may have it
    code = evaluate.main([str(model_folder), "--data", "folder", "--train", str(missing), "--test", TEST])
    assert code == 2 and f"--train '{missing}' does not exist" in capsys.readouterr().err


def test_probe_pooling_chooses_the_tap_on_validation(model_folder, tmp_path):
    """``--probe-pooling``: both taps are scored on the validation split; the reported probe equals a
    plain single-tap run on the chosen tap, and kNN stays on ``--pooling``."""
    results = _run(model_folder, tmp_path, "--probe-pooling", "mean_patch", "cls")
    linear = results["linear"]
    assert set(linear["tap_val_accuracies"]) == {"mean_patch", "cls"}
    assert linear["tap"] == max(linear["tap_val_accuracies"], key=linear["tap_val_accuracies"].get)
    assert linear["val_accuracy"] == pytest.approx(linear["tap_val_accuracies"][linear["tap"]])
    alone = _run(model_folder, tmp_path / "alone", "--pooling", linear["tap"])
    assert alone["linear"]["accuracy"] == pytest.approx(linear["accuracy"])
    assert alone["linear"]["best_c"] == linear["best_c"]
    assert results["knn"] == _run(model_folder, tmp_path / "plain")["knn"]  # the default tap
    assert f"| linear probe ({linear['tap']}, C=" in (tmp_path / "eval.md").read_text()


@pytest.mark.parametrize(
    "flags",
    [
        ["--few-shot", "0"], ["--few-shot", "-3"], ["--knn-k", "0"], ["--temperature", "0"],
        ["--temperature", "nan"], ["--val-fraction", "1.5"], ["--val-fraction", "0"], ["--batch-size", "0"],
        ["--workers", "-1"], ["--pooling", "foo"], ["--probe-pooling", "cls", "foo"], ["--seeds", "0"],
        ["--long-tail-ratio", "0.5"], ["--out", "r.json", "--markdown", "r.json"],
        ["--long-tail-max", "-5"], ["--long-tail-max", "0"], ["--long-tail-seed", "-1"],
    ],
)  # fmt: skip
def test_bad_arguments_stop_before_any_feature_is_computed(flags, capsys, monkeypatch):
    """These ended in tracebacks after all features were extracted (or, for --seeds 0, in nan +- nan)."""
    import training.evaluate as evaluation

    monkeypatch.setattr(evaluation, "evaluate", lambda args: pytest.fail("evaluation started"))
    with pytest.raises(SystemExit) as info:
        evaluation.main(["some-model", "--data", "npz", *flags])
    assert info.value.code == 2 and "error:" in capsys.readouterr().err


def test_knn_results_are_labelled_with_the_k_actually_used(model_folder, features, tmp_path):
    """A k larger than the training bank is clipped: the JSON key and the table say the clipped k
    (they said "k=1000" over k=500 numbers), and the JSON keeps the requested values."""
    results = _run(model_folder, tmp_path, "--knn-k", "10", "1000", "2000")
    (train_x, train_y), (test_x, test_y) = features["train"], features["test"]
    assert set(results["knn"]) == {"10", "500"} and results["knn_k_requested"] == [10, 1000, 2000]
    expected = knn_reference(train_x, train_y, test_x, test_y, k=500)
    assert results["knn"]["500"] == pytest.approx(expected, abs=1e-9)
    table = (tmp_path / "eval.md").read_text()
    assert "| kNN k=500 T=0.07 |" in table and "k=1000" not in table.split("Command:")[0]
