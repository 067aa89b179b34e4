"""Training health: loss-term finiteness, embedding statistics and the collapse alarm.

Statistics (computed on the batch gathered from every rank, so every rank reaches the same verdict):

* ``*_std_mean`` / ``*_std_min``: per-dimension standard deviation over the batch, averaged / smallest.
  A collapsed encoder maps every image to the same point: std -> 0.
* ``*_rank``: effective rank (RankMe, Garrido et al. 2023): exp of the entropy of the normalised
  singular values of the centred batch; dimensional collapse lowers it towards 1.
* ``*_gaussianity``: sliced 2-Wasserstein distance (squared) between the standardised embeddings and
  N(0, 1): project on fixed random unit directions, sort over the batch, mean squared distance to the
  Gaussian quantiles Phi^-1(i / (N + 1)), the same statistic as VISReg's shape term. 0 for Gaussian
  marginals; it grows as the embedding distribution departs from the isotropic Gaussian VISReg targets.

``proj_*`` are the projector outputs the loss sees (first global view), ``embed_*`` the backbone CLS
embeddings. The collapse alarm fires when ``proj_std_mean < monitor.min_std`` or
``embed_rank < monitor.min_rank``: it logs a warning and increments ``health/collapse_alarms``; with
``monitor.stop_on_collapse`` the run stops after ``monitor.collapse_patience`` alarms in a row.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import torch

from training.config import MonitorSection
from visreg_hub.errors import VisregHubError

logger = logging.getLogger(__name__)


class TrainingDivergedError(VisregHubError, RuntimeError):
    """A loss term or the gradient norm became NaN or infinite; no optimiser step was taken."""


class TrainingCollapsedError(VisregHubError, RuntimeError):
    """The collapse alarm fired ``collapse_patience`` times in a row with ``stop_on_collapse`` set."""


def effective_rank(embeddings: torch.Tensor) -> float:
    """RankMe of (N, D) embeddings: exp(entropy of the normalised singular values of the centred batch)."""
    centred = embeddings.double() - embeddings.double().mean(0)
    singular = torch.linalg.svdvals(centred)
    if float(singular.sum()) <= 0.0:
        return 1.0
    p = singular / singular.sum() + 1e-12
    return float(torch.exp(-(p * p.log()).sum()))


def gaussianity(embeddings: torch.Tensor, directions: torch.Tensor) -> float:
    """Sliced squared W2 distance of standardised (N, D) embeddings to N(0, 1) along (D, K) directions."""
    values = embeddings.double()
    standardised = (values - values.mean(0)) / values.std(0, unbiased=False).clamp_min(1e-8)
    projected, _ = torch.sort(standardised @ directions.double(), dim=0)
    count = projected.shape[0]
    levels = torch.arange(1, count + 1, dtype=torch.float64) / (count + 1)
    quantiles = torch.special.ndtri(levels).unsqueeze(1)
    return float((projected - quantiles).square().mean())


def nonfinite_flag(value: torch.Tensor) -> torch.Tensor:
    """0-d float tensor on the value's device: 1 when the scalar ``value`` is NaN or infinite (no sync)."""
    return (~torch.isfinite(value.detach().float().reshape(()))).float()


def raise_if_flagged(
    flags: Mapping[str, torch.Tensor], step: int, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> None:
    """Stop every rank when any rank flagged a non-finite term; one all-reduce and one device sync.

    Args:
        flags: name -> 0-d tensor counting the non-finite values seen (:func:`nonfinite_flag`, summed
            over micro-steps).
        step: the optimiser step being computed, counted from 1 as checkpoints and metrics.jsonl count
            (the step after ``step-0000000{step - 1}``), for the message.
        reduce: sums a tensor over ranks (``accelerator.reduce``); None in single-process use.

    Raises:
        TrainingDivergedError: naming the step and the non-finite term(s); raised on every rank.
    """
    values = torch.stack(list(flags.values()))
    if reduce is not None:
        values = reduce(values)
    if bool((values > 0).any()):
        bad = [name for name, flag in zip(flags, values.tolist()) if flag > 0]
        raise TrainingDivergedError(
            f"training diverged at step {step}: non-finite {', '.join(bad)} (NaN or inf on at least one "
            "rank); no optimiser step was taken. Resume from the last checkpoint (--resume auto) with a "
            "lower optim.lr, a smaller optim.clip_grad_norm, or train.mixed_precision=bf16 instead of fp16."
        )


class HealthMonitor:
    """Computes health statistics and keeps the collapse-alarm counters (saved with the train state).

    Args:
        settings: the ``monitor`` config section.
        seed: seeds the fixed Gaussianity directions (a private generator: the global RNG is untouched).
    """

    def __init__(self, settings: MonitorSection, seed: int = 0) -> None:
        self.settings = settings
        self.seed = seed
        self.collapse_alarms = 0
        self.consecutive_alarms = 0
        self._directions: dict[int, torch.Tensor] = {}

    def directions(self, dim: int) -> torch.Tensor:
        """(dim, K) fixed unit directions for the Gaussianity statistic."""
        if dim not in self._directions:
            generator = torch.Generator().manual_seed(self.seed + dim)
            raw = torch.randn(dim, self.settings.gaussianity_slices, generator=generator, dtype=torch.float64)
            self._directions[dim] = raw / raw.norm(dim=0, keepdim=True)
        return self._directions[dim]

    @torch.no_grad()
    def statistics(self, embeddings: torch.Tensor, projections: torch.Tensor) -> dict[str, float]:
        """Health statistics of one (gathered) batch.

        Args:
            embeddings: (N, E) backbone embeddings.
            projections: (N, D) projector outputs.
        """
        stats: dict[str, float] = {}
        for prefix, values in (("embed", embeddings), ("proj", projections)):
            values = values.detach().float().cpu()
            std = values.std(0, unbiased=False)
            stats[f"{prefix}_std_mean"] = float(std.mean())
            stats[f"{prefix}_std_min"] = float(std.min())
            stats[f"{prefix}_rank"] = effective_rank(values)
            stats[f"{prefix}_gaussianity"] = gaussianity(values, self.directions(values.shape[1]))
        return stats

    def check_collapse(self, stats: Mapping[str, float], step: int) -> bool:
        """Update the alarm counters; warn when collapsing, raise when told to stop.

        Returns:
            True when the alarm fired at this step.

        Raises:
            TrainingCollapsedError: ``stop_on_collapse`` and ``collapse_patience`` alarms in a row.
        """
        reasons = []
        if stats["proj_std_mean"] < self.settings.min_std:
            reasons.append(
                f"projection std {stats['proj_std_mean']:.3g} < monitor.min_std={self.settings.min_std}"
            )
        if stats["embed_rank"] < self.settings.min_rank:
            reasons.append(
                f"embedding rank {stats['embed_rank']:.3g} < monitor.min_rank={self.settings.min_rank}"
            )
        if not reasons:
            self.consecutive_alarms = 0
            return False
        self.collapse_alarms += 1
        self.consecutive_alarms += 1
        logger.warning("collapse alarm at step %d: %s", step, "; ".join(reasons))
        if self.settings.stop_on_collapse and self.consecutive_alarms >= self.settings.collapse_patience:
            raise TrainingCollapsedError(
                f"representation collapse at step {step} ({'; '.join(reasons)}), "
                f"{self.consecutive_alarms} alarms in a row; stopping (monitor.stop_on_collapse). "
                "Raise loss.reg_weight or lower optim.lr."
            )
        return True

    def state_dict(self) -> dict[str, int]:
        return {"collapse_alarms": self.collapse_alarms, "consecutive_alarms": self.consecutive_alarms}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.collapse_alarms = int(state["collapse_alarms"])
        self.consecutive_alarms = int(state["consecutive_alarms"])
