"""Checks between reading a checkpoint's config and building its model, and right after loading weights.

Order in :func:`visreg_hub.hub.loading.load`: config.json parsed (:mod:`visreg_hub.jsonio`, field bounds)
-> :func:`check_before_build` (known ViT architecture, parameter/activation budget, the weights file's
declared tensors equal the shapes the config implies, from the safetensors header alone) -> tensors read
and the model built -> :func:`check_finite` (NaN/Inf weights are refused: they only ever produce NaN
embeddings). Nothing large is allocated before the first two steps pass.
"""

from __future__ import annotations

from pathlib import Path

import torch

from visreg_hub.errors import CheckpointError
from visreg_hub.hub.header import FLOAT_DTYPES, read_header
from visreg_hub.models.limits import ModelLimits, check_architecture, check_budget


def expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """Backbone ``state_dict`` shapes the config implies: timm builds it on the meta device (no memory).

    Call only after :func:`~visreg_hub.models.limits.check_budget`: the meta build still creates one
    Python module per block.
    """
    from visreg_hub.models.encoder import VISRegEncoder

    with torch.device("meta"):
        model = VISRegEncoder(config)
    return {name: tuple(value.shape) for name, value in model.backbone.state_dict().items()}


def check_before_build(config, weights_path: str | Path, limits: ModelLimits | None = None) -> None:
    """Refuse, before any allocation, a config over budget or one its weights file cannot match.

    Args:
        config: the parsed config.json.
        weights_path: the model.safetensors beside it.
        limits: the budget (None: the default :class:`ModelLimits`).

    Raises:
        ConfigError: unknown architecture or over the :class:`ModelLimits` budget.
        CheckpointError: the weights file's header is malformed or declares other tensors than the config
            implies (names, shapes, non-float dtypes), listing the differences.
    """
    weights_path = Path(weights_path)
    check_architecture(config.architecture)
    check_budget(config, limits, source=f"the config of {weights_path.parent}")
    declared, _ = read_header(weights_path)
    expected = expected_shapes(config)
    missing = sorted(set(expected) - set(declared))
    unexpected = sorted(set(declared) - set(expected))
    mismatched = [
        f"{name}: checkpoint {declared[name].shape} vs model {expected[name]}"
        for name in sorted(set(expected) & set(declared))
        if declared[name].shape != expected[name]
    ]
    not_float = sorted(name for name, info in declared.items() if info.dtype not in FLOAT_DTYPES)
    problems = [
        f"{label} {values[:5]}{' ...' if len(values) > 5 else ''}"
        for label, values in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
            ("non-float tensors", not_float),
        )
        if values
    ]
    if problems:
        raise CheckpointError(
            f"{weights_path} does not match the model its config.json describes ({'; '.join(problems)}); "
            "config.json and model.safetensors must come from the same save_pretrained call"
        )


def check_finite(state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Refuse weights holding NaN or Inf (a diverged or corrupted checkpoint).

    Raises:
        CheckpointError: naming the first offending tensors.
    """
    bad = [
        name
        for name, value in state_dict.items()
        if value.is_floating_point() and not bool(torch.isfinite(value).all())
    ]
    if bad:
        raise CheckpointError(
            f"{source} holds NaN or Inf values in {bad[:5]}{' ...' if len(bad) > 5 else ''}; the weights "
            "are corrupt (e.g. saved from a diverged run): re-export them from a healthy checkpoint"
        )
