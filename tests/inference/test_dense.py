"""Dense patch features and their PCA colouring, against the model's own taps and numpy's SVD."""

from __future__ import annotations

import numpy as np
import pytest
import timm.data
import torch

from tests.fixtures_models import tiny_encoder
from tests.inference import malformed
from visreg_hub.inference import extract_patch_features, patch_pca_rgb


def numpy_pca_rgb(grid: np.ndarray) -> np.ndarray:
    """Reference transcription: centre, SVD, top-3 scores, sign by largest |score|, min-max to 0..255."""
    height, width, dim = grid.shape
    tokens = grid.reshape(-1, dim).astype(np.float64)
    centred = tokens - tokens.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    scores = centred @ vt[:3].T
    for k in range(scores.shape[1]):
        if scores[np.argmax(np.abs(scores[:, k])), k] < 0:
            scores[:, k] = -scores[:, k]
    scaled = (scores - scores.min(axis=0)) / (scores.max(axis=0) - scores.min(axis=0)) * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8).reshape(height, width, 3)


def test_patch_features_equal_patch_tokens_on_timm_batch(photo_paths):
    model = tiny_encoder()
    transform = timm.data.create_transform(**model.data_config)
    with torch.no_grad():
        batch = torch.stack([transform(malformed.photo_rgb(p)) for p in photo_paths])
        expected = model.patch_tokens(batch)
    grids = extract_patch_features(model, photo_paths, batch_size=3)
    assert grids.shape == (4, 7, 7, 32) == expected.shape
    torch.testing.assert_close(grids, expected, atol=1e-5, rtol=0)
    unit = extract_patch_features(model, photo_paths, normalize=True, convert_to_numpy=True)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=-1), 1.0, atol=1e-5)
    skipped = extract_patch_features(model, [photo_paths[0], b"junk"], on_error="skip")
    assert skipped.embeddings.shape == (1, 7, 7, 32) and [f.index for f in skipped.failures] == [1]


def test_pca_rgb_matches_numpy_svd():
    rng = np.random.default_rng(3)
    # low-rank structure plus noise, like real patch features
    grid = rng.normal(size=(9, 11, 4)) @ rng.normal(size=(4, 24)) + 0.1 * rng.normal(size=(9, 11, 24))
    rgb = patch_pca_rgb(torch.from_numpy(grid).float())
    assert rgb.dtype == np.uint8 and rgb.shape == (9, 11, 3)
    reference = numpy_pca_rgb(grid.astype(np.float32))
    assert np.abs(rgb.astype(int) - reference.astype(int)).max() <= 1
    assert (rgb == reference).mean() > 0.98
    assert rgb.reshape(-1, 3).min(axis=0).tolist() == [0, 0, 0]
    assert rgb.reshape(-1, 3).max(axis=0).tolist() == [255, 255, 255]
    np.testing.assert_array_equal(patch_pca_rgb(grid), patch_pca_rgb(-grid))  # sign convention


def test_pca_rgb_single_component_leaves_other_channels_black():
    ramp = np.linspace(-1.0, 1.0, 6)
    direction = np.arange(1.0, 9.0)
    grid = np.tile(ramp[None, :, None] * direction, (3, 1, 1))  # tokens vary only along x, on one line
    rgb = patch_pca_rgb(grid)
    row = [0, 51, 102, 153, 204, 255]  # the ramp, evenly spaced; ends tie on |score| so either sign is valid
    assert rgb[..., 0].tolist() in ([row] * 3, [row[::-1]] * 3)
    assert (rgb[..., 1:] == 0).all()


@pytest.mark.parametrize("bad", [np.zeros((4, 4)), np.zeros((0, 3, 8)), np.full((2, 2, 3), np.nan)])
def test_pca_rgb_rejects_bad_grids(bad):
    with pytest.raises(ValueError, match="patch_grid"):
        patch_pca_rgb(bad)
