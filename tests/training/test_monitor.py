"""Health monitor: statistics against closed forms, the NaN stop and the collapse alarm in real runs.

Runs use the real Fashion-MNIST fixture and a depth-2 32-wide ViT. The collapsing setting is the
invariance term alone (``loss.reg_weight=0``): its minimum is a constant embedding, and within 24 steps
at lr 1e-2 the projection std falls below the default ``monitor.min_std`` (0.05), while the same run with
VISReg's regulariser (lambda 0.6) keeps it above 0.3 (measured: 0.019 vs 0.43 at step 30).
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.training.helpers import single_thread, tiny_config, train  # noqa: F401
from training.config import MonitorSection
from training.monitor import (
    HealthMonitor,
    TrainingCollapsedError,
    TrainingDivergedError,
    effective_rank,
    gaussianity,
    nonfinite_flag,
    raise_if_flagged,
)


def test_effective_rank_closed_forms():
    generator = torch.Generator().manual_seed(0)
    # Equal singular values in k directions -> entropy log k -> rank k.
    basis, _ = torch.linalg.qr(torch.randn(64, 64, generator=generator, dtype=torch.float64))
    signs = torch.tensor([1.0, -1.0]).repeat(32).double()
    points = signs[:, None] * basis[:, :1].T.expand(64, 64)  # rank-1, centred
    assert effective_rank(points) == pytest.approx(1.0, abs=1e-6)
    isotropic = torch.cat([torch.eye(8), -torch.eye(8)]).double() * 3.0
    assert effective_rank(isotropic) == pytest.approx(8.0, rel=1e-6)
    assert effective_rank(torch.ones(10, 4)) == 1.0  # a single point: nothing spread


def test_gaussianity_is_zero_for_exact_quantiles_and_large_for_two_clusters():
    count = 999
    quantiles = torch.special.ndtri(torch.arange(1, count + 1, dtype=torch.float64) / (count + 1))
    # Standardisation uses the biased std, so rescale the exact quantiles to unit std first.
    exact = (quantiles / quantiles.std(unbiased=False)).unsqueeze(1)
    directions = torch.ones(1, 1, dtype=torch.float64)
    assert gaussianity(exact, directions) < 1e-3
    two_points = torch.cat([torch.full((500, 1), -1.0), torch.full((499, 1), 1.0)])
    # The standardised values are +-1 vs N(0,1) quantiles: W2^2 = E(|Z| - 1)^2 = 2 - 2 sqrt(2/pi) ~ 0.40.
    assert gaussianity(two_points, directions) == pytest.approx(2 - 2 * (2 / torch.pi) ** 0.5, abs=0.02)


def test_non_finite_term_is_named_with_the_step():
    terms = {"loss/total": torch.tensor(1.0), "loss/shape": torch.tensor(float("inf"))}
    flags = {name: nonfinite_flag(value) for name, value in terms.items()}
    with pytest.raises(TrainingDivergedError, match=r"step 7: non-finite loss/shape"):
        raise_if_flagged(flags, step=7)
    raise_if_flagged({"loss/total": nonfinite_flag(torch.tensor(1.0))}, step=7)


def test_collapse_alarm_counts_and_stops_after_patience():
    monitor = HealthMonitor(
        MonitorSection(min_std=0.1, min_rank=2.0, stop_on_collapse=True, collapse_patience=2)
    )
    healthy = {"proj_std_mean": 0.9, "embed_rank": 10.0}
    collapsed = {"proj_std_mean": 0.01, "embed_rank": 10.0}
    assert not monitor.check_collapse(healthy, 1)
    assert monitor.check_collapse(collapsed, 2)
    assert not monitor.check_collapse(healthy, 3)  # a healthy check resets the streak
    assert monitor.check_collapse({"proj_std_mean": 0.9, "embed_rank": 1.2}, 4)
    with pytest.raises(TrainingCollapsedError, match=r"collapse at step 5 .*projection std 0\.01"):
        monitor.check_collapse(collapsed, 5)
    assert monitor.state_dict() == {"collapse_alarms": 3, "consecutive_alarms": 2}


def test_nan_at_step_stops_before_any_optimizer_step(tmp_path):
    config = tiny_config(tmp_path, "train.max_steps=6", "debug.nan_at_step=2", "train.checkpoint_every=0")
    from training.engine import Trainer

    trainer = Trainer(config)
    with pytest.raises(
        TrainingDivergedError, match=r"diverged at step 3: non-finite loss/total, .*loss/shape"
    ):  # the third step (steps count from 1, as checkpoint step-00000002 holds the first two)
        trainer.fit()
    assert trainer.state.global_step == 2
    adam_steps = {float(state["step"]) for state in trainer.optimizer.state_dict()["state"].values()}
    assert adam_steps == {2.0}  # steps 0 and 1 applied, step 2 was not


COLLAPSE = [
    "optim.lr=1e-2", "optim.warmup_steps=0", "train.max_steps=24", "train.log_every=3",
    "train.online_probe=false", "train.checkpoint_every=0", "train.per_device_batch_size=32",
    "train.global_batch_size=32",
]  # fmt: skip


def _health_log(folder) -> list[dict]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if "health/proj_std_mean" in row]


def test_collapse_alarm_fires_on_invariance_only_training(tmp_path, caplog):
    collapsing = train(tiny_config(tmp_path / "inv", *COLLAPSE, "loss.reg_weight=0"))
    rows = _health_log(tmp_path / "inv")
    assert rows[-1]["health/proj_std_mean"] < 0.05 < rows[0]["health/proj_std_mean"]
    assert rows[-1]["health/collapse_alarms"] >= 1 and collapsing.monitor.collapse_alarms >= 1
    assert "collapse alarm at step" in caplog.text

    healthy = train(tiny_config(tmp_path / "visreg", *COLLAPSE, "loss.reg_weight=0.6"))
    assert healthy.monitor.collapse_alarms == 0
    assert min(row["health/proj_std_mean"] for row in _health_log(tmp_path / "visreg")) > 0.2


def test_stop_on_collapse_raises(tmp_path):
    config = tiny_config(
        tmp_path,
        *COLLAPSE,
        "loss.reg_weight=0",
        "monitor.stop_on_collapse=true",
        "monitor.collapse_patience=2",
    )
    with pytest.raises(TrainingCollapsedError, match="2 alarms in a row"):
        train(config)
