"""A small, real VISReg training run on the CPU: the project's end-to-end smoke job.

A tiny ViT + projector is trained with :class:`visreg_hub.losses.VISRegLoss` on real Fashion-MNIST images
(the committed fixture, or the full Debian set when installed), with batched multi-crop views. Every few
steps it reports every loss term and the health of the backbone embeddings (per-dimension std, effective
rank); at the start and the end it reports frozen-feature kNN accuracy on held-out real images, which is
the signal that the encoder learned something rather than merely not collapsing.

Run: ``python -m training.smoke --steps 300`` (about a minute on two cores).
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from training.augment import ColorSpec, ViewSpec, multi_crop
from training.monitor import effective_rank
from visreg_hub.losses import VISRegLoss
from visreg_hub.models import ModelConfig, Projector, VISRegEncoder
from visreg_hub.retrieval.metrics import knn_accuracy

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
logger = logging.getLogger(__name__)

# Fashion-MNIST is grayscale: photometric jitter is limited to brightness/contrast, no solarize.
SMOKE_COLOR = ColorSpec(saturation=0.0, grayscale_prob=0.0, solarize_prob=0.0, blur_prob=0.2)


@dataclass
class SmokeReport:
    """What a smoke run measured: one dict per logged step, plus kNN accuracy before and after."""

    history: list[dict[str, float]] = field(default_factory=list)
    knn_before: float = float("nan")
    knn_after: float = float("nan")
    seconds: float = 0.0
    encoder: VISRegEncoder | None = None


def load_fixture(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Real Fashion-MNIST images from tests/fixtures as (N, 1, 28, 28) float in [0, 1] and (N,) labels."""
    data = np.load(FIXTURES / name)
    images = torch.from_numpy(data["images"]).float().div_(255).unsqueeze(1)
    return images, torch.from_numpy(data["labels"]).long()


@torch.no_grad()
def embed(encoder: VISRegEncoder, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(N, C, H, W) preprocessed images -> (N, E) backbone embeddings in eval mode."""
    was_training = encoder.training
    encoder.eval()
    chunks = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
    out = torch.cat([encoder(normalize(chunk)) for chunk in chunks])
    encoder.train(was_training)
    return out


def normalize(images: torch.Tensor) -> torch.Tensor:
    """Fashion-MNIST mean/std normalisation of (..., 1, H, W) images in [0, 1]."""
    return (images - 0.2860) / 0.3530


def run_smoke(
    steps: int = 40,
    batch_size: int = 64,
    lr: float = 2e-3,
    reg_weight: float = 0.6,
    num_slices: int = 256,
    log_every: int = 10,
    seed: int = 0,
    embed_dim: int = 64,
    depth: int = 4,
    patch_size: int = 7,
    log: Callable[[str], None] | None = None,
) -> SmokeReport:
    """Train a tiny VISReg ViT on real Fashion-MNIST images and measure it.

    Args:
        steps: optimisation steps.
        batch_size: images per step (each gives 2 global 28 px and 2 local 14 px views).
        lr: AdamW learning rate (cosine decay, no warm-up: the run is short).
        reg_weight: VISReg lambda (the paper's small-data setting is 0.6).
        num_slices: K directions of the shape term.
        log_every: steps between logged rows.
        seed: seeds the model, the data order, the crops and the slices.
        embed_dim: width of the tiny ViT (4 heads, 28 px images).
        depth: number of transformer blocks.
        patch_size: 7 gives 16 tokens per 28 px global view and 4 per 14 px local view.
        log: where progress lines go (default: the module logger).

    Returns:
        A :class:`SmokeReport`.
    """
    log = log or logger.info
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train_images, train_labels = load_fixture("fmnist_train_500.npz")
    test_images, test_labels = load_fixture("fmnist_test_200.npz")

    config = ModelConfig.from_name(
        "vit-t4-28",
        patch_size=patch_size,
        in_chans=1,
        mean=(0.2860,),
        std=(0.3530,),
        embed_dim=embed_dim,
        depth=depth,
        num_heads=4,
    )
    encoder = VISRegEncoder(config)
    projector = Projector(encoder.embedding_dim(), hidden_dim=256, out_dim=64)
    loss_fn = VISRegLoss(reg_weight=reg_weight, num_slices=num_slices, seed=seed)
    params = list(encoder.parameters()) + list(projector.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=lr / 1000)
    global_spec, local_spec = ViewSpec(2, 28, (0.3, 1.0)), ViewSpec(2, 14, (0.1, 0.4))

    report = SmokeReport(encoder=encoder)
    report.knn_before = 100 * knn_accuracy(
        embed(encoder, train_images), train_labels, embed(encoder, test_images), test_labels
    )
    log(f"kNN accuracy before training: {report.knn_before:.1f} %")
    start = time.perf_counter()
    encoder.train()
    projector.train()
    for step in range(steps):
        batch = train_images[torch.randint(len(train_images), (batch_size,), generator=generator)]
        global_views, local_views = multi_crop(batch, global_spec, local_spec, SMOKE_COLOR, generator)
        global_proj = project(encoder, projector, global_views)
        local_proj = project(encoder, projector, local_views)
        out = loss_fn(global_proj, local_proj)
        optimizer.zero_grad(set_to_none=True)
        out.total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if step % log_every == 0 or step == steps - 1:
            feats = embed(encoder, test_images)
            row = {name: float(value.detach()) for name, value in out._asdict().items()}
            row.update(step=step, feature_std=float(feats.std(0).mean()))
            row["effective_rank"] = effective_rank(feats)
            report.history.append(row)
            log(
                f"step {step:4d}  total {row['total']:.4f}  inv {row['invariance']:.4f}  "
                f"center {row['center']:.4f}  scale {row['scale']:.4f}  shape {row['shape']:.4f}  "
                f"std {row['feature_std']:.3f}  rank {row['effective_rank']:.1f}/{feats.shape[1]}"
            )
    report.seconds = time.perf_counter() - start
    report.knn_after = 100 * knn_accuracy(
        embed(encoder, train_images), train_labels, embed(encoder, test_images), test_labels
    )
    log(f"kNN accuracy after {steps} steps ({report.seconds:.0f} s): {report.knn_after:.1f} %")
    return report


def project(encoder: VISRegEncoder, projector: Projector, views: torch.Tensor) -> torch.Tensor:
    """(V, B, C, H, W) views -> (V, B, P) projections (all views of one size in one forward)."""
    num_views, batch = views.shape[:2]
    features = encoder(normalize(views.flatten(0, 1)))
    return projector(features).view(num_views, batch, -1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, help="save the trained backbone here (hub format)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    report = run_smoke(steps=args.steps, batch_size=args.batch_size, seed=args.seed, log_every=25)
    if args.output is not None:
        report.encoder.save_pretrained(args.output, overwrite_card=True)
        logger.info("saved the backbone to %s", args.output)


if __name__ == "__main__":
    main()
