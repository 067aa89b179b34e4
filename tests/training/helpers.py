"""Shared helpers of the training tests: a tiny real-data config and in-process runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training.config import TrainingConfig, load_config

REPO = Path(__file__).resolve().parents[2]
FIXTURE_CONFIG = REPO / "training" / "configs" / "fmnist-fixture-cpu.yaml"


@pytest.fixture(autouse=True)
def single_thread():
    """One intra-op thread: tiny models are overhead-bound, and two threads on two shared cores spin
    (a 9-step run takes about 1 s of CPU with one thread, 5-10 s with two). Import it into a test module
    to activate it there."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_config(output_dir: Path, *overrides: str) -> TrainingConfig:
    """The fixture preset (500 real Fashion-MNIST images, depth-2 32-wide ViT) with test-friendly settings."""
    return load_config(
        FIXTURE_CONFIG,
        [
            f"data.path={REPO / 'tests' / 'fixtures' / 'fmnist_train_500.npz'}",
            f"train.output_dir={output_dir}",
            "train.progress_bar=false",
            "train.log_with=none",
            *overrides,
        ],
    )


def train(config: TrainingConfig, resume: str | None = None):
    """Build a Trainer for ``config`` in this process and run it; returns the trainer."""
    from training.engine import Trainer

    trainer = Trainer(config, resume=resume)
    trainer.summary = trainer.fit()
    return trainer


def trained_tensors(trainer) -> dict[str, torch.Tensor]:
    """Every tensor that defines where a run is: model, probe, optimiser moments, schedule, slice step."""
    tensors = {f"model.{k}": v for k, v in trainer.model.state_dict().items()}
    if trainer.probe is not None:
        tensors.update({f"probe.{k}": v for k, v in trainer.probe.state_dict().items()})
    for index, state in trainer.optimizer.state_dict()["state"].items():
        tensors.update({f"optim.{index}.{k}": torch.as_tensor(v) for k, v in state.items()})
    tensors["lr_step"] = torch.tensor(trainer.scheduler.last_epoch)
    tensors["loss_step"] = torch.tensor(trainer.loss_fn.step)
    return tensors


def run_script(args: list[str], cwd: Path, env: dict | None = None, timeout: int = 300, launcher=None):
    """Run training/pretrain.py (under ``launcher``, default python) with the repository importable."""
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    command = [*(launcher or [sys.executable]), str(REPO / "training" / "pretrain.py"), *args]
    return subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout)
