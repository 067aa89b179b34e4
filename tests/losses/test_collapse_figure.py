"""The collapse figure's curves against closed forms of the push along the collapse path z = r * z0.

Along z = r z0 (sigma fixed by the stop-gradient where the loss has one), a step eps along z0 scales the
standardised projections p by (1 + eps / r), and the batch std by the same factor, so:

* shape term (stopgrad sigma): dL/d eps = (2 / r) mean_{v,i,k} (p^2 - t_i p)
* scale term: dL/d eps = (2 / r) mean_{v,d} (sigma - 1) sigma

computed here from sorted float64 projections, without autograd; the figure's -dL/dr per sample is
-dL/d eps / (V N).
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from training.experiments import collapse_figure as cf


def setup(views=2, samples=64, dim=16, num_slices=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    z0 = torch.randn(views, samples, dim, generator=generator, dtype=torch.float64)
    directions = torch.randn(dim, num_slices, generator=generator, dtype=torch.float64)
    return z0, directions / directions.norm(dim=0)


def closed_form_push(z0, directions, r):
    """-dL/dr per sample for the shape and the scale term, from their definitions."""
    views, samples, _ = z0.shape
    z = z0 * r
    mean, std = z.mean(dim=1, keepdim=True), z.std(dim=1, correction=0, keepdim=True)
    p = (((z - mean) / std) @ directions).sort(dim=1).values  # (V, N, K)
    t = (
        torch.distributions.Normal(0.0, 1.0)
        .icdf(torch.arange(1, samples + 1, dtype=torch.float64) / (samples + 1))
        .view(1, -1, 1)
    )
    shape = -(2.0 / r) * (p * p - t * p).mean() / (views * samples)
    # scale = mean_{v,d} (sigma - 1)^2 and sigma scales with r: dL/d eps = mean 2 (sigma - 1) sigma / r
    scale = -(2.0 / r) * ((std - 1.0) * std).mean() / (views * samples)
    return shape.item(), scale.item()


def test_curves_match_closed_forms_and_the_collapse_pattern():
    z0, directions = setup()
    scales = [1e-5, 1e-2, 1.0]
    norms, radial = {}, {}
    for name, loss_of in cf.regularizers(directions).items():
        norms[name], radial[name] = zip(*(cf.sample_gradient(loss_of, z0, r) for r in scales))
    for index, r in enumerate(scales):
        shape, scale = closed_form_push(z0, directions, r)
        assert radial["VISReg shape term"][index] == pytest.approx(shape, rel=1e-9)
        assert radial["VISReg scale term"][index] == pytest.approx(scale, rel=1e-9)
    # the scale term keeps pushing outward by a constant as r -> 0; SIGReg's push vanishes linearly
    assert radial["VISReg scale term"][0] > 0
    assert radial["VISReg scale term"][0] == pytest.approx(radial["VISReg scale term"][1], rel=0.05)
    assert 0 < radial["SIGReg"][0] <= 1e-2 * radial["SIGReg"][1]
    # the stop-gradient shape term pulls inward with a 1/r force, which dominates VISReg at tiny r
    assert radial["VISReg shape term"][0] < 0 and radial["VISReg (scale + shape + center)"][0] < 0
    assert radial["VISReg shape term"][0] == pytest.approx(1e3 * radial["VISReg shape term"][1], rel=1e-6)
    assert norms["SWD"][0] == pytest.approx(norms["SWD"][1], rel=0.05)  # no standardisation: constant


def test_figure_file(tmp_path):
    scales = [1e-5, 1e-1, 10.0]
    norms, radial = cf.gradient_curves(scales, samples=32, dim=8, num_slices=16)
    assert set(norms) == set(radial) and all(len(v) == 3 for v in norms.values())
    path = tmp_path / "figure.png"
    cf.plot(scales, norms, radial, path)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > image.size[1] > 300
    table = cf.markdown(scales, norms, show=(1e-5, 10.0))
    assert f"| SIGReg | {norms['SIGReg'][0]:.3g} | {norms['SIGReg'][2]:.3g} |" in table
