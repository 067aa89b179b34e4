"""pretrain.py / evaluate.py / make_gallery stop early with one clear line instead of a late traceback."""

from __future__ import annotations

import http.server
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from training.engine import epochs_covered

REPO = Path(__file__).resolve().parents[2]
FIXTURE_ARGS = [
    "--config", str(REPO / "training" / "configs" / "fmnist-fixture-cpu.yaml"),
    f"data.path={REPO / 'tests' / 'fixtures' / 'fmnist_train_500.npz'}",
    "train.progress_bar=false", "train.log_with=none",
]  # fmt: skip


def _run(script: str, *args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=240)  # fmt: skip


def test_rerun_into_an_existing_output_dir_is_refused(tmp_path, capsys):
    from training import pretrain

    output = tmp_path / "run"
    (output / "checkpoints" / "step-00000006").mkdir(parents=True)
    marker = output / "checkpoints" / "step-00000006" / "weights"
    marker.write_text("previous run")
    assert pretrain.main([*FIXTURE_ARGS, f"train.output_dir={output}"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run (checkpoints)" in err and "--overwrite" in err and "--resume auto" in err
    assert marker.read_text() == "previous run"  # untouched
    # --overwrite with a push target that fails: refused too, and nothing was removed yet
    args = [*FIXTURE_ARGS, f"train.output_dir={output}", "--overwrite", "--push_to_hub", "not a repo"]
    assert pretrain.main(args) == 2
    assert "must be a Hub repository id" in capsys.readouterr().err and marker.is_file()


def test_a_run_refused_while_opening_its_data_leaves_no_folder_behind(tmp_path, capsys):
    """data.val_size >= the number of images is found when the data is opened, after the output folder
    was created: it stayed behind, empty (noted since probe 10); a folder that existed stays."""
    from training import pretrain

    output = tmp_path / "new" / "run"
    assert pretrain.main([*FIXTURE_ARGS, f"train.output_dir={output}", "data.val_size=500"]) == 2
    assert "leaves none of 500 to train on" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()
    assert pretrain.main([*FIXTURE_ARGS, f"train.output_dir={tmp_path / 'kept'}", "data.val_size=500"]) == 2
    assert (tmp_path / "kept").is_dir()


def test_resume_auto_with_nothing_to_resume_does_not_replace_a_finished_run(tmp_path, capsys):
    """A finished run whose checkpoints were pruned (compare.py does so): --resume auto would start afresh
    and replace its final/ and metrics, so it is refused like a fresh run over it."""
    from training import pretrain

    output = tmp_path / "run"
    (output / "final").mkdir(parents=True)
    (output / "final" / "config.json").write_text("{}")
    (output / "metrics.jsonl").write_text('{"step": 60}\n')
    (output / "checkpoints").mkdir()  # pruned: no step folder left
    args = [*FIXTURE_ARGS, f"train.output_dir={output}", "train.max_steps=2", "--resume", "auto"]
    assert pretrain.main(args) == 2
    err = capsys.readouterr().err
    assert "--resume auto" in err and "no checkpoint to resume" in err and "--overwrite" in err
    assert (output / "final" / "config.json").read_text() == "{}"
    assert (output / "metrics.jsonl").read_text() == '{"step": 60}\n'
    stopped_early = tmp_path / "early"  # a run stopped before its first checkpoint just starts again
    (stopped_early / "tensorboard").mkdir(parents=True)
    args = [*FIXTURE_ARGS, f"train.output_dir={stopped_early}", "train.max_steps=2", "--resume", "auto"]
    assert pretrain.main([*args, "train.checkpoint_every=0"]) == 0
    assert (stopped_early / "final" / "config.json").is_file()
    # the card's command is this call's, without the local paths a pushed card would publish (probe 13)
    [result] = json.loads((stopped_early / "final" / "config.json").read_text())["visreg"]["eval_results"]
    assert "train.output_dir=<local>/early" in result["command"] and str(tmp_path) not in result["command"]
    assert "data.path=tests/fixtures/fmnist_train_500.npz" in result["command"]


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resume_of_another_run_into_a_folder_holding_a_different_run_is_refused(tmp_path, capsys):
    """Probe 6 (F1): --resume <run A's checkpoint> into run B's folder was accepted with a "changed
    settings" warning and mixed both runs' checkpoints, best and final/. Refused now, before anything is
    written, unless the checkpoint is B's own or the folder is new; a branch is a new run of its own."""
    from training import pretrain

    short = [*FIXTURE_ARGS, "train.max_steps=2", "train.checkpoint_every=2", "eval.knn_every=0"]
    run_a, run_b, branch = tmp_path / "a", tmp_path / "b", tmp_path / "branch"
    for output in (run_a, run_b):
        assert pretrain.main([*short, f"train.output_dir={output}"]) == 0
    step_a = run_a / "checkpoints" / "step-00000002"
    before = _tree(run_b)
    capsys.readouterr()
    assert pretrain.main([*short, f"train.output_dir={run_b}", "--resume", str(step_a)]) == 2
    err = capsys.readouterr().err
    assert str(step_a) in err and str(run_b) in err and "different run" in err
    assert "fresh train.output_dir" in err and "--overwrite" in err
    assert _tree(run_b) == before  # nothing written
    # its own checkpoint (or its own folder) is fine
    assert pretrain.main([*short, f"train.output_dir={run_b}", "--resume", str(run_b)]) == 0
    # into a new folder: a branch, which then counts as a run of its own
    branch_args = [*FIXTURE_ARGS, "train.max_steps=3", "eval.knn_every=0", f"train.output_dir={branch}"]
    assert pretrain.main([*branch_args, "--resume", str(step_a)]) == 0
    assert pretrain.main([*branch_args, "--resume", str(step_a)]) == 2
    assert "different run" in capsys.readouterr().err
    # --overwrite replaces the folder's run
    assert pretrain.main([*short, f"train.output_dir={run_b}", "--resume", str(step_a), "--overwrite"]) == 0
    assert not (run_b / "checkpoints").exists() or not list((run_b / "checkpoints").glob("step-*"))


def _push(tmp_path, repo_id: str, env: dict) -> subprocess.CompletedProcess:
    output = tmp_path / "run"
    args = [*FIXTURE_ARGS, f"train.output_dir={output}", "--push_to_hub", repo_id]
    result = _run("training/pretrain.py", *args, cwd=tmp_path, env={"HF_HOME": str(tmp_path / "hf"), **env})
    assert result.returncode == 2, result.stderr[-2000:]
    assert not output.exists()  # refused before anything was trained or written
    assert "Traceback" not in result.stderr
    return result


def test_push_to_hub_offline_fails_before_training(tmp_path):
    result = _push(tmp_path, "org/tiny", {"HF_HUB_OFFLINE": "1"})
    assert "HF_HUB_OFFLINE" in result.stderr and "hf upload" in result.stderr


def test_push_target_check_bad_name_and_offline(monkeypatch):
    from huggingface_hub import constants

    from training.publish import check_push_target
    from visreg_hub.errors import ConfigError

    with pytest.raises(ConfigError, match="not a valid Hub repository id"):
        check_push_target("org/has space")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE"):
        check_push_target("org/tiny")


class _Refusing(http.server.BaseHTTPRequestHandler):
    """A Hub endpoint that refuses the token (what huggingface.co answers to a bad or read-only token)."""

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = b'{"error": "Invalid credentials in Authorization header"}'
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_push_target_check_with_a_refused_token(monkeypatch):
    from huggingface_hub import constants

    from training.publish import check_push_target
    from visreg_hub.errors import ConfigError

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    try:
        with pytest.raises(ConfigError, match="token is missing, invalid or read-only"):
            check_push_target("org/tiny", token="hf_bad")
    finally:
        server.shutdown()
        server.server_close()


def test_missing_train_extra_names_it(tmp_path):
    blocker = tmp_path / "blocked" / "accelerate"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text('raise ImportError("accelerate is not installed (test)")\n')
    env = {"PYTHONPATH": f"{blocker.parent}{os.pathsep}{REPO}"}
    result = _run("training/pretrain.py", *FIXTURE_ARGS, f"train.output_dir={tmp_path / 'run'}", cwd=tmp_path,
                  env=env)  # fmt: skip
    assert result.returncode == 2
    assert "pip install 'visreg_hub[train]'" in result.stderr and "Traceback" not in result.stderr


def test_evaluate_without_the_fashion_mnist_package_says_how_to_install_it(tmp_path, capsys):
    from training import evaluate

    assert evaluate.main(["vit-mini-p7-fmnist", "--data", "fmnist", "--train", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "apt-get install dataset-fashion-mnist" in err and "Traceback" not in err


def test_epochs_in_the_log_are_the_epochs_the_run_covers():
    assert epochs_covered([7] * 100, 14) == 2  # a 2-epoch run of a 100-epoch preset (max_steps)
    assert epochs_covered([7] * 100, 12) == round(1 + 5 / 7, 2)  # one 7-step epoch and 5 of the next 7 steps
    assert epochs_covered([7, 7], 14) == 2


def test_make_gallery_falls_back_to_the_fixture_with_a_per_class_that_fits(tmp_path, monkeypatch):
    from demo import make_gallery

    monkeypatch.setattr(make_gallery, "DEBIAN_SOURCE", tmp_path / "absent")
    gallery, examples = make_gallery.build(tmp_path / "assets")
    counts = {folder.name: len(list(folder.glob("*.png"))) for folder in gallery.iterdir() if folder.is_dir()}
    assert counts == dict.fromkeys(make_gallery.CLASS_NAMES, 19)  # 20 per class in the fixture, 1 is a query
    assert len(list(examples.glob("*.png"))) == len(make_gallery.EXAMPLE_CLASSES)
    with pytest.raises(ValueError, match="apt-get install dataset-fashion-mnist"):
        make_gallery.build(tmp_path / "assets2", per_class=30)
    assert make_gallery.main(["--assets", str(tmp_path / "assets3"), "--per-class", "30"]) == 2
    labels = np.load(make_gallery.FIXTURE)["labels"]
    assert np.bincount(labels).min() == 20


def test_missing_onnx_extra_suggests_the_cpu_build_without_cuda(monkeypatch):
    import torch

    from visreg_hub.errors import MissingExtraError
    from visreg_hub.inference.onnx import runtime

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # None in sys.modules: `import` raises ImportError
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(MissingExtraError, match=r"visreg_hub\[onnx-cpu\]"):
        runtime.create_session("model.onnx")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(MissingExtraError, match=r"visreg_hub\[onnx\]'"):
        runtime.create_session("model.onnx")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("loss.visreg.shape_weight=abc", "shape_weight must be a finite number"),  # a loss value, not a key
        ("train.seed=-1", r"train.seed must be an integer in \[0, 2\*\*32\)"),
        ("train.seed=4294967296", r"train.seed must be an integer in \[0, 2\*\*32\)"),
        ("train.per_device_batch_size=1", "per_device_batch_size must be >= 2"),
        ("loss.num_slices=99999999999999999999999", "num_slices must be an integer in"),
        ("loss.visreg.projection_dtype=float8", "projection_dtype must be one of"),
        ("monitor.min_std=-1", "monitor.min_std must be >= 0"),
        pytest.param(
            "loss.visreg.sort_backend=triton",
            "needs a CUDA GPU",
            marks=pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CPU-only check"),
        ),
    ],
)
def test_overwrite_keeps_the_old_run_when_a_value_is_bad(tmp_path, capsys, override, message):
    """--overwrite removed the previous run, then a bad loss value, seed or batch plan stopped the new one:
    both were lost. Every value is now checked first (exit 2), and the old run stays."""
    from training import pretrain

    output = tmp_path / "run"
    (output / "final").mkdir(parents=True)
    marker = output / "final" / "config.json"
    marker.write_text("previous run")
    assert pretrain.main([*FIXTURE_ARGS, f"train.output_dir={output}", "--overwrite", override]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert marker.read_text() == "previous run"


def test_duplicate_yaml_keys_and_folder_configs_are_refused(tmp_path):
    from training.config import ConfigError, load_config

    doubled = tmp_path / "dup.yaml"
    doubled.write_text("optim:\n  lr: 2.0e-3\n  warmup_steps: 2\ntrain:\n  epochs: 1\noptim:\n  lr: 7.0\n")
    with pytest.raises(ConfigError, match=r"key 'optim' appears twice in one section \(lines 1 and 6\)"):
        load_config(doubled)
    with pytest.raises(ConfigError, match="is a folder; pass a YAML file"):
        load_config(tmp_path)
    assert load_config(REPO / "training" / "configs" / "fmnist-fixture-cpu.yaml").optim.lr > 0


def test_fp16_on_a_machine_without_cuda_is_refused_not_run_as_fp32(tmp_path, capsys):
    import torch

    from training import pretrain

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU, where fp16 is real")
    args = [*FIXTURE_ARGS, f"train.output_dir={tmp_path / 'run'}", "train.mixed_precision=fp16"]
    assert pretrain.main(args) == 2
    err = capsys.readouterr().err
    assert "mixed_precision=fp16 needs a CUDA GPU" in err and "bf16" in err
    assert not (tmp_path / "run").exists()
