"""Export the trained backbone as a hub checkpoint folder (and push it), with the recipe in ``config.extra``.

The folder is written by :func:`visreg_hub.hub.save_pretrained` into a temporary sibling and renamed, so a
crash never leaves a half-written export under the final name. ``config.extra`` records the recipe
(method, steps, batch plan, optimiser, views), the loss and its settings, the data, and the evaluation
numbers measured during training, which the model card renders.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

from training.build import loss_settings

logger = logging.getLogger(__name__)


def model_extra(trainer) -> dict:
    """The ``config.extra`` of the exported model: recipe, loss, data and evaluation numbers."""
    config, state = trainer.config, trainer.state
    aug, optim, train = config.augment, config.optim, config.train
    _, loss_kwargs = loss_settings(config)
    data = config.data
    # a Hub dataset id where there is one; never the local path (the card and config.json are published)
    dataset_name = "zalando-datasets/fashion_mnist" if data.source == "fmnist" else f"own {data.source} data"
    recipe = {
        "trainer": "visreg_hub training/pretrain.py",
        "method": config.loss.name,
        "steps": state.global_step,
        "total_steps": trainer.total_steps,
        "epochs": config.train.epochs if train.max_steps is None else None,
        "global_batch_size": train.global_batch_size,
        "processes": trainer.world,
        "gradient_accumulation": trainer.accumulation,
        "optimizer": {
            "name": "adamw",
            "lr": optim.lr,
            "weight_decay": optim.weight_decay,
            "warmup_steps": trainer.warmup_steps,
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
    extra = dict(trainer.encoder.config.extra)
    extra.update(
        recipe=recipe,
        loss={"name": config.loss.name, **loss_kwargs},
        datasets=[dataset_name] if data.source == "fmnist" else [],
        data=trainer.data.describe(),
    )
    if state.last_knn is not None:
        extra["eval_results"] = [
            {
                "task": f"image-classification (kNN, k={config.eval.knn_k}, T={config.eval.knn_temperature})",
                "dataset": dataset_name,
                "metric": "accuracy",
                "value": round(float(state.last_knn), 2),
                "split": "validation (carved from train)" if data.val_source is None else "validation",
                "command": " ".join(["training/pretrain.py", *sys.argv[1:]]),
            }
        ]
    return extra


def export_encoder(trainer, folder: Path) -> Path:
    """Write the backbone with ``save_pretrained`` into ``folder`` atomically (main process only)."""
    encoder = trainer.encoder
    original = encoder.config
    encoder.config = original.replace(extra=model_extra(trainer), drop_path_rate=0.0)
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


def push_encoder(trainer, repo_id: str):
    """Upload the backbone (with the same metadata as the export) to the Hub repository ``repo_id``."""
    encoder = trainer.encoder
    original = encoder.config
    encoder.config = original.replace(extra=model_extra(trainer), drop_path_rate=0.0)
    try:
        commit = encoder.push_to_hub(repo_id)
    finally:
        encoder.config = original
    logger.info("pushed the backbone to https://huggingface.co/%s", repo_id)
    return getattr(commit, "commit_url", commit)
