"""Batched multi-crop augmentation on tensors, on whatever device the batch lives on.

Decoding and resizing happen once per image; every view is then cut from the same (B, C, H, W) batch
with one ``affine_grid`` + ``grid_sample`` call per view group, so the augmentation runs on the GPU
(or vectorised on the CPU) instead of per image in Python. This is what lets a small ViT on an H100 not
wait for data, and what keeps the CPU smoke runs short.

Hue jitter is not implemented (it needs an RGB<->HSV round trip per pixel); brightness, contrast,
saturation, grayscale, blur and solarize are, with the official repository's probabilities as defaults.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from training.augment_specs import ColorSpec, ViewSpec

_LUMA = (0.299, 0.587, 0.114)

__all__ = ["ColorSpec", "ViewSpec", "color_augment", "multi_crop", "random_resized_crops"]


def random_resized_crops(
    images: torch.Tensor, spec: ViewSpec, flip_prob: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Cut ``spec.count`` random resized crops of every image.

    Args:
        images: (B, C, H, W) float images.
        spec: view count, output size and area-scale range.
        flip_prob: probability of a horizontal flip per crop.
        generator: optional RNG for reproducible crops (must live on ``images.device``'s type: CPU).

    Returns:
        (count, B, C, size, size) crops.
    """
    batch, channels = images.shape[:2]
    n = spec.count * batch
    device = images.device

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(n, generator=generator).mul_(high - low).add_(low).to(device)

    area = uniform(*spec.scale)
    log_ratio = uniform(math.log(3 / 4), math.log(4 / 3)).exp()
    # Side lengths as fractions of the image side (affine_grid works in [-1, 1] coordinates).
    width = (area * log_ratio).sqrt().clamp(max=1.0)
    height = (area / log_ratio).sqrt().clamp(max=1.0)
    center_x = (uniform(-1.0, 1.0)) * (1 - width)
    center_y = (uniform(-1.0, 1.0)) * (1 - height)
    flip = torch.where(uniform(0.0, 1.0) < flip_prob, -1.0, 1.0)

    theta = torch.zeros(n, 2, 3, device=device, dtype=images.dtype)
    theta[:, 0, 0] = width * flip
    theta[:, 0, 2] = center_x
    theta[:, 1, 1] = height
    theta[:, 1, 2] = center_y
    grid = F.affine_grid(theta, [n, channels, spec.size, spec.size], align_corners=False)
    source = images.repeat(spec.count, 1, 1, 1)
    crops = F.grid_sample(source, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return crops.view(spec.count, batch, channels, spec.size, spec.size)


def _grayscale(views: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) -> (..., 1, H, W) luma."""
    weights = views.new_tensor(_LUMA).view(3, 1, 1)
    return (views * weights).sum(dim=-3, keepdim=True)


def _per_view(values: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
    return values.view(*values.shape, *([1] * (views.dim() - values.dim())))


def color_augment(
    views: torch.Tensor, spec: ColorSpec, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Photometric augmentation of a stack of RGB views in [0, 1].

    Args:
        views: (V, B, 3, H, W) float views in [0, 1]. Grayscale inputs (C = 1) skip the saturation and
            grayscale steps.
        spec: probabilities and strengths.
        generator: optional CPU RNG for reproducibility.

    Returns:
        (V, B, C, H, W) augmented views in [0, 1].
    """
    shape = views.shape[:2]

    def draw(low: float = 0.0, high: float = 1.0) -> torch.Tensor:
        return torch.rand(shape, generator=generator).mul_(high - low).add_(low).to(views.device)

    jitter = draw() < spec.jitter_prob
    brightness = draw(1 - spec.brightness, 1 + spec.brightness)
    contrast = draw(1 - spec.contrast, 1 + spec.contrast)
    out = views * _per_view(brightness, views)
    mean = out.mean(dim=(-3, -2, -1), keepdim=True)
    out = (out - mean) * _per_view(contrast, views) + mean
    if views.shape[-3] == 3:
        saturation = draw(1 - spec.saturation, 1 + spec.saturation)
        gray = _grayscale(out)
        out = (out - gray) * _per_view(saturation, views) + gray
    # Views that are not jittered pass through bit-exactly (no round-off from identity arithmetic).
    out = torch.where(_per_view(jitter, views), out, views)
    if views.shape[-3] == 3:
        to_gray = _per_view(draw() < spec.grayscale_prob, views)
        out = torch.where(to_gray, _grayscale(out).expand_as(out), out)
    out = out.clamp(0, 1)

    blur = _per_view(draw() < spec.blur_prob, views)
    if blur.any():
        out = torch.where(blur, _gaussian_blur(out), out)
    solarize = _per_view(draw() < spec.solarize_prob, views)
    return torch.where(solarize & (out >= 0.5), 1 - out, out)


def _gaussian_blur(views: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Separable Gaussian blur with a kernel of about 10 % of the view side (at least 3 taps)."""
    channels, side = views.shape[-3], views.shape[-1]
    taps = max(3, int(0.1 * side) | 1)
    offsets = torch.arange(taps, device=views.device, dtype=views.dtype) - taps // 2
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    flat = views.reshape(-1, channels, *views.shape[-2:])
    horizontal = kernel.view(1, 1, 1, taps).expand(channels, 1, 1, taps)
    vertical = kernel.view(1, 1, taps, 1).expand(channels, 1, taps, 1)
    flat = F.conv2d(F.pad(flat, (taps // 2, taps // 2, 0, 0), mode="reflect"), horizontal, groups=channels)
    flat = F.conv2d(F.pad(flat, (0, 0, taps // 2, taps // 2), mode="reflect"), vertical, groups=channels)
    return flat.view_as(views)


def multi_crop(
    images: torch.Tensor,
    global_views: ViewSpec,
    local_views: ViewSpec | None = None,
    color: ColorSpec | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Global and local views of a batch, with photometric augmentation.

    Args:
        images: (B, C, H, W) float images in [0, 1].
        global_views: spec of the global views.
        local_views: spec of the local views, or None.
        color: photometric spec; None uses :class:`ColorSpec` defaults.

    Returns:
        (Vg, B, C, Sg, Sg) global views and (Vl, B, C, Sl, Sl) local views (or None).
    """
    color = color or ColorSpec()

    def views_of(spec: ViewSpec) -> torch.Tensor:
        crops = random_resized_crops(images, spec, color.flip_prob, generator)
        return color_augment(crops, color, generator)

    if local_views is None or local_views.count == 0:
        return views_of(global_views), None
    return views_of(global_views), views_of(local_views)
