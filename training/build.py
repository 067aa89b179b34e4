"""Builders for a run: backbone + projector module, loss, online probe, optimiser groups, LR schedule."""

from __future__ import annotations

import inspect
import logging
import math

import torch
from torch import nn

from training.checks import model_config
from training.config import LossSection, TrainingConfig
from visreg_hub.errors import ConfigError
from visreg_hub.models import Projector, VISRegEncoder

logger = logging.getLogger(__name__)

LOSS_CLASSES = {
    "visreg": "VISRegLoss",
    "sigreg": "SIGRegLoss",
    "swd": "SWDLoss",
    "vicreg": "VICRegLoss",
    "barlow": "BarlowTwinsLoss",
}
# Constructor arguments the trainer owns (not settable from the per-loss mappings).
_RESERVED = {"group", "seed", "self"}


class SSLModel(nn.Module):
    """Backbone + projector as one module, so DDP wraps (and compile sees) a single forward.

    The backbone is run with the probe's feature tap (``cls_last2`` for depth >= 2): its last E values are
    the final-norm CLS token the projector sees, the whole vector feeds the online probe.

    Args:
        encoder: the backbone.
        projector: the training-only head.
    """

    def __init__(self, encoder: VISRegEncoder, projector: Projector) -> None:
        super().__init__()
        self.encoder, self.projector = encoder, projector
        self.probe_pooling = "cls_last2" if encoder.config.depth >= 2 else "cls"

    @property
    def probe_dim(self) -> int:
        return self.encoder.embedding_dim(self.probe_pooling)

    def forward(
        self, global_images: torch.Tensor, local_images: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: normalised (Vg*B, C, Sg, Sg) global and (Vl*B, C, Sl, Sl) local views.

        Returns:
            (V*B, P) probe features (global views first) and (V*B, D) projections; projecting all views
            in one call makes the projector's BatchNorm use statistics of every view, as the paper does.
        """
        features = [self.encoder(global_images, pooling=self.probe_pooling)]
        if local_images is not None:
            features.append(self.encoder(local_images, pooling=self.probe_pooling))
        probe_features = torch.cat(features) if len(features) > 1 else features[0]
        cls = probe_features[:, -self.encoder.embed_dim :]
        return probe_features, self.projector(cls)


def build_model(config: TrainingConfig) -> SSLModel:
    """A freshly initialised backbone and projector (uses the global torch RNG)."""
    encoder = VISRegEncoder(model_config(config))
    projector = Projector(
        encoder.embed_dim,
        hidden_dim=config.projector.hidden_dim,
        out_dim=config.projector.out_dim,
        activation=config.projector.activation,
        num_hidden_layers=config.projector.num_hidden_layers,
    )
    return SSLModel(encoder, projector)


def build_probe(in_dim: int, num_classes: int) -> nn.Module:
    """Online linear probe: LayerNorm + Linear on detached features."""
    return nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, num_classes))


def loss_settings(config: TrainingConfig, name: str | None = None) -> tuple[str, dict]:
    """The loss class name and its constructor keyword arguments (validated against its signature).

    ``loss.reg_weight``, ``loss.num_slices`` and ``loss.slice_mode`` go to every loss that takes them;
    the mapping ``loss.<name>`` adds or overrides arguments.

    Args:
        name: which loss (default: ``loss.name``, the run's).

    Raises:
        ConfigError: a key of ``loss.<name>`` is not an argument of that loss.
    """
    import visreg_hub.losses as losses

    for other in LOSS_CLASSES:  # every loss.<name> mapping, the inactive ones too: a typo is never silent
        _check_keys(other, getattr(config.loss, other), _loss_params(getattr(losses, LOSS_CLASSES[other])))
    name = name or config.loss.name
    cls = getattr(losses, LOSS_CLASSES[name])
    params = _loss_params(cls)
    kwargs = {
        key: getattr(config.loss, key) for key in ("reg_weight", "num_slices", "slice_mode") if key in params
    }
    kwargs.update(getattr(config.loss, name))
    return cls.__name__, kwargs


def resolved_loss_settings(config: TrainingConfig) -> dict:
    """Every constructor argument the run's loss gets, its defaults included, as JSON values.

    What a checkpoint records (``config.extra["loss"]``): the arguments the config sets are not enough to
    tell later which weights trained it, since a loss's defaults can change between versions.
    """
    import visreg_hub.losses as losses

    class_name, kwargs = loss_settings(config)
    parameters = inspect.signature(getattr(losses, class_name).__init__).parameters
    settings = {
        key: parameter.default
        for key, parameter in parameters.items()
        if key not in _RESERVED and parameter.default is not inspect.Parameter.empty
    }
    settings.update(kwargs)  # the slice seed is the recipe's train.seed
    return {key: str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else value
            for key, value in settings.items()}  # fmt: skip


def _warn_unused_shared_settings(config: TrainingConfig, params: set[str]) -> None:
    """Name the shared loss settings a run sets but its loss does not take (e.g. ``loss.num_slices`` for
    VICReg): they are ignored by design, so one loss section serves every method, but not in silence."""
    defaults = LossSection()
    shared = ("reg_weight", "num_slices", "slice_mode")
    unused = [f"loss.{key}={getattr(config.loss, key)!r}" for key in shared
              if key not in params and getattr(config.loss, key) != getattr(defaults, key)]  # fmt: skip
    if unused:
        logger.warning("%s: not used by loss.name=%s, ignored", ", ".join(unused), config.loss.name)


def _loss_params(cls) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters) - _RESERVED


def _check_keys(name: str, settings: dict, params: set[str]) -> None:
    unknown = sorted(set(settings) - params)
    if unknown:
        raise ConfigError(f"loss.{name} has unknown setting(s) {unknown}; it accepts {sorted(params)}")


_PROJECTION_DTYPES = ("float32", "bfloat16", "float16", "float64")


def build_loss(config: TrainingConfig, *, warn_unused: bool = True) -> nn.Module:
    """The configured loss module, seeded with ``train.seed`` (its slice state is checkpointed).

    The values of the other losses' ``loss.<name>`` mappings are checked too, by building those losses
    once: a bad one would otherwise pass silently until someone switched ``loss.name`` to it.

    Args:
        warn_unused: name the shared settings this loss ignores (off for a check-only build, which the
            trainer's own build follows: one warning per run).
    """
    for other in LOSS_CLASSES:
        if other != config.loss.name and getattr(config.loss, other):
            _build(config, other)
    loss = _build(config, config.loss.name)
    if warn_unused:
        _warn_unused_shared_settings(config, _loss_params(type(loss)))
    return loss


def _build(config: TrainingConfig, name: str) -> nn.Module:
    import visreg_hub.losses as losses

    class_name, kwargs = loss_settings(config, name)
    cls = getattr(losses, class_name)
    if "seed" in inspect.signature(cls.__init__).parameters:
        kwargs["seed"] = config.train.seed
    dtype = kwargs.get("projection_dtype")
    if isinstance(dtype, str):  # YAML has no torch dtypes: the name stands for one
        if dtype not in _PROJECTION_DTYPES:
            raise ConfigError(
                f"loss.{name}.projection_dtype must be one of {_PROJECTION_DTYPES} or null, got {dtype!r}"
            )
        kwargs["projection_dtype"] = getattr(torch, dtype)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"loss.{name}: {exc}") from exc


def _no_decay(name: str, param: torch.nn.Parameter) -> bool:
    # Norm weights and biases are 1-D; position embedding, CLS and register tokens are learned inputs.
    return param.ndim <= 1 or any(token in name for token in ("pos_embed", "cls_token", "reg_token"))


def param_groups(model: nn.Module, probe: nn.Module | None, config: TrainingConfig) -> list[dict]:
    """AdamW groups: decayed weights, undecayed norms/biases/embeddings, and the probe's own lr/decay."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if _no_decay(name, param) else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": config.optim.weight_decay, "lr": config.optim.lr},
        {"params": no_decay, "weight_decay": 0.0, "lr": config.optim.lr},
    ]
    if probe is not None:
        groups.append(
            {
                "params": list(probe.parameters()),
                "weight_decay": config.optim.probe_weight_decay,
                "lr": config.optim.probe_lr,
            }
        )
    return groups


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the base LR at optimiser step ``step``: linear warmup, then cosine to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer, warmup_steps: int, total_steps: int, min_ratio: float):
    """Per-step ``LambdaLR`` of :func:`lr_factor` (stepped once per optimiser step, never per micro-step)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps, total_steps, min_ratio)
    )
