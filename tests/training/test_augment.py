"""Batched multi-crop augmentation: geometry and photometry against closed forms."""

from __future__ import annotations

import torch

from training.augment import ColorSpec, ViewSpec, color_augment, multi_crop, random_resized_crops

NO_COLOR = ColorSpec(jitter_prob=0, grayscale_prob=0, blur_prob=0, solarize_prob=0, flip_prob=0)


def horizontal_ramp(batch: int, side: int) -> torch.Tensor:
    """(B, 1, side, side) images whose value is the normalised x coordinate of the pixel centre."""
    x = (torch.arange(side) + 0.5) / side
    return x.view(1, 1, 1, side).expand(batch, 1, side, side).clone()


def test_crops_of_a_ramp_are_ramps_and_flip_at_the_requested_rate():
    images = horizontal_ramp(200, 32)
    crops = random_resized_crops(images, ViewSpec(2, 16, (0.2, 1.0)), flip_prob=0.3)
    assert crops.shape == (2, 200, 1, 16, 16)
    rows = crops[..., 0, 8, :].reshape(-1, 16)  # one row of every crop
    steps = rows.diff(dim=1)
    increasing = (steps > 0).all(dim=1)
    decreasing = (steps < 0).all(dim=1)
    # A bilinear resample of a linear ramp is a linear ramp: strictly monotone, one direction per crop.
    assert bool((increasing | decreasing).all())
    assert abs(float(decreasing.float().mean()) - 0.3) < 0.08
    # Every crop lies inside the image (reflection padding never needed for these scales).
    assert float(rows.min()) >= 0 and float(rows.max()) <= 1
    # The horizontal extent of a crop is sqrt(area * ratio) <= 1 and >= sqrt(0.2 * 3/4) of the side.
    extent = (rows[:, -1] - rows[:, 0]).abs() * 16 / 15
    assert float(extent.min()) >= (0.2 * 3 / 4) ** 0.5 - 1e-4
    assert float(extent.max()) <= 1 + 1e-4


def test_everything_off_is_identity_and_jitter_changes_only_jittered_views():
    images = torch.rand(1, 6, 3, 24, 24)
    assert torch.equal(color_augment(images, NO_COLOR), images)
    jitter_all = ColorSpec(jitter_prob=1.0, grayscale_prob=0, blur_prob=0, solarize_prob=0)
    jittered = color_augment(images, jitter_all)
    changed = (jittered != images).flatten(2).any(2)
    assert bool(changed.all())
    assert float(jittered.min()) >= 0 and float(jittered.max()) <= 1


def test_solarize_and_grayscale_follow_their_definitions():
    views = torch.rand(1, 4, 3, 8, 8)
    solarize_all = ColorSpec(jitter_prob=0, grayscale_prob=0, blur_prob=0, solarize_prob=1.0)
    expected = torch.where(views >= 0.5, 1 - views, views)
    assert torch.allclose(color_augment(views, solarize_all), expected)

    gray_all = ColorSpec(jitter_prob=0, grayscale_prob=1.0, blur_prob=0, solarize_prob=0)
    luma = 0.299 * views[:, :, 0] + 0.587 * views[:, :, 1] + 0.114 * views[:, :, 2]
    out = color_augment(views, gray_all)
    for channel in range(3):
        assert torch.allclose(out[:, :, channel], luma, atol=1e-6)


def test_blur_preserves_constant_images_and_smooths_noise():
    constant = torch.full((1, 2, 3, 20, 20), 0.3)
    blur_all = ColorSpec(jitter_prob=0, grayscale_prob=0, blur_prob=1.0, solarize_prob=0)
    assert torch.allclose(color_augment(constant, blur_all), constant, atol=1e-6)
    noise = torch.rand(1, 2, 3, 20, 20)
    assert float(color_augment(noise, blur_all).var()) < 0.5 * float(noise.var())


def test_multi_crop_shapes_and_reproducibility():
    images = torch.rand(5, 3, 32, 32)
    spec_g, spec_l = ViewSpec(2, 32, (0.3, 1)), ViewSpec(3, 16, (0.05, 0.3))
    g1, l1 = multi_crop(images, spec_g, spec_l, generator=torch.Generator().manual_seed(1))
    g2, l2 = multi_crop(images, spec_g, spec_l, generator=torch.Generator().manual_seed(1))
    assert g1.shape == (2, 5, 3, 32, 32) and l1.shape == (3, 5, 3, 16, 16)
    assert torch.equal(g1, g2) and torch.equal(l1, l2)
    assert float(g1.min()) >= 0 and float(g1.max()) <= 1
