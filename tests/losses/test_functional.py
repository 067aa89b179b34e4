"""Every functional term against an independent reference.

References are plain float64 numpy transcriptions of the formulas in docs/reference.md (written here, not
imported from the library), closed forms, and plain-autograd versions for gradients.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import norm

from tests.losses.reference import (
    shape_loss_reference,
    sliced_quantile_distance_reference,
    sliced_wasserstein_loss_reference,
)
from visreg_hub.losses import (
    VISRegLoss,
    barlow_route,
    barlow_twins_terms,
    batch_moments,
    center_loss,
    epps_pulley_grid,
    gaussian_quantiles,
    invariance_loss,
    scale_loss,
    shape_loss,
    sigreg_loss,
    sliced_wasserstein_loss,
    sort_shape,
    vicreg_covariance_loss,
    vicreg_invariance_loss,
    vicreg_variance_loss,
    view_pairs,
    visreg_regularizer,
)


# ------------------------------------------------------------------ float64 transcriptions of the paper
def np_quantiles(n):
    return norm.ppf(np.arange(1, n + 1) / (n + 1))


def np_visreg_terms(z, w):
    """center, scale, shape of docs/reference.md for z (V, N, D) and directions w (D, K)."""
    mu = z.mean(axis=1)
    sigma = np.sqrt(((z - mu[:, None, :]) ** 2).mean(axis=1))  # biased std over n
    center = (mu**2).mean()
    scale = ((sigma - 1.0) ** 2).mean()
    z_hat = (z - mu[:, None, :]) / sigma[:, None, :]
    p = np.sort(z_hat @ w, axis=1)  # sort over n
    shape = ((p - np_quantiles(z.shape[1])[None, :, None]) ** 2).mean()
    return center, scale, shape


def np_swd(x, w):
    p = np.sort(x @ w, axis=1)
    return ((p - np_quantiles(x.shape[1])[None, :, None]) ** 2).mean()


def np_invariance(global_views, local_views=None):
    target = global_views.mean(axis=0)
    views = global_views if local_views is None else np.concatenate([global_views, local_views])
    return ((views - target) ** 2).mean()


def np_sigreg(x, w, t_max=3.0, knots=17):
    """Epps-Pulley: N * sum_t w(t) |ECF(t) - exp(-t^2/2)|^2, trapezoid on [0, t_max] doubled, per slice."""
    n = x.shape[1]
    p = x @ w  # (V, N, K)
    t = np.linspace(0.0, t_max, knots)
    dt = t_max / (knots - 1)
    # trapezoid rule on [0, t_max] (dt/2 at the ends, dt inside), doubled for the mirror half t < 0
    trapezoid = 2 * np.concatenate([[dt / 2], np.full(knots - 2, dt), [dt / 2]])
    phi = np.exp(-(t**2) / 2)
    angle = p[..., None] * t
    real = np.cos(angle).mean(axis=1)  # (V, K, T)
    imag = np.sin(angle).mean(axis=1)
    statistic = n * (((real - phi) ** 2 + imag**2) * trapezoid * phi).sum(axis=-1)
    return statistic.mean()


def np_vicreg(global_views, local_views=None, gamma=1.0, eps=1e-4):
    views = global_views if local_views is None else np.concatenate([global_views, local_views])
    v, _, d = views.shape
    std = np.sqrt(views.var(axis=1, ddof=1) + eps)
    variance = np.maximum(0.0, gamma - std).mean()
    covs = []
    for view in views:
        c = np.cov(view, rowvar=False)  # unbiased
        covs.append(((c**2).sum() - (np.diag(c) ** 2).sum()) / d)
    pairs = [(a, b) for a in range(global_views.shape[0]) for b in range(a + 1, v)]
    invariance = np.mean([((views[a] - views[b]) ** 2).mean() for a, b in pairs])
    return invariance, variance, np.mean(covs)


def np_barlow(global_views, local_views=None, eps=1e-5):
    views = global_views if local_views is None else np.concatenate([global_views, local_views])
    n = views.shape[1]
    normalised = (views - views.mean(axis=1, keepdims=True)) / np.sqrt(views.var(axis=1, keepdims=True) + eps)
    pairs = [(a, b) for a in range(global_views.shape[0]) for b in range(a + 1, views.shape[0])]
    on, off = [], []
    for a, b in pairs:
        c = normalised[a].T @ normalised[b] / n
        on.append(((1 - np.diag(c)) ** 2).sum())
        off.append((c**2).sum() - (np.diag(c) ** 2).sum())
    return np.mean(on), np.mean(off)


# ------------------------------------------------------------------------------------------ fixtures
def data(v=3, n=40, d=6, seed=0, loc=0.4, spread=1.7):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(v, n, d, generator=generator, dtype=torch.float64)
    return spread * base**3 / 3 + loc  # skewed, heavy-tailed: far from Gaussian


def directions(d=6, k=11, seed=1):
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(d, k, generator=generator, dtype=torch.float64)
    return w / w.norm(dim=0)


def test_gaussian_quantiles_match_scipy():
    for n in (1, 2, 7, 1000):
        np.testing.assert_allclose(
            gaussian_quantiles(n, dtype=torch.float64).numpy(), np_quantiles(n), atol=1e-12
        )
    assert gaussian_quantiles(5).dtype == torch.float32
    with pytest.raises(ValueError, match="n must be"):
        gaussian_quantiles(0)


def test_visreg_terms_match_float64_transcription():
    z, w = data(), directions()
    center, scale, shape = np_visreg_terms(z.numpy(), w.numpy())
    assert center_loss(z).item() == pytest.approx(center, rel=1e-12)
    assert scale_loss(z).item() == pytest.approx(scale, rel=1e-12)
    assert shape_loss(z, w).item() == pytest.approx(shape, rel=1e-12)
    out = visreg_regularizer(z, w, scale_weight=2.0, shape_weight=3.0, center_weight=0.5)
    assert out.total.item() == pytest.approx(2 * scale + 3 * shape + 0.5 * center, rel=1e-12)
    assert (out.center.item(), out.scale.item(), out.shape.item()) == pytest.approx((center, scale, shape))


def test_swd_and_invariance_match_float64_transcription():
    z, w = data(), directions()
    assert sliced_wasserstein_loss(z, w).item() == pytest.approx(np_swd(z.numpy(), w.numpy()), rel=1e-12)
    local = data(v=4, seed=5)
    expected = np_invariance(z.numpy(), local.numpy())
    assert invariance_loss(z, local).item() == pytest.approx(expected, rel=1e-12)
    assert invariance_loss(z).item() == pytest.approx(np_invariance(z.numpy()), rel=1e-12)


# one chunk; one row per chunk and its slices in blocks of one (K N > 50); and each sort over one slice
@pytest.mark.parametrize("chunk_elements, sort_elements", [(1 << 24, 1 << 21), (50, 1 << 21), (1 << 24, 7)])
def test_fast_shape_equals_plain_autograd_in_value_and_gradient(monkeypatch, chunk_elements, sort_elements):
    monkeypatch.setattr(sort_shape, "_CHUNK_ELEMENTS", chunk_elements)
    monkeypatch.setattr(sort_shape, "_SORT_BLOCK_ELEMENTS", sort_elements)
    z, w = data(), directions()
    for fast, reference in (
        (shape_loss, shape_loss_reference),
        (sliced_wasserstein_loss, sliced_wasserstein_loss_reference),
    ):
        z1, w1 = z.clone().requires_grad_(), w.clone().requires_grad_()
        z2, w2 = z.clone().requires_grad_(), w.clone().requires_grad_()
        value, expected = fast(z1, w1), reference(z2, w2)
        (3.0 * value).backward()
        (3.0 * expected).backward()
        assert value.item() == pytest.approx(expected.item(), rel=1e-13)
        torch.testing.assert_close(z1.grad, z2.grad, rtol=1e-11, atol=1e-14)
        torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-11, atol=1e-14)


@pytest.mark.parametrize("temporary_elements", [1 << 22, 1])  # all views in one block; one view per block
def test_bf16_moments_and_invariance_in_blocks_of_views_match_float64(monkeypatch, temporary_elements):
    from visreg_hub.losses import _numerics

    monkeypatch.setattr(_numerics, "TEMPORARY_ELEMENTS", temporary_elements)
    views, local = data(v=5).to(torch.bfloat16), data(v=3, seed=5).to(torch.bfloat16)
    exact, exact_local = views.double(), local.double()  # the bf16 values, in float64
    mean, std = batch_moments(views)
    assert mean.dtype == std.dtype == torch.float32 and mean.shape == std.shape == (5, 6)
    torch.testing.assert_close(mean.double(), exact.mean(dim=1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(std.double(), exact.std(dim=1, correction=0), rtol=1e-6, atol=1e-6)
    expected = np_invariance(exact.numpy(), exact_local.numpy())
    assert invariance_loss(views, local).item() == pytest.approx(expected, rel=1e-6)
    # float64: the blocks change nothing against the transcription either
    z, z_local = data(v=5), data(v=3, seed=5)
    assert invariance_loss(z, z_local).item() == pytest.approx(
        np_invariance(z.numpy(), z_local.numpy()), rel=1e-13
    )


def test_shape_accepts_any_leading_axes():
    z, w = data(v=4), directions()
    flat = shape_loss(z[0], w)  # (N, D)
    assert flat.item() == pytest.approx(np_visreg_terms(z[:1].numpy(), w.numpy())[2], rel=1e-12)
    nested = shape_loss(z.reshape(2, 2, *z.shape[1:]), w)
    assert nested.item() == pytest.approx(shape_loss(z, w).item(), rel=1e-13)


def test_closed_forms():
    n, d = 25, 4
    t = gaussian_quantiles(n, dtype=torch.float64)
    generator = torch.Generator().manual_seed(3)
    # every dimension is a permutation of the exact quantiles
    z = torch.stack([t[torch.randperm(n, generator=generator)] for _ in range(d)], dim=-1).unsqueeze(0)
    identity = torch.eye(d, dtype=torch.float64)
    # SWD of exact quantiles along each projected axis is 0
    assert sliced_wasserstein_loss(z, identity).item() == pytest.approx(0.0, abs=1e-28)
    # the shape term standardises first: sort(z_hat) = t / s with s = std(t) < 1, so shape = (1 - s)^2
    s = t.square().mean().sqrt().item()  # mean(t) = 0 by symmetry
    assert shape_loss(z, identity).item() == pytest.approx((1 - s) ** 2, rel=1e-10)
    # hence also invariant to any positive affine map of the data
    assert shape_loss(3.0 * z - 7.0, identity).item() == pytest.approx((1 - s) ** 2, rel=1e-10)
    # centred data has no center loss; unit-std data has no scale loss
    x = data()
    centred = x - x.mean(dim=1, keepdim=True)
    assert center_loss(centred).item() == pytest.approx(0.0, abs=1e-28)
    unit = centred / centred.std(dim=1, correction=0, keepdim=True)
    assert scale_loss(unit).item() == pytest.approx(0.0, abs=1e-28)
    # a zero-spread (collapsed) batch stays finite
    collapsed = torch.ones(2, 8, 3, dtype=torch.float64, requires_grad=True)
    visreg_regularizer(collapsed, identity[:3, :3]).total.backward()
    assert torch.isfinite(collapsed.grad).all()


def test_batch_moments_gradients():
    z = data(v=2, n=7, d=3).requires_grad_()
    assert torch.autograd.gradcheck(batch_moments, (z,))
    mean, std = batch_moments(z)
    torch.testing.assert_close(std, z.std(dim=1, correction=0))
    torch.testing.assert_close(mean, z.mean(dim=1))


def test_invariance_gradient_and_detached_target():
    z, local = data(), data(v=2, seed=9)
    z1, l1 = z.clone().requires_grad_(), local.clone().requires_grad_()
    invariance_loss(z1, l1).backward()
    z2, l2 = z.clone().requires_grad_(), local.clone().requires_grad_()
    target = z2.mean(0)
    (torch.cat([z2, l2]) - target).square().mean().backward()
    torch.testing.assert_close(z1.grad, z2.grad)
    torch.testing.assert_close(l1.grad, l2.grad)
    z3 = z.clone().requires_grad_()
    invariance_loss(z3, detach_target=True).backward()
    z4 = z.clone().requires_grad_()
    (z4 - z4.mean(0).detach()).square().mean().backward()
    torch.testing.assert_close(z3.grad, z4.grad)


def test_epps_pulley_grid():
    t, phi, weights = epps_pulley_grid(3.0, 17, dtype=torch.float64)
    assert t[0] == 0 and t[-1] == 3.0 and len(t) == 17
    # symmetric trapezoid: integrates the window exp(-t^2/2) on [-3, 3] (sqrt(2 pi) erf(3/sqrt 2))
    assert weights.sum().item() == pytest.approx(np.sqrt(2 * np.pi) * 0.9973002039, rel=2e-3)
    torch.testing.assert_close(phi, torch.exp(-(t**2) / 2))


@pytest.mark.parametrize("temporary_elements", [1 << 22, 60])  # one block; two rows of 30 per block
def test_sigreg_matches_float64_transcription_and_autograd(monkeypatch, temporary_elements):
    from visreg_hub.losses import _numerics

    monkeypatch.setattr(_numerics, "TEMPORARY_ELEMENTS", temporary_elements)
    x, w = data(n=30), directions()
    assert sigreg_loss(x, w).item() == pytest.approx(np_sigreg(x.numpy(), w.numpy()), rel=1e-12)
    assert sigreg_loss(x, w, t_max=5.0, num_knots=9).item() == pytest.approx(
        np_sigreg(x.numpy(), w.numpy(), 5.0, 9), rel=1e-12
    )
    # gradient of the memory-light custom backward vs the textbook (V, N, K, T) autograd formulation
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    sigreg_loss(x1, w).backward()
    t, phi, weights = epps_pulley_grid(3.0, 17, dtype=torch.float64)
    angle = (x2 @ w).unsqueeze(-1) * t
    error = (angle.cos().mean(1) - phi).square() + angle.sin().mean(1).square()
    (x.shape[1] * (error @ weights)).mean().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-14)


def test_vicreg_and_barlow_match_float64_transcription():
    g, local = data(v=2), data(v=3, seed=4)
    invariance, variance, covariance = np_vicreg(g.numpy(), local.numpy())
    assert vicreg_invariance_loss(g, local).item() == pytest.approx(invariance, rel=1e-12)
    views = torch.cat([g, local])
    assert vicreg_variance_loss(views).item() == pytest.approx(variance, rel=1e-12)
    assert vicreg_covariance_loss(views).item() == pytest.approx(covariance, rel=1e-12)
    # small-variance data activates the hinge
    small = 0.1 * views
    assert vicreg_variance_loss(small).item() == pytest.approx(
        np_vicreg(0.1 * g.numpy(), 0.1 * local.numpy())[1]
    )
    on, off = np_barlow(g.numpy(), local.numpy())
    on_t, off_t = barlow_twins_terms(g, local)
    assert (on_t.item(), off_t.item()) == pytest.approx((on, off), rel=1e-12)
    assert view_pairs(2, 5) == [(0, 1), (0, 2), (0, 3), (0, 4), (1, 2), (1, 3), (1, 4)]
    with pytest.raises(ValueError, match="two views"):
        barlow_twins_terms(g[:1])


def test_bad_inputs_name_the_shape():
    with pytest.raises(ValueError, match=r"\(6, K\)"):
        shape_loss(data(), torch.ones(5, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="N >= 1"):
        center_loss(torch.ones(4))
    with pytest.raises(ValueError, match="sort_backend"):
        shape_loss(data(), directions(), sort_backend="bogus")


def test_bf16_autocast_close_to_float32():
    """Under autocast, projections run in bf16 but residuals and sums in float32: the loss stays close."""
    z = torch.randn(4, 256, 32) * 1.3 + 0.2
    w = directions(32, 64).float()
    z32 = z.clone().requires_grad_()
    ref = visreg_regularizer(z32, w)
    ref.total.backward()
    z16 = z.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = visreg_regularizer(z16, w)
    out.total.backward()
    assert out.total.dtype == torch.float32
    assert out.shape.item() == pytest.approx(ref.shape.item(), rel=2e-2)
    assert (out.center.item(), out.scale.item()) == pytest.approx(
        (ref.center.item(), ref.scale.item()), rel=1e-5
    )
    cosine = torch.nn.functional.cosine_similarity(z16.grad.flatten(), z32.grad.flatten(), dim=0)
    assert cosine > 0.99
    # explicit float32 projections under autocast reproduce the float32 result
    with torch.autocast("cpu", dtype=torch.bfloat16):
        precise = shape_loss(z, w, projection_dtype=torch.float32)
    assert precise.item() == pytest.approx(ref.shape.item(), rel=1e-5)
    # bf16 inputs (no autocast) also give float32 losses and bf16 gradients
    zb = z.bfloat16().requires_grad_()
    loss = shape_loss(zb, w)
    loss.backward()
    assert loss.dtype == torch.float32 and zb.grad.dtype == torch.bfloat16


def _plain_vicreg_barlow(global_views, local_views):
    """VICReg and Barlow terms with plain autograd (differentiable transcription of the formulas)."""
    views = torch.cat([global_views, local_views])
    v, n, d = views.shape
    pairs = [(a, b) for a in range(global_views.shape[0]) for b in range(a + 1, v)]
    invariance = torch.stack([(views[a] - views[b]).square().mean() for a, b in pairs]).mean()
    variance = torch.relu(1.0 - torch.sqrt(views.var(dim=1, correction=1) + 1e-4)).mean()
    centred = views - views.mean(dim=1, keepdim=True)
    cov = centred.transpose(1, 2) @ centred / (n - 1)
    off_cov = cov.square().sum(dim=(1, 2)) - cov.diagonal(dim1=1, dim2=2).square().sum(-1)
    covariance = (off_cov / d).mean()
    normalised = centred / torch.sqrt(views.var(dim=1, correction=0, keepdim=True) + 1e-5)
    on, off = [], []
    for a, b in pairs:
        c = normalised[a].T @ normalised[b] / n
        on.append((1 - c.diagonal()).square().sum())
        off.append(c.square().sum() - c.diagonal().square().sum())
    return invariance, variance, covariance, torch.stack(on).mean(), torch.stack(off).mean()


def test_vicreg_and_barlow_gradients_match_plain_autograd():
    """The custom backwards (two-matmul covariance, closed-form pair invariance, Barlow's batch-norm)."""
    g, local = data(v=2, n=30, d=5), data(v=3, n=30, d=5, seed=4)
    weights = (3.0, 5.0, 7.0, 11.0, 13.0)  # distinct weights: a wrong term's gradient cannot hide
    g1, l1 = g.clone().requires_grad_(), local.clone().requires_grad_()
    ours = (
        vicreg_invariance_loss(g1, l1),
        vicreg_variance_loss(torch.cat([g1, l1])),
        vicreg_covariance_loss(torch.cat([g1, l1])),
        *barlow_twins_terms(g1, l1),
    )
    sum(w * t for w, t in zip(weights, ours)).backward()
    g2, l2 = g.clone().requires_grad_(), local.clone().requires_grad_()
    plain = _plain_vicreg_barlow(g2, l2)
    sum(w * t for w, t in zip(weights, plain)).backward()
    for mine, expected in zip(ours, plain):
        assert mine.item() == pytest.approx(expected.item(), rel=1e-12)
    torch.testing.assert_close(g1.grad, g2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(l1.grad, l2.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("route", ["pairs", "gram"])
@pytest.mark.parametrize(("num_global", "num_local", "n", "d"), [(2, 3, 30, 5), (2, 0, 6, 40), (3, 4, 9, 12)])
def test_barlow_routes_match_float64_transcription_and_autograd(route, num_global, num_local, n, d):
    """Both routes (per-pair D x D matrices, per-view N x N Gram matrices) give the textbook sums and
    gradients at N > D and N < D, with and without local views."""
    g, local = data(v=num_global, n=n, d=d), data(v=num_local, n=n, d=d, seed=4) if num_local else None
    on, off = np_barlow(g.numpy(), None if local is None else local.numpy())
    g1 = g.clone().requires_grad_()
    l1 = None if local is None else local.clone().requires_grad_()
    on_t, off_t = barlow_twins_terms(g1, l1, route=route)
    assert (on_t.item(), off_t.item()) == pytest.approx((on, off), rel=1e-11)
    (3.0 * on_t + 7.0 * off_t).backward()  # distinct weights: a wrong term's gradient cannot hide
    views = g if local is None else torch.cat([g, local])
    plain = views.clone().requires_grad_()
    normalised = (plain - plain.mean(1, keepdim=True)) / torch.sqrt(
        plain.var(1, correction=0, keepdim=True) + 1e-5
    )
    expected = 0
    for a, b in view_pairs(num_global, views.shape[0]):
        c = normalised[a].T @ normalised[b] / n
        expected = expected + 3.0 * (1 - c.diagonal()).square().sum()
        expected = expected + 7.0 * (c.square().sum() - c.diagonal().square().sum())
    (expected / len(view_pairs(num_global, views.shape[0]))).backward()
    grads = g1.grad if local is None else torch.cat([g1.grad, l1.grad])
    torch.testing.assert_close(grads, plain.grad, rtol=1e-9, atol=1e-12)


def test_barlow_route_picks_the_cheaper_route():
    """auto = gram when its matmul multiply-adds (2 V N^2 D) are under 2/3 of the pair route's (3 P N D^2)."""
    shapes = [
        (2, 2, 2048, 8192),
        (2, 2, 4096, 256),
        (4, 10, 1024, 256),
        (2, 8, 2048, 2048),
        (2, 2, 512, 2048),
    ]
    for num_global, num_views, n, d in shapes:
        pairs = len(view_pairs(num_global, num_views))
        cheaper = "gram" if 2 * num_views * n * n * d < (2 / 3) * 3 * pairs * n * d * d else "pairs"
        assert barlow_route(num_global, num_views, n, d) == cheaper
    assert barlow_route(2, 2, 2048, 8192) == "gram"  # the Barlow Twins paper's head
    assert barlow_route(4, 10, 1024, 256) == "pairs"  # the light benchmark setting (measured 1.1-1.5x)
    assert barlow_route(2, 8, 2048, 2048) == "gram"  # the heavy one (measured 0.5x)
    with pytest.raises(ValueError, match="route must be"):
        barlow_twins_terms(data(v=2), route="fast")


def _assert_bf16_close_to_float32(terms, z):
    """``terms(x)`` (a tuple of losses) on bf16 ``z`` vs float32 ``z``: float32 values within 2 %, bf16
    gradients with cosine > 0.99 to the float32 ones."""
    z32 = z.clone().requires_grad_()
    ref = terms(z32)
    sum(ref).backward()
    zb = z.bfloat16().requires_grad_()
    out = terms(zb)
    sum(out).backward()
    for mine, expected in zip(out, ref):
        assert mine.dtype == torch.float32
        assert mine.item() == pytest.approx(expected.item(), rel=2e-2)
    assert zb.grad.dtype == torch.bfloat16
    cosine = torch.nn.functional.cosine_similarity(zb.grad.float().flatten(), z32.grad.flatten(), dim=0)
    assert cosine > 0.99


@pytest.mark.parametrize("route", ["pairs", "gram"])
def test_barlow_routes_bf16_close_to_float32(route):
    """bf16 matmuls (D x D or N x N), float32 statistics and diagonals: values and gradients stay close."""
    generator = torch.Generator().manual_seed(11)
    content = torch.randn(1, 128, 96, generator=generator)
    z = content + 0.3 * torch.randn(4, 128, 96, generator=generator) + 0.2
    _assert_bf16_close_to_float32(lambda x: barlow_twins_terms(x[:2], x[2:], route=route), z)


def test_vicreg_and_barlow_bf16_close_to_float32():
    """bf16 matmuls for the D x D matrices, float32 statistics: values and gradients stay close."""
    generator = torch.Generator().manual_seed(7)
    content = torch.randn(1, 256, 48, generator=generator)
    z = content + 0.3 * torch.randn(4, 256, 48, generator=generator) + 0.2

    def terms(x):
        return (
            vicreg_covariance_loss(x),
            vicreg_invariance_loss(x[:2], x[2:]),
            *barlow_twins_terms(x[:2], x[2:]),
        )

    _assert_bf16_close_to_float32(terms, z)


def test_public_cached_tables_are_copies():
    """gaussian_quantiles / epps_pulley_grid returned the cache itself: an in-place edit by a user changed
    every later shape loss (0.088 -> 2.54 in the probe)."""
    z = torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    directions = torch.nn.functional.normalize(torch.randn(4, 8, dtype=torch.float64), dim=0)
    before = shape_loss(z, directions)
    gaussian_quantiles(16, dtype=torch.float64).mul_(3)
    gaussian_quantiles(16).mul_(3)
    for table in epps_pulley_grid():
        table.mul_(3)
    grid = epps_pulley_grid()
    assert shape_loss(z, directions) == before
    fresh = gaussian_quantiles(16, dtype=torch.float64).numpy()
    np.testing.assert_allclose(fresh, np_quantiles(16), atol=1e-12)
    assert grid[0][-1] == 3.0 and grid[1][0] == 1.0  # t_max and exp(0) unchanged


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda z: vicreg_variance_loss(z, eps=-1.0), "eps must be a finite number > 0"),
        (lambda z: barlow_twins_terms(z, eps=0.0), "eps must be a finite number > 0"),
        (lambda z: vicreg_invariance_loss(z[0]), r"must be a \(V, N, D\) tensor"),  # 2-D: no views
        (lambda z: barlow_twins_terms(z[0]), r"must be a \(V, N, D\) tensor"),
        (lambda z: vicreg_invariance_loss(z.long()), "floating-point"),
        (lambda z: sigreg_loss(z, torch.eye(8)[:, :3], t_max=float("inf")), "t_max must be a finite"),
        (lambda z: sigreg_loss(z, torch.eye(8)[:, :3], num_knots=2.5), "num_knots must be an integer"),
        (lambda z: shape_loss(z, 10 * torch.eye(8)[:, :3]), r"unit-length.*off by 9: pass directions /"),
        (lambda z: sigreg_loss(z, torch.eye(8, dtype=torch.long)), "directions must be a floating-point"),
        (lambda z: VISRegLoss(8)(z, directions=torch.ones(8, 4)), "unit-length columns"),
        (lambda z: shape_loss(z, torch.zeros(8, 0)), "K >= 1"),
        (lambda z: VISRegLoss(4)(z[:1], z[1:].long()), "local_proj must be a floating-point tensor"),
    ],
)
def test_functional_edge_inputs_are_clear_errors_not_nan(call, message):
    z = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match=message):
        call(z)


@pytest.mark.parametrize(
    "loss",
    [invariance_loss, vicreg_covariance_loss, center_loss, lambda z: VISRegLoss(8)(z).total],
)
def test_double_backward_is_refused_by_name(loss):
    """create_graph=True used to return a gradient without a graph and no error for some terms, so a
    gradient penalty built on it silently contributed nothing (probe 2)."""
    layer = torch.nn.Linear(8, 8)
    z = layer(torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(2)))
    with pytest.raises(RuntimeError, match="first-order gradients only"):
        torch.autograd.grad(loss(z), layer.weight, create_graph=True)
    layer.zero_grad()
    loss(layer(torch.randn(2, 16, 8))).backward()  # first order is untouched
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()


# ------------------------------------------------------------------ probe 19: inputs the terms must refuse
def test_shape_loss_moments_must_fit_the_embeddings():
    """Another batch's moments (more views) gave 0.61 against the correct 0.008 without a word; moments
    pooled over views, (1, D), worked on small inputs and crashed once the chunking started. Now equal
    or broadcastable shapes are used as such (pooled moments equal explicitly expanded ones at any size,
    checked against the float64 transcription), and anything else names the shape it needs."""
    from visreg_hub.errors import UserInputError
    from visreg_hub.losses import SliceSampler

    generator = torch.Generator().manual_seed(19)
    directions = SliceSampler(4096).directions(64, step=0).double()
    for views in (2, 10):  # 10 x 256 x 4096 passes the internal chunk size
        z = torch.randn(views, 256, 64, generator=generator, dtype=torch.float64)
        pooled = batch_moments(z.reshape(1, -1, 64))
        got = shape_loss(z, directions, moments=pooled)
        rows = z.reshape(-1, 64)  # the pooled statistics, recomputed here (biased std, as the paper)
        mean, std = rows.mean(dim=0).expand(views, 64), rows.std(dim=0, correction=0).expand(views, 64)
        expected = sliced_quantile_distance_reference(z, directions, mean=mean, std=std)
        np.testing.assert_allclose(float(got), float(expected), rtol=1e-9)
        other = batch_moments(torch.randn(views + 3, 256, 64, generator=generator, dtype=torch.float64))
        message = rf"mean must have shape \({views}, 64\).*got \({views + 3}, 64\)"
        with pytest.raises(UserInputError, match=message):
            shape_loss(z, directions, moments=other)
        with pytest.raises(UserInputError, match="the \\(mean, std\\) pair"):
            shape_loss(z, directions, moments=(pooled[0],))


@pytest.mark.parametrize("shape", [(0, 8, 4), (2, 8, 0)])
def test_empty_view_stacks_and_zero_width_are_refused_not_nan(shape):
    """An empty (0, N, D) stack (e.g. proj[4:] with 4 views) or D = 0 gave NaN and torch's "degrees of
    freedom" warning from every functional term."""
    from visreg_hub.errors import UserInputError

    z = torch.randn(shape)
    for term in (center_loss, scale_loss, vicreg_variance_loss, vicreg_covariance_loss):
        with pytest.raises(UserInputError, match="are empty: they need D >= 1 and at least one view"):
            term(z)


def test_vicreg_covariance_stays_finite_in_float16():
    """Xc^T Xc was formed before dividing by N - 1, so in float16 (raw or autocast) it overflowed at
    N 256 and std 20 where float32 and bfloat16 were finite; the covariance is now formed scaled. Value
    and gradient against a float64 computation of the same inputs."""
    generator = torch.Generator().manual_seed(20)
    base = torch.randn(256, 1, generator=generator) * 20
    z = torch.stack([base + torch.randn(256, 16, generator=generator) for _ in range(2)])
    reference = z.double().requires_grad_()
    centred = reference - reference.mean(dim=-2, keepdim=True)
    cov = centred.transpose(-1, -2) @ centred / 255
    off = cov - torch.diag_embed(torch.diagonal(cov, dim1=-2, dim2=-1))
    expected = (off.square().sum(dim=(-2, -1)) / 16).mean()
    expected.backward()
    half = z.half().requires_grad_()
    got = vicreg_covariance_loss(half)
    got.backward()
    assert torch.isfinite(got) and torch.isfinite(half.grad).all()
    np.testing.assert_allclose(got.item(), expected.item(), rtol=5e-3)
    cosine = torch.nn.functional.cosine_similarity(
        half.grad.double().flatten(), reference.grad.flatten(), dim=0
    )
    assert cosine > 0.999
