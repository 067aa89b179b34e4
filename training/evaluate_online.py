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
from PIL import Image

from training.config import EvalSection
from training.data import TrainData
from training.datasets import ImageSet, eval_loader
from visreg_hub.inference.preprocess import Preprocessor
from visreg_hub.retrieval.metrics import knn_accuracy

logger = logging.getLogger(__name__)


class OnlineEvaluator:
    """kNN (and probe) accuracy of the backbone being trained, on the validation split.

    Images are preprocessed by the library's own evaluation transform
    (:class:`visreg_hub.inference.preprocess.Preprocessor` of the backbone's ``data_config``: resize,
    centre crop by ``crop_pct``, normalise), so the accuracy is that of the embeddings ``encode()`` gives
    for the exported model.

    Args:
        accelerator: the run's ``accelerate.Accelerator`` (device, autocast, gathering).
        model: the unwrapped :class:`~training.build.SSLModel` (its encoder and probe pooling are used).
        probe: the online probe, or None.
        data: the run's data (``bank`` and ``val`` must both exist for evaluation to be enabled).
        settings: the ``eval`` section (k, temperature, batch size).
        num_workers: DataLoader workers for decoding and preprocessing.
    """

    def __init__(
        self, accelerator, model, probe, data: TrainData, settings: EvalSection, *, num_workers: int
    ):
        self.accelerator, self.model, self.probe = accelerator, model, probe
        self.data, self.settings, self.num_workers = data, settings, num_workers
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.enabled = data.val is not None and data.bank is not None and len(data.val) > 0

    @torch.no_grad()
    def embed(self, images: ImageSet) -> tuple[torch.Tensor, torch.Tensor | None, np.ndarray]:
        """(N, E) CLS embeddings, (N, classes) probe logits or None, (N,) labels of ``images``, in order."""
        accelerator, model, probe = self.accelerator, self.model, self.probe
        config = model.encoder.config
        preprocessor = Preprocessor(model.encoder.data_config)
        loader = eval_loader(
            images, self.rank, self.world, self.settings.batch_size, self.num_workers,
            collate=LibraryPreprocessCollate(preprocessor),
        )  # fmt: skip
        embeddings, logits = [], []
        was_training = model.training
        model.eval()
        for raw, _labels in loader:
            views = preprocessor.normalize(raw.to(accelerator.device, non_blocking=True))
            with accelerator.autocast():
                features = model.encoder(views, pooling=model.probe_pooling).float()
            embeddings.append(features[:, -config.embed_dim :])
            if probe is not None:
                logits.append(probe(features).float())
        model.train(was_training)
        local = (
            torch.cat(embeddings)
            if embeddings
            else torch.zeros(0, config.embed_dim, device=accelerator.device)
        )
        gathered = _gather_in_order(accelerator, local, len(images), self.world)
        gathered_logits = None
        if probe is not None:
            width = self.data.num_classes
            local_logits = torch.cat(logits) if logits else torch.zeros(0, width, device=accelerator.device)
            gathered_logits = _gather_in_order(accelerator, local_logits, len(images), self.world)
        return gathered, gathered_logits, images.labels

    def run(self) -> dict[str, float]:
        """kNN accuracy (%) on the validation split with the bank as memory; probe accuracy when present."""
        bank, _, bank_labels = self.embed(self.data.bank)
        val, val_logits, val_labels = self.embed(self.data.val)
        accuracy = knn_accuracy(
            bank.cpu().numpy(), bank_labels, val.cpu().numpy(), val_labels,
            k=self.settings.knn_k, temperature=self.settings.knn_temperature,
        )  # fmt: skip
        results = {"knn/accuracy": _percent(accuracy)}
        if val_logits is not None:
            predicted = val_logits.argmax(1).cpu().numpy()
            results["probe/val_acc"] = _percent(float((predicted == val_labels).mean()))
        return results


def _percent(fraction: float) -> float:
    """A share of a validation split in percent, rounded where no split can resolve it (1e-6 %): 100 * 0.29
    is 28.999999999999996 in floats, which logs and summaries would print."""
    return round(100.0 * fraction, 6)


class LibraryPreprocessCollate:
    """(image uint8 (C, H, W), label, seed) samples -> the library's preprocessed uint8 batch and labels.

    Each stored image goes through :class:`~visreg_hub.inference.preprocess.Preprocessor` as a PIL image,
    exactly as ``encode()`` treats a decoded file (picklable, so it runs in DataLoader workers).
    """

    def __init__(self, preprocessor: Preprocessor) -> None:
        self.preprocessor = preprocessor

    def __call__(self, samples) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = []
        for image, _label, _seed in samples:
            array = image.permute(1, 2, 0).numpy()
            pil = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
            pixels.append(self.preprocessor(pil))
        return torch.stack(pixels), torch.tensor([s[1] for s in samples], dtype=torch.long)


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
