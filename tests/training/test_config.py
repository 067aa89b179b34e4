"""Training configuration: presets carry the paper's values, bad input fails early and clearly.

The paper presets are checked value by value against docs/reference.md's table of the official repository's
defaults (written out here, not read from the presets), so a typo in a preset fails.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from training.build import loss_settings
from training.checks import batch_plan, check_paths, model_config
from training.config import load_config, parse_overrides
from visreg_hub.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
PRESETS = REPO / "training" / "configs"


@pytest.mark.parametrize("preset", sorted(p.name for p in PRESETS.glob("*.yaml")))
def test_every_preset_loads_and_resolves(preset):
    config = load_config(PRESETS / preset)
    model = model_config(config)
    assert model.img_size == config.augment.global_size
    assert model.in_chans == config.data.channels
    _name, kwargs = loss_settings(config)
    assert kwargs["reg_weight"] == config.loss.reg_weight


# (preset, model size, lambda, projector (hidden, out, activation), global views, local views, lr, epochs)
PAPER = [
    ("vit-b16-in1k.yaml", "vit-b16", 0.9, (2048, 256, "gelu"), (4, 224, (0.3, 1.0)), (6, 96, (0.05, 0.3)),
     9e-4, 100),
    ("vit-l14-in1k.yaml", "vit-l14", 0.8, (2048, 384, "gelu"), (4, 224, (0.3, 1.0)), (6, 98, (0.05, 0.3)),
     8e-4, 400),
    ("vit-s8-small-data.yaml", "vit-s8", 0.6, (2048, 128, "relu"), (4, 128, (0.08, 1.0)), (0, None, None),
     1e-3, 800),
]  # fmt: skip


@pytest.mark.parametrize("preset,size,reg,projector,global_views,local_views,lr,epochs", PAPER)
def test_paper_presets_match_the_reference_table(
    preset, size, reg, projector, global_views, local_views, lr, epochs
):
    config = load_config(PRESETS / preset)
    assert config.model.size == size
    assert config.loss.name == "visreg" and config.loss.reg_weight == reg
    assert config.loss.num_slices == 4096 and config.loss.slice_mode == "partition"
    proj = config.projector
    assert (proj.hidden_dim, proj.out_dim, proj.activation, proj.num_hidden_layers) == (*projector, 2)
    aug = config.augment
    assert (aug.global_count, aug.global_size, aug.global_scale) == global_views
    assert aug.local_count == local_views[0]
    if local_views[0]:
        assert (aug.local_size, aug.local_scale) == local_views[1:]
    assert config.optim.lr == pytest.approx(lr)
    assert config.optim.weight_decay == 0.05 and config.optim.clip_grad_norm == 1.0
    assert config.optim.min_lr_ratio == pytest.approx(1e-3)
    assert config.optim.warmup_epochs == (1 if size == "vit-s8" else 5)
    assert config.train.epochs == epochs
    assert config.train.mixed_precision == "bf16"
    jitter = (0.8, 0.8, 0.8) if size == "vit-s8" else (0.4, 0.4, 0.2)
    assert (aug.brightness, aug.contrast, aug.saturation) == jitter
    assert (aug.jitter_prob, aug.grayscale_prob, aug.blur_prob, aug.solarize_prob) == (0.8, 0.2, 0.5, 0.2)
    per_gpu = 64 if size == "vit-s8" else 16
    assert config.train.per_device_batch_size == per_gpu


def test_in22k_preset_extends_vit_l14_and_reads_shards():
    config = load_config(PRESETS / "vit-l14-in22k.yaml")
    assert (
        config.model.size == "vit-l14" and config.loss.reg_weight == 0.8 and config.projector.out_dim == 384
    )
    assert config.data.source == "webdataset" and config.augment.augment_on == "device"


def test_overrides_parse_yaml_values_and_reach_nested_sections():
    config = load_config(
        PRESETS / "fmnist-fixture-cpu.yaml",
        [
            "optim.lr=5e-4",
            "loss.name=sigreg",
            "augment.global_scale=[0.2, 0.9]",
            "loss.visreg.shape_weight=2",
        ],
    )
    assert config.optim.lr == 5e-4  # YAML reads "5e-4" as a string; the schema converts it
    assert config.loss.name == "sigreg"
    assert config.augment.global_scale == (0.2, 0.9)
    assert config.loss.visreg == {"shape_weight": 2}
    assert parse_overrides(["train.stop_after=3"]) == {"train.stop_after": 3}


def test_unquoted_no_is_the_string_no_and_overrides_may_surround_options():
    """YAML 1.1 reads an unquoted ``no`` as false; a Literal that holds "no" takes it back. Overrides
    before and after an option all reach the config (argparse used to refuse the second group)."""
    from training.pretrain import parse_args

    config = load_config(PRESETS / "fmnist-fixture-cpu.yaml", ["train.mixed_precision=no"])
    assert config.train.mixed_precision == "no"
    args = parse_args(["--config", "x.yaml", "optim.lr=1e-3", "--overwrite", "train.stop_after=1",
                       "--resume", "auto", "loss.name=sigreg"])  # fmt: skip
    assert args.overrides == ["optim.lr=1e-3", "train.stop_after=1", "loss.name=sigreg"]
    assert args.overwrite and args.resume == "auto"


def test_loss_choice_passes_shared_settings_only_where_accepted():
    config = load_config(PRESETS / "fmnist-fixture-cpu.yaml", ["loss.name=vicreg"])
    name, kwargs = loss_settings(config)
    assert name == "VICRegLoss" and "num_slices" not in kwargs and "reg_weight" not in kwargs
    config = load_config(PRESETS / "fmnist-fixture-cpu.yaml", ["loss.name=sigreg", "loss.sigreg.num_knots=9"])
    assert loss_settings(config)[1] == {"reg_weight": 0.6, "num_slices": 128, "num_knots": 9}


@pytest.mark.parametrize(
    "override,fragment",
    [
        ("optim.lrr=1e-3", "unknown config key 'optim.lrr'. Did you mean: 'optim.lr'"),
        ("optimizer.lr=1e-3", "unknown config key 'optimizer'"),
        ("train.max_steps=abc", "train.max_steps must be an integer"),
        ("loss.name=dino", "loss.name='dino' is not allowed"),
        ("loss.reg_weight=1.5", "loss.reg_weight (lambda) must be in [0, 1]"),
        ("optim.probe_lr=-0.02", "optim.probe_lr"),
        ("optim.probe_weight_decay=-1e-6", "optim.probe_weight_decay"),
        ("augment.global_scale=[0.5, 0.2]", "augment.global_scale=[0.5, 0.2] must satisfy"),
        ("augment.global_size=64", "exceeds data.base_size=28"),
        ("train.per_device_batch_size=48", "not a multiple of train.per_device_batch_size=48"),
        ("data.mean=[0.5, 0.5]", "need one value per channel"),
        ("optim.betas=[0.9, 1.5]", "optim.betas must both be in [0, 1)"),  # AdamW's error came mid-start
        ("train.mixed_precision=fp8", "train.mixed_precision='fp8' is not allowed"),
        # one view trained VISReg with an invariance of 0 and failed VICReg in its first step (probe 15)
        ("augment.local_count=0|augment.global_count=1", "is one view; every objective compares at least"),
    ],
)
def test_bad_values_name_the_key_and_the_fix(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(PRESETS / "fmnist-fixture-cpu.yaml", override.split("|"))
    assert fragment in str(info.value)


def test_unknown_per_loss_setting_is_rejected_with_the_accepted_ones():
    config = load_config(PRESETS / "fmnist-fixture-cpu.yaml", ["loss.visreg.shape_wieght=2"])
    with pytest.raises(ConfigError, match=r"shape_wieght.*accepts.*shape_weight"):
        loss_settings(config)
    # an inactive loss's mapping too: the typo would surface only when a grid switches to that loss
    inactive = load_config(PRESETS / "fmnist-fixture-cpu.yaml", ["loss.sigreg.num_knot=9"])
    assert inactive.loss.name == "visreg"
    with pytest.raises(ConfigError, match=r"loss\.sigreg has unknown setting\(s\) \['num_knot'\].*num_knots"):
        loss_settings(inactive)
    settings = load_config(PRESETS / "fmnist-fixture-cpu.yaml", ["loss.sigreg.num_knots=9"])
    assert "num_knots" not in loss_settings(settings)[1]  # valid settings of another loss are kept aside


@pytest.mark.parametrize(
    ("override", "message"),
    [("loss.vicreg.invariance_weight=abc", r"loss\.vicreg: invariance_weight must be a finite number"),
     ("loss.sigreg.num_knots=100000000", r"loss\.sigreg: num_knots must be an integer in \[2, 4096\]"),
     # a quoted 'false' was truthy: the run trained with the option on and recorded "false" (probe)
     ("loss.visreg.detach_target='false'", r"loss\.visreg: detach_target must be True or False, got 'false'"),
     ("loss.sigreg.sync=maybe", r"loss\.sigreg: sync must be True or False, got 'maybe'")],
)  # fmt: skip
def test_an_inactive_losss_values_are_checked_too(override, message):
    """Probe 15: only the keys of another loss's mapping were checked; a bad value surfaced when a grid
    switched loss.name to it (num_knots=1e8 then tried to allocate 205 GB in the first step)."""
    from training.build import build_loss

    config = load_config(PRESETS / "fmnist-fixture-cpu.yaml", [override])
    assert config.loss.name == "visreg"
    with pytest.raises(ConfigError, match=message):
        build_loss(config)


def test_batch_plan_gives_accumulation_or_a_clear_error():
    config = load_config(PRESETS / "vit-b16-in1k.yaml")
    assert [batch_plan(config, m) for m in (1, 2, 8)] == [8, 4, 1]
    with pytest.raises(
        ConfigError, match=r"global_batch_size=128 is not divisible by .*16 x 3 processes = 48"
    ):
        batch_plan(config, 3)


def test_missing_data_folder_is_reported(tmp_path):
    missing = tmp_path / "imagenet"
    config = load_config(PRESETS / "vit-b16-in1k.yaml", [f"data.path={missing}"])
    with pytest.raises(ConfigError, match=rf"data\.path='{re.escape(str(missing))}' does not exist"):
        check_paths(config)


def _run_pretrain(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, str(REPO / "training" / "pretrain.py"), *args]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "overrides,fragment",
    [
        (["optim.lrr=1e-3"], "unknown config key 'optim.lrr'"),
        (["data.path={tmp}/missing"], "does not exist"),
        (["train.global_batch_size=60"], "not a multiple"),
    ],
)
def test_cli_config_errors_exit_nonzero_before_creating_anything(tmp_path, overrides, fragment):
    output = tmp_path / "run"
    config = PRESETS / "fmnist-fixture-cpu.yaml"
    overrides = [item.format(tmp=tmp_path) for item in overrides]  # a missing path of this test's own
    result = _run_pretrain(tmp_path, "--config", str(config), f"train.output_dir={output}", *overrides)
    assert result.returncode == 2
    assert fragment in result.stderr
    assert not output.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing created in the working folder either


def test_augment_section_defaults_are_the_augmentation_defaults():
    """config.py keeps its own photometric defaults (it must not import torch): they must agree."""
    import dataclasses

    from training.augment import ColorSpec
    from training.config import AugmentSection

    for spec in dataclasses.fields(ColorSpec):
        assert getattr(AugmentSection(), spec.name) == spec.default, spec.name


def test_resume_warns_about_recipe_changes_but_not_about_a_moved_run_folder(caplog, tmp_path):
    """A run folder moved or copied elsewhere warned 'resuming with changed settings' on every resume."""
    import logging

    from training.checks import check_resume_settings

    common = {"loss": {"name": "visreg"}, "data": {"mean": [0.5]}}
    before = {**common, "train": {"output_dir": "/old/run", "epochs": 4}, "optim": {"lr": 1e-3}}
    moved = {**common, "train": {"output_dir": "/new/run", "epochs": 8}, "optim": {"lr": 1e-3}}
    source = tmp_path / "trainer_state.json"
    with caplog.at_level(logging.WARNING, logger="training.checks"):
        check_resume_settings(before, moved, source, tmp_path)
    assert caplog.records == []
    changed = {**common, "train": {"output_dir": "/new/run", "epochs": 8}, "optim": {"lr": 2e-3}}
    with caplog.at_level(logging.WARNING, logger="training.checks"):
        check_resume_settings(before, changed, source, tmp_path)
    (record,) = caplog.records
    assert "optim.lr: 0.001 -> 0.002" in record.getMessage() and "output_dir" not in record.getMessage()
    caplog.clear()  # a long value is cut (review 16), and a record of the wrong shape is called malformed
    with caplog.at_level(logging.WARNING, logger="training.checks"):
        check_resume_settings({**before, "junk": "x" * 10**6}, changed, source, tmp_path)
        check_resume_settings({"loss": "visreg", "data": [1]}, changed, source, tmp_path)
    assert len(caplog.records[0].getMessage()) < 1000 and "characters)" in caplog.records[0].getMessage()
    assert "malformed" in caplog.records[1].getMessage()
