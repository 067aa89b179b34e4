"""What the multi-crop augmentation cuts and how strongly it jitters: plain settings, no torch.

They live apart from :mod:`training.augment` so that reading and checking a config (``training.config``)
does not import torch: a typo in a config is reported in a moment, not after seconds of imports.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ViewSpec:
    """How to cut one group of views.

    Attributes:
        count: number of views in this group.
        size: output side in pixels (square views).
        scale: (min, max) fraction of the image area a crop covers, as RandomResizedCrop.
    """

    count: int
    size: int
    scale: tuple[float, float]


@dataclass(frozen=True)
class ColorSpec:
    """Photometric augmentation probabilities and strengths (defaults: the official repository's)."""

    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    grayscale_prob: float = 0.2
    blur_prob: float = 0.5
    solarize_prob: float = 0.2
    flip_prob: float = 0.5
