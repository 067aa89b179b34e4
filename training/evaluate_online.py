"""Evaluation during training: frozen-feature kNN accuracy and online-probe accuracy on the validation split.

Each rank embeds its share (indices ``rank::world``) of the kNN bank and of the validation images, the
features are gathered, and every rank computes the same accuracy (so every rank agrees on the best
checkpoint without another broadcast). kNN follows DINO: cosine similarity, k neighbours weighted by
``exp(sim / T)`` (:func:`visreg_hub.retrieval.metrics.knn_accuracy`).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from training.data import TrainData
from training.datasets import ImageSet, eval_loader, eval_views
from visreg_hub.retrieval.metrics import knn_accuracy

logger = logging.getLogger(__name__)


class OnlineEvaluator:
    """kNN (and probe) accuracy of a :class:`~training.engine.Trainer`'s current backbone.

    Args:
        trainer: the running trainer (its accelerator, model, probe, normalisation and state are used).
        data: the run's data (``bank`` and ``val`` must both exist for evaluation to be enabled).
    """

    def __init__(self, trainer, data: TrainData) -> None:
        self.trainer, self.data = trainer, data
        self.enabled = data.val is not None and data.bank is not None and len(data.val) > 0

    @torch.no_grad()
    def embed(self, images: ImageSet) -> tuple[torch.Tensor, torch.Tensor | None, np.ndarray]:
        """(N, E) CLS embeddings, (N, classes) probe logits or None, (N,) labels of ``images``, in order."""
        trainer = self.trainer
        accelerator, model = trainer.accelerator, accelerator_model(trainer)
        config = trainer.encoder.config
        rank, world = trainer.rank, trainer.world
        loader = eval_loader(
            images, rank, world, trainer.config.eval.batch_size, trainer.config.data.num_workers
        )
        embeddings, logits = [], []
        was_training = model.training
        model.eval()
        for raw, _labels in loader:
            raw = raw.to(accelerator.device, non_blocking=True)
            views = trainer.normalize(eval_views(raw, config.img_size, config.crop_pct))
            with accelerator.autocast():
                features = model.encoder(views, pooling=model.probe_pooling).float()
            embeddings.append(features[:, -config.embed_dim :])
            if trainer.probe is not None:
                logits.append(trainer.probe(features).float())
        model.train(was_training)
        local = (
            torch.cat(embeddings)
            if embeddings
            else torch.zeros(0, config.embed_dim, device=accelerator.device)
        )
        gathered = _gather_in_order(accelerator, local, len(images), world)
        gathered_logits = None
        if trainer.probe is not None:
            width = trainer.data.num_classes
            local_logits = torch.cat(logits) if logits else torch.zeros(0, width, device=accelerator.device)
            gathered_logits = _gather_in_order(accelerator, local_logits, len(images), world)
        return gathered, gathered_logits, images.labels

    def run(self) -> dict[str, float]:
        """kNN accuracy (%) on the validation split with the bank as memory; probe accuracy when present."""
        settings = self.trainer.config.eval
        bank, _, bank_labels = self.embed(self.data.bank)
        val, val_logits, val_labels = self.embed(self.data.val)
        accuracy = 100.0 * knn_accuracy(
            bank.cpu().numpy(), bank_labels, val.cpu().numpy(), val_labels,
            k=settings.knn_k, temperature=settings.knn_temperature,
        )  # fmt: skip
        self.trainer.state.last_knn = accuracy
        results = {"knn/accuracy": accuracy}
        if val_logits is not None:
            predicted = val_logits.argmax(1).cpu().numpy()
            results["probe/val_acc"] = 100.0 * float((predicted == val_labels).mean())
        logger.info("step %d: %s", self.trainer.state.global_step, results)
        return results


def accelerator_model(trainer):
    """The unwrapped :class:`~training.build.SSLModel` (no DDP / compile wrapper)."""
    return trainer.accelerator.unwrap_model(trainer.model)


def _gather_in_order(accelerator, local: torch.Tensor, total: int, world: int) -> torch.Tensor:
    """Gather per-rank rows (rank r holds items r, r + world, ...) back into item order, (total, ...)."""
    if world == 1:
        return local
    padded = accelerator.pad_across_processes(local, dim=0)
    gathered = accelerator.gather(padded).view(world, -1, *local.shape[1:])
    out = torch.empty(total, *local.shape[1:], device=local.device, dtype=local.dtype)
    for rank in range(world):
        count = len(range(rank, total, world))
        out[rank::world] = gathered[rank, :count]
    return out
