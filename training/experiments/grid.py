"""The method-comparison grid: which methods, which data settings, which seeds, and in what order.

A *cell* is one (setting, method, seed) triple: one pre-training run plus one frozen-feature evaluation.
Cells are ordered so that whatever finishes first makes the most complete table: every method at the
first seed of the first setting, then the next seed, ..., then the next setting.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    """One loss configuration. ``overrides`` are ``training/pretrain.py`` key=value overrides."""

    key: str
    label: str
    overrides: tuple[str, ...]


@dataclass(frozen=True)
class Setting:
    """One training-set condition: ``train`` overrides for pre-training, ``eval_args`` for evaluate.py."""

    key: str
    label: str
    train: tuple[str, ...]
    eval_args: tuple[str, ...]


@dataclass(frozen=True)
class Cell:
    setting: str
    method: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.setting}/{self.method}/seed-{self.seed}"


# Sliced losses share loss.reg_weight and loss.num_slices from the config; SIGReg is also run at LeJEPA's
# recommended 0.05. VICReg and Barlow Twins use their papers' weights (the loss classes' defaults).
METHODS: tuple[Method, ...] = (
    Method("visreg", "VISReg", ("loss.name=visreg",)),
    Method("visreg-shape2", "VISReg* (shape x2)", ("loss.name=visreg", "loss.visreg.shape_weight=2.0")),
    Method("visreg-shape4", "VISReg* (shape x4)", ("loss.name=visreg", "loss.visreg.shape_weight=4.0")),
    Method("sigreg", "SIGReg (shared weight)", ("loss.name=sigreg",)),
    Method("sigreg-lejepa", "SIGReg (LeJEPA weight)", ("loss.name=sigreg", "loss.reg_weight=0.05")),
    Method("swd", "SWD", ("loss.name=swd",)),
    Method("vicreg", "VICReg", ("loss.name=vicreg",)),
    Method("barlow", "Barlow Twins", ("loss.name=barlow",)),
)
METHODS_BY_KEY = {m.key: m for m in METHODS}
REFERENCE_METHOD = "visreg"


@dataclass(frozen=True)
class LongTail:
    """Exponential profile (Cui et al. 2019): n_r = n_max * ratio^(-r / (C - 1)).

    The defaults use ImageNet-LT's extremes (1,280 down to 5 images per class, ratio 256). On Fashion-MNIST's
    10 classes that gives 1280, 691, 373, 201, 108 (many, > 100), 58, 31 (medium), 17, 9, 5 (few, < 20):
    all three ImageNet-LT groups with real members (2,773 images).
    """

    max_per_class: int = 1280
    ratio: float = 256.0
    seed: int = 0

    def train_overrides(self) -> tuple[str, ...]:
        return (
            "data.long_tail.enabled=true",
            "data.long_tail.profile=exponential",
            f"data.long_tail.imbalance_ratio={self.ratio:g}",
            f"data.long_tail.max_per_class={self.max_per_class}",
            f"data.long_tail.seed={self.seed}",
        )

    def eval_args(self) -> tuple[str, ...]:
        return (
            "--long-tail-ratio", f"{self.ratio:g}",
            "--long-tail-profile", "exponential",
            "--long-tail-max", str(self.max_per_class),
            "--long-tail-seed", str(self.seed),
        )  # fmt: skip


def settings(long_tail: LongTail) -> dict[str, Setting]:
    """The two training-set conditions: the balanced set and its long-tailed subsample."""
    return {
        "balanced": Setting("balanced", "balanced", (), ()),
        "lt": Setting(
            "lt",
            f"long-tailed ({long_tail.max_per_class} -> "
            f"{long_tail.max_per_class / long_tail.ratio:g} per class)",
            long_tail.train_overrides(),
            long_tail.eval_args(),
        ),
    }


def cells(setting_keys: list[str], method_keys: list[str], seeds: list[int]) -> list[Cell]:
    """Cells in run order: setting, then seed, then method (so each seed completes a table row set)."""
    return [Cell(s, m, seed) for s in setting_keys for seed in seeds for m in method_keys]
