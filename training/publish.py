"""Export the trained backbone as a hub checkpoint folder (and push it), with the recipe in ``config.extra``.

The folder is written by :func:`visreg_hub.hub.save_pretrained` into a temporary sibling and renamed, so a
crash never leaves a half-written export under the final name. ``config.extra`` records the recipe
(method, steps, batch plan, optimiser, views), the loss and its settings, the data, and the evaluation
numbers measured during training, which the model card renders.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
from pathlib import Path

from training.build import resolved_loss_settings
from training.config import TrainingConfig
from training.plan import RunPlan
from visreg_hub import __version__
from visreg_hub.errors import ConfigError
from visreg_hub.models import VISRegEncoder

logger = logging.getLogger(__name__)


_FOREIGN_PATH = re.compile(r"^([A-Za-z]:[\\/]|\\\\)")


def published_command(script: str, argv: list[str]) -> str:
    """``script`` and its arguments as a card or ``eval.json`` records them: local paths outside the
    working folder become ``<local>/NAME`` (a card is published; ``/home/alice/...`` is nobody's business
    and no use to anyone else), paths inside it stay relative, everything else is kept.

    Args:
        script: the command's script, as a reader would run it (``training/pretrain.py``).
        argv: its arguments (``key=value`` overrides included; values are judged like paths).
    """
    here = Path.cwd().resolve()

    def shown(token: str) -> str:
        key, sep, value = token.partition("=") if "=" in token else ("", "", token)  # key=value, --flag=value
        if _FOREIGN_PATH.match(value):  # C:\..., C:/..., \\server\...: another OS's path, never resolved here
            name = re.split(r"[\\/]", value.rstrip("\\/"))[-1]
            return f"{key}{sep}<local>/{name}"
        if not value.startswith(("~", ".")) and "/" not in value:
            return token
        try:
            path = Path(value).expanduser().resolve()
        except (RuntimeError, OSError, ValueError):  # ~nosuchuser/...: never fail an export over a label
            return f"{key}{sep}<local>"
        local = path.relative_to(here).as_posix() if path.is_relative_to(here) else f"<local>/{path.name}"
        return f"{key}{sep}{local}"

    return " ".join([script, *map(shown, argv)])


def model_extra(
    config: TrainingConfig,
    plan: RunPlan,
    *,
    base: dict,
    data: dict,
    global_step: int,
    last_knn: float | None,
    command: str | None = None,
) -> dict:
    """The ``config.extra`` of the exported model: recipe, loss, data and evaluation numbers.

    Args:
        config: the run's configuration.
        plan: its step arithmetic.
        base: the backbone config's current ``extra`` (kept, then extended).
        data: :meth:`training.data.TrainData.describe` of the run's data.
        global_step: optimiser steps taken so far.
        last_knn: the latest validation kNN accuracy (%), or None before any evaluation.
        command: the training command as :func:`published_command` shows it; None: this process's.
    """
    aug, optim, train = config.augment, config.optim, config.train
    loss = resolved_loss_settings(config)
    source = config.data
    # a Hub dataset id where there is one; never the local path (the card and config.json are published)
    dataset_name = (
        "zalando-datasets/fashion_mnist" if source.source == "fmnist" else f"own {source.source} data"
    )
    recipe = {
        "trainer": "visreg_hub training/pretrain.py",
        "method": config.loss.name,
        "steps": global_step,
        "total_steps": plan.total_steps,
        "epochs": config.train.epochs if train.max_steps is None else None,
        "global_batch_size": train.global_batch_size,
        "processes": plan.world,
        "gradient_accumulation": plan.accumulation,
        "optimizer": {
            "name": "adamw",
            "lr": optim.lr,
            "weight_decay": optim.weight_decay,
            "warmup_steps": plan.warmup_steps,
            "min_lr_ratio": optim.min_lr_ratio,
            "clip_grad_norm": optim.clip_grad_norm,
        },
        "views": {
            "global": [aug.global_count, aug.global_size, list(aug.global_scale)],
            "local": [aug.local_count, aug.local_size, list(aug.local_scale)],
        },
        "projector": [config.projector.hidden_dim, config.projector.out_dim, config.projector.activation],
        "mixed_precision": train.mixed_precision,
        "seed": train.seed,
    }
    extra = dict(base)
    extra.update(
        recipe=recipe,
        loss={"name": config.loss.name, **loss, "library_version": __version__},
        datasets=[dataset_name],  # "own npz data" is no Hub id: the card says "own data", not "not recorded"
        data=data,
    )
    if last_knn is not None:
        extra["eval_results"] = [
            {
                "task": f"image-classification (kNN, k={config.eval.knn_k}, T={config.eval.knn_temperature})",
                "dataset": dataset_name,
                "metric": "accuracy",
                "value": round(float(last_knn), 2),
                "split": "validation (carved from train)" if source.val_source is None else "validation",
                "command": command or published_command("training/pretrain.py", sys.argv[1:]),
            }
        ]
    return extra


def export_encoder(encoder: VISRegEncoder, folder: Path, extra: dict) -> Path:
    """Write the backbone with ``save_pretrained`` into ``folder`` atomically (main process only), with
    ``extra`` (from :func:`model_extra`) as its ``config.extra``."""
    original = encoder.config
    encoder.config = original.replace(extra=extra, drop_path_rate=0.0)
    temporary = folder.with_name(f".tmp-{folder.name}")
    try:
        shutil.rmtree(temporary, ignore_errors=True)
        encoder.save_pretrained(temporary)
        retired = folder.with_name(f".tmp-old-{folder.name}")
        if folder.exists():
            os.rename(folder, retired)
        os.rename(temporary, folder)
        shutil.rmtree(retired, ignore_errors=True)
    finally:
        encoder.config = original
    logger.info("exported the backbone to %s", folder)
    return folder


def push_encoder(encoder: VISRegEncoder, repo_id: str, extra: dict):
    """Upload the backbone (with the same metadata as the export) to the Hub repository ``repo_id``."""
    original = encoder.config
    encoder.config = original.replace(extra=extra, drop_path_rate=0.0)
    try:
        commit = encoder.push_to_hub(repo_id)
    finally:
        encoder.config = original
    logger.info("pushed the backbone to https://huggingface.co/%s", repo_id)
    return getattr(commit, "commit_url", commit)


def check_push_target(repo_id: str, token: str | None = None) -> None:
    """Before training: ``--push_to_hub`` names a valid repository the Hub lets this token write to.

    Creates the repository if needed (``exist_ok``; the upload at the end would do the same), so a bad
    name, a missing or read-only token, ``HF_HUB_OFFLINE`` or an unreachable Hub stop the run before
    the first step instead of after the last one.

    Raises:
        ConfigError: the reason, and how to fix it or train without pushing.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    from visreg_hub.errors import HubRequestError
    from visreg_hub.hub.remote import hub_request

    later = "or train without --push_to_hub and upload final/ later with `hf upload`"
    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise ConfigError(f"--push_to_hub {repo_id!r} must be a Hub repository id 'org/name'")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise ConfigError(f"--push_to_hub {repo_id!r} is not a valid Hub repository id: {exc}") from exc

    def create():
        return HfApi(token=token).create_repo(repo_id, exist_ok=True, repo_type="model")

    try:
        hub_request(f"--push_to_hub {repo_id}", create, fix=later)
    except HubRequestError as exc:  # a setting of this command: exit 2 before the first step
        raise ConfigError(str(exc)) from exc
    logger.info("--push_to_hub %s: repository ready, the final model is uploaded after training", repo_id)
