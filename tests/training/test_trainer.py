"""End-to-end training on real images: two processes through accelerate, losses, views, export, publishing.

Every run trains a depth-2 32-wide ViT on the committed real Fashion-MNIST fixture (400 training images
after a seeded 100-image validation split).
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.training.helpers import FIXTURE_CONFIG, REPO, run_script, single_thread, tiny_config, train  # noqa: F401
from training import checkpoint as ckpt
from training.build import SSLModel, build_model, lr_factor
from visreg_hub.hub import from_pretrained


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _metrics(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_through_accelerate_launch(tmp_path):
    """``accelerate launch`` with 2 CPU processes (gloo): the loss falls, checkpoints hold both ranks' RNGs,
    and the exported folder loads with ``from_pretrained`` and holds exactly the trained backbone."""
    output = tmp_path / "run"
    # `accelerate launch --cpu --num_processes 2` starts ONE process in accelerate 1.x (multi-CPU needs
    # mpirun); the torchrun-based launcher with ACCELERATE_USE_CPU gives two real gloo processes.
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(_free_port())]  # fmt: skip
    args = ["--config", str(FIXTURE_CONFIG), f"data.path={REPO / 'tests/fixtures/fmnist_train_500.npz'}",
            f"train.output_dir={output}", "train.max_steps=12", "train.log_every=2",
            "train.checkpoint_every=6", "train.per_device_batch_size=16",
            "train.progress_bar=false"]  # fmt: skip
    result = run_script(args, cwd=tmp_path, env={"ACCELERATE_USE_CPU": "true"}, launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    # 2 processes x 16 images x 2 micro-steps: exercises DDP's no_sync during gradient accumulation.
    assert "2 process(es) x 16 images x 2 accumulation = global batch 64" in result.stderr

    rows = [row for row in _metrics(output) if "loss/total" in row]
    losses = [row["loss/total"] for row in rows]
    assert [row["step"] for row in rows] == [2, 4, 6, 8, 10, 12]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-2:]) / 2 < losses[0], losses  # the loss falls
    for name in ("loss/invariance", "loss/center", "loss/scale", "loss/shape", "health/embed_rank"):
        assert name in rows[-1]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = set(EventAccumulator(str(output / "tensorboard")).Reload().Tags()["scalars"])
    expected_tags = {
        "loss/total",
        "loss/shape",
        "health/proj_std_mean",
        "health/collapse_alarms",
        "knn/accuracy",
    }
    assert expected_tags <= scalars

    root = output / "checkpoints"
    for step in (6, 12):
        folder = root / ckpt.step_dir_name(step)
        assert {"rng_state_0.json", "rng_state_1.json", "rng_state_1.safetensors"} <= set(os.listdir(folder))
        assert not [name for name in os.listdir(folder) if name.endswith((".pkl", ".bin", ".pt"))]
        assert ckpt.read_state(folder)["global_step"] == step
    assert ckpt.read_pointer(root, "latest").name == "step-00000012"

    model = from_pretrained(str(output / "final"))
    trained = load_file(str(root / "step-00000012" / "model.safetensors"))
    exported = model.backbone.state_dict()
    prefix = "encoder.backbone."
    assert {k[len(prefix) :] for k in trained if k.startswith(prefix)} == set(exported)
    assert all(torch.equal(trained[prefix + key], value) for key, value in exported.items())
    recipe = model.config.extra["recipe"]
    assert recipe["processes"] == 2 and recipe["steps"] == 12 and recipe["global_batch_size"] == 64
    assert model.config.extra["loss"]["name"] == "visreg" and model.config.extra["eval_results"]

    # The run continues on ONE process (a job preempted on two GPUs, resumed on one): in-process, the same
    # global batch through twice the accumulation, the position and weights of step 12; rank 1's generator
    # state is left unused.
    from training import pretrain

    resumed = [arg for arg in args if not arg.startswith("train.max_steps=")] + ["train.max_steps=14"]
    assert pretrain.main([*resumed, "--resume", "auto"]) == 0
    rows = [row for row in _metrics(output) if "loss/total" in row]
    assert [row["step"] for row in rows] == [2, 4, 6, 8, 10, 12, 14]
    assert math.isfinite(rows[-1]["loss/total"])
    # why not "the loss is below step 2's": one process puts 16 images per micro-step through the loss
    # where two ranks put 32 (batch statistics over fewer samples read higher), so the values are not
    # comparable. The resume is checked on the weights: two small-lr steps from step 12's weights move
    # them far less than the six steps before did (a restart from scratch would move them more).
    moved = {}
    for start, end in ((6, 12), (12, 14)):
        before = load_file(str(root / ckpt.step_dir_name(start) / "model.safetensors"))
        after = load_file(str(root / ckpt.step_dir_name(end) / "model.safetensors"))
        weights = [k for k in before if k.startswith("encoder.backbone.")]  # not the loss's step counters
        moved[start] = max(float((after[k] - before[k]).abs().max()) for k in weights)
    assert 0 < moved[12] < moved[6] / 2, moved
    last = root / ckpt.step_dir_name(14)
    assert ckpt.read_state(last)["global_step"] == 14
    assert {n for n in os.listdir(last) if n.startswith("rng_state_")} == {"rng_state_0.json"} | (
        {"rng_state_0.safetensors"} & set(os.listdir(last))
    )
    recipe = from_pretrained(str(output / "final")).config.extra["recipe"]
    assert recipe["processes"] == 1 and recipe["steps"] == 14 and recipe["global_batch_size"] == 64
    assert recipe["gradient_accumulation"] == 4


def test_nan_on_one_rank_stops_every_rank_with_the_message(tmp_path):
    """Rank 1's projector outputs NaN at step 3: both ranks raise (the flag is all-reduced), exit non-zero,
    and no process hangs in a collective waiting for the other."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(_free_port())]  # fmt: skip
    args = ["--config", str(FIXTURE_CONFIG), f"data.path={REPO / 'tests/fixtures/fmnist_train_500.npz'}",
            f"train.output_dir={tmp_path / 'run'}", "train.max_steps=6", "train.per_device_batch_size=32",
            "train.progress_bar=false", "debug.nan_at_step=3", "debug.nan_rank=1"]  # fmt: skip
    result = run_script(
        args, cwd=tmp_path, env={"ACCELERATE_USE_CPU": "true"}, launcher=launcher, timeout=240
    )
    assert result.returncode != 0
    message = "training diverged at step 4: non-finite loss/total"  # the 4th step (index 3)
    assert result.stderr.count(message) == 2, result.stderr[-3000:]  # printed by both ranks


def test_probe_tap_contains_the_projector_input():
    """One forward serves both heads: the last E values of ``cls_last2`` are the final-norm CLS."""
    config = tiny_config(REPO / "unused")
    model: SSLModel = build_model(config).eval()
    images = torch.rand(3, 1, 28, 28)
    features = model.encoder(images, pooling="cls_last2")
    assert torch.allclose(features[:, -32:], model.encoder(images, pooling="cls"), atol=1e-6)


def test_warmup_then_cosine_to_lr_over_1000():
    factors = [lr_factor(step, 4, 20, 1e-3) for step in range(21)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0 and factors[20] == pytest.approx(1e-3)
    assert factors[12] == pytest.approx(1e-3 + (1 - 1e-3) * 0.5)  # halfway through the cosine


def test_no_weight_decay_on_norms_biases_and_tokens(tmp_path):
    from training.build import param_groups

    config = tiny_config(tmp_path)
    model = build_model(config)
    decayed, undecayed = param_groups(model, None, config)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decayed["weight_decay"] == 0.05 and undecayed["weight_decay"] == 0.0
    undecayed_names = {names[id(p)] for p in undecayed["params"]}
    assert {
        "encoder.backbone.pos_embed",
        "encoder.backbone.cls_token",
        "encoder.backbone.norm.weight",
    } <= undecayed_names
    assert all(names[id(p)].endswith("weight") and p.ndim >= 2 for p in decayed["params"])


@pytest.mark.parametrize("loss_name", ["sigreg", "swd", "vicreg", "barlow"])
def test_every_loss_trains_under_the_same_recipe(tmp_path, loss_name):
    trainer = train(tiny_config(tmp_path, "train.max_steps=3", "train.log_every=1", f"loss.name={loss_name}",
                                "train.checkpoint_every=0"))  # fmt: skip
    rows = [row for row in _metrics(tmp_path) if "loss/total" in row]
    assert len(rows) == 3 and all(torch.isfinite(torch.tensor(row["loss/total"])) for row in rows)
    assert type(trainer.loss_fn).__name__.lower().startswith(loss_name[:5])
    extra = from_pretrained(str(tmp_path / "final")).config.extra
    assert extra["loss"]["name"] == loss_name
    # probe 10: only the overridden settings were recorded; every argument the loss got is, with its value
    import inspect

    parameters = inspect.signature(type(trainer.loss_fn).__init__).parameters
    recorded = {k for k in parameters if k not in ("self", "seed", "group")}
    assert recorded <= set(extra["loss"]) and extra["loss"]["library_version"]
    numbers = {"covariance_weight", "variance_weight", "off_diagonal_weight", "num_knots", "t_max", "eps",
               "reg_weight", "num_slices"}  # fmt: skip
    for key in recorded & numbers:
        assert extra["loss"][key] == pytest.approx(getattr(trainer.loss_fn, key)), key


def test_views_cut_on_the_device_train_exactly_like_views_cut_in_workers(tmp_path):
    common = ["train.max_steps=3", "train.checkpoint_every=0", "train.online_probe=false"]
    workers = train(tiny_config(tmp_path / "w", *common, "augment.augment_on=workers"))
    device = train(tiny_config(tmp_path / "d", *common, "augment.augment_on=device"))
    for (name, a), (_, b) in zip(workers.model.state_dict().items(), device.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_keep_last_and_best_checkpoints(tmp_path):
    trainer = train(
        tiny_config(tmp_path, "train.max_steps=5", "train.checkpoint_every=1", "train.keep_last=2")
    )
    root = tmp_path / "checkpoints"
    knn = {row["step"]: row["knn/accuracy"] for row in _metrics(tmp_path) if "knn/accuracy" in row}
    best_step = max(knn, key=lambda step: (knn[step], -step))  # the first of equal maxima stays best
    kept = {path.name for path in ckpt.complete_checkpoints(root)}
    assert kept == {ckpt.step_dir_name(s) for s in {4, 5, best_step}}
    assert ckpt.read_pointer(root, "best").name == ckpt.step_dir_name(best_step)
    assert trainer.state.best_metric == knn[best_step]
    # every accuracy is logged in percent (probe/train_acc was a 0-1 fraction next to 0-100 ones)
    probe = [row["probe/train_acc"] for row in _metrics(tmp_path) if "probe/train_acc" in row]
    assert probe and all(0.0 <= value <= 100.0 for value in probe) and max(probe) > 1.0


def test_export_every_and_push_to_hub_through_the_hub_api(tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    calls = []

    def fake_create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id))

    def fake_upload_folder(self, repo_id, folder_path, **kwargs):
        files = sorted(p.name for p in Path(folder_path).iterdir())
        config = json.loads((Path(folder_path) / "config.json").read_text())
        calls.append(("upload_folder", repo_id, files, config["visreg"]["recipe"]["steps"]))
        return "https://huggingface.co/org/tiny/commit/0"

    monkeypatch.setattr(HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", fake_upload_folder)
    from training.engine import Trainer

    trainer = Trainer(tiny_config(tmp_path, "train.max_steps=4", "train.checkpoint_every=0"),
                      push_to_hub="org/tiny", export_every=2)  # fmt: skip
    summary = trainer.fit()
    uploaded = ["README.md", "config.json", "model.safetensors"]
    assert calls == [("create_repo", "org/tiny"), ("upload_folder", "org/tiny", uploaded, 4)]
    assert summary["push"].endswith("/commit/0")
    exported = from_pretrained(str(tmp_path / "exports" / "step-00000002"))
    assert exported.config.extra["recipe"]["steps"] == 2


@pytest.mark.slow
def test_torch_compile_trains_like_eager(tmp_path):
    """``train.compile=true`` (inductor; minutes on a CPU) follows the eager run closely and checkpoints the
    same (uncompiled) keys, so either setting can resume the other's checkpoints."""
    common = ["train.max_steps=2", "train.checkpoint_every=0", "train.online_probe=false"]
    eager = train(tiny_config(tmp_path / "eager", *common))
    compiled = train(tiny_config(tmp_path / "compiled", *common, "train.compile=true"))
    assert type(compiled.forward).__name__ == "OptimizedModule"
    eager_state, compiled_state = eager.model.state_dict(), compiled.model.state_dict()
    assert eager_state.keys() == compiled_state.keys()
    worst = max(float((eager_state[k].float() - compiled_state[k].float()).abs().max()) for k in eager_state)
    assert worst < 5e-3  # two AdamW steps of lr <= 2e-3 from the same start: only round-off differs


def test_shared_loss_settings_the_chosen_loss_does_not_take_are_named(tmp_path, caplog):
    """Probe 10: loss.name=vicreg with loss.num_slices=64 loss.reg_weight=0.2 ran without a word."""
    import logging

    from training.build import build_loss

    with caplog.at_level(logging.WARNING, logger="training.build"):
        build_loss(tiny_config(tmp_path, "loss.name=vicreg", "loss.num_slices=64", "loss.reg_weight=0.2"))
    assert "loss.reg_weight=0.2, loss.num_slices=64: not used by loss.name=vicreg, ignored" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="training.build"):
        build_loss(tiny_config(tmp_path, "loss.name=visreg", "loss.num_slices=64"))
    assert "ignored" not in caplog.text  # VISReg takes it


def test_each_logged_step_carries_the_learning_rate_it_used(tmp_path):
    """Probe: optim/lr was read after the scheduler stepped, so each metrics row showed the next step's rate
    and the last row a rate no step used (lr * min_lr_ratio). Row s (s steps done) used lr_factor(s - 1)."""
    import json

    config = tiny_config(tmp_path / "run", "train.max_steps=6", "optim.warmup_steps=2", "train.log_every=1",
                         "train.checkpoint_every=0", "eval.knn_every=0")  # fmt: skip
    trainer = train(config)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = {row["step"]: row["optim/lr"] for row in rows if "optim/lr" in row}
    assert sorted(logged) == [1, 2, 3, 4, 5, 6]
    plan, optim = trainer.plan, config.optim
    for step, lr in logged.items():
        want = optim.lr * lr_factor(step - 1, plan.warmup_steps, plan.total_steps, optim.min_lr_ratio)
        assert lr == pytest.approx(want, rel=1e-9), step
    assert logged[1] == pytest.approx(optim.lr / 2)  # the first warm-up step: half the rate
    knn = [row["knn/accuracy"] for row in rows if "knn/accuracy" in row]
    assert knn and all(value == round(value, 6) for value in knn)


def test_a_run_names_an_ignored_shared_setting_once(tmp_path):
    """Probe: pretrain.py built the loss twice (the check before anything is created, then the trainer's),
    so every 'not used by loss.name' warning was printed twice."""
    args = ["--config", str(FIXTURE_CONFIG), f"data.path={REPO / 'tests/fixtures/fmnist_train_500.npz'}",
            f"train.output_dir={tmp_path / 'run'}", "train.max_steps=1", "train.progress_bar=false",
            "eval.knn_every=0", "loss.name=sigreg", "loss.slice_mode=replicate"]  # fmt: skip
    result = run_script(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("loss.slice_mode='replicate': not used by loss.name=sigreg, ignored") == 1
