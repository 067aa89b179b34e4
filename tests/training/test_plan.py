"""The run plan (one frozen source of the step arithmetic), the config <-> checks import direction, and
the online kNN's preprocessing (the library's, as ``encode()`` uses)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tests.training.helpers import REPO, single_thread, tiny_config  # noqa: F401
from training.data import build_data
from training.evaluate_online import LibraryPreprocessCollate
from training.plan import RunPlan, build_run_plan
from visreg_hub.inference.preprocess import Preprocessor


def test_run_plan_is_frozen_and_follows_the_config(tmp_path):
    config = tiny_config(
        tmp_path,
        "train.global_batch_size=64",
        "train.per_device_batch_size=16",
        "train.epochs=3",
        "optim.warmup_epochs=1.5",
        "optim.warmup_steps=null",
        "train.max_steps=null",
    )
    data = build_data(config)
    plan = build_run_plan(config, data, world=2)
    assert isinstance(plan, RunPlan)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.total_steps = 1
    assert plan.accumulation == 64 // (16 * 2)  # two processes of 16 images, twice, per optimiser step
    per_epoch = len(data.train) // 64  # whole global batches only
    assert plan.steps_by_epoch == (per_epoch,) * 3 and plan.epochs == 3
    assert plan.total_steps == 3 * per_epoch
    assert plan.warmup_steps == round(1.5 * per_epoch)
    capped = build_run_plan(config.replace(**{"train.max_steps": 2}), data, world=2)
    assert capped.total_steps == 2 and capped.warmup_steps == 1  # warm-up never reaches the last step


def test_checks_do_not_import_the_config_module():
    """training.config imports training.checks (to validate); the reverse import is gone."""
    code = "import sys, training.checks; print('training.config' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False"


def test_online_knn_preprocessing_is_the_librarys():
    """Stored uint8 images go through Preprocessor exactly as encode() treats a decoded file."""
    preprocessor = Preprocessor(
        {"input_size": (3, 24, 24), "mean": (0.5,) * 3, "std": (0.25,) * 3, "interpolation": "bicubic",
         "crop_pct": 0.875}
    )  # fmt: skip
    generator = np.random.default_rng(0)
    images = [generator.integers(0, 256, size=(3, 40, 40), dtype=np.uint8) for _ in range(2)]
    batch, labels = LibraryPreprocessCollate(preprocessor)(
        [(torch.from_numpy(image), label, 0) for label, image in enumerate(images)]
    )
    expected = torch.stack([preprocessor(Image.fromarray(image.transpose(1, 2, 0))) for image in images])
    assert torch.equal(batch, expected) and labels.tolist() == [0, 1]
    assert batch.shape == (2, 3, 24, 24) and batch.dtype == torch.uint8


def test_a_warm_up_longer_than_the_run_is_warned_about(tmp_path, caplog):
    """Probe 6 (F7): optim.warmup_steps=100 with max_steps=12 was accepted silently; the whole run is
    warm-up and the learning rate reaches optim.lr only at the end."""
    import logging

    data = build_data(tiny_config(tmp_path))
    with caplog.at_level(logging.WARNING, logger="training.plan"):
        plan = build_run_plan(tiny_config(tmp_path, "train.max_steps=12", "optim.warmup_steps=100"), data, 1)
    assert plan.warmup_steps == 11
    assert any("optim.warmup_steps: 100 steps" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="training.plan"):
        build_run_plan(tiny_config(tmp_path, "train.max_steps=12", "optim.warmup_steps=3"), data, 1)
    assert not caplog.records
