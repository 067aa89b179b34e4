"""Loss modules: calling convention, weights, validation, steps and state, local views, collapse."""

from __future__ import annotations

import math

import pytest
import torch

import visreg_hub
from visreg_hub.losses import (
    BarlowTwinsLoss,
    SIGRegLoss,
    SWDLoss,
    VICRegLoss,
    VISRegLoss,
    barlow_twins_terms,
    invariance_loss,
    scale_loss,
    sigreg_loss,
    sliced_wasserstein_loss,
    vicreg_covariance_loss,
    vicreg_invariance_loss,
    vicreg_variance_loss,
    visreg_regularizer,
)


def views(v=2, n=32, d=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(v, n, d, generator=generator, dtype=torch.float64) * 1.2 + 0.1


def test_top_level_export():
    assert visreg_hub.VISRegLoss is VISRegLoss


def test_visreg_total_combines_named_terms_over_all_views():
    g, local = views(2), views(3, seed=1)
    loss_fn = VISRegLoss(num_slices=16, reg_weight=0.8, scale_weight=2.0, shape_weight=3.0, center_weight=0.5)
    directions = loss_fn.sampler.directions(8, 0, dtype=torch.float64)
    out = loss_fn(g, local)
    # the regulariser sees every view once (global and local stacked), as the official code
    reg = visreg_regularizer(
        torch.cat([g, local]), directions, scale_weight=2.0, shape_weight=3.0, center_weight=0.5
    )
    inv = invariance_loss(g, local)
    assert out._fields == ("total", "invariance", "regularizer", "center", "scale", "shape")
    for name in ("center", "scale", "shape"):
        assert getattr(out, name).item() == pytest.approx(getattr(reg, name).item(), rel=1e-12)
    assert out.regularizer.item() == pytest.approx(reg.total.item(), rel=1e-12)
    assert out.invariance.item() == pytest.approx(inv.item(), rel=1e-12)
    assert out.total.item() == pytest.approx(0.2 * inv.item() + 0.8 * reg.total.item(), rel=1e-12)


def test_explicit_directions_override_the_sampler_everywhere():
    g = views()
    w = torch.nn.functional.normalize(torch.randn(8, 5, dtype=torch.float64), dim=0)
    loss_fn = VISRegLoss(num_slices=16)
    a = loss_fn(g, directions=w)
    b = loss_fn(g, directions=w)  # the step advanced in between: explicit directions still win
    assert a.total.item() == b.total.item()
    assert loss_fn.regularizer(g, directions=w).total.item() == pytest.approx(a.regularizer.item())
    assert SWDLoss(16)(g, directions=w).swd.item() == pytest.approx(sliced_wasserstein_loss(g, w).item())
    assert SIGRegLoss(16)(g, directions=w).sigreg.item() == pytest.approx(sigreg_loss(g, w).item())
    with pytest.raises(ValueError, match=r"\(8, K\)"):
        loss_fn(g, directions=torch.ones(7, 3))


def test_swd_and_sigreg_totals():
    g, local = views(), views(2, seed=2)
    w = torch.nn.functional.normalize(torch.randn(8, 9, dtype=torch.float64), dim=0)
    all_views = torch.cat([g, local])
    out = SWDLoss(9, reg_weight=0.75)(g, local, directions=w)
    expected = 0.25 * invariance_loss(g, local) + 0.75 * sliced_wasserstein_loss(all_views, w)
    assert out.total.item() == pytest.approx(expected.item(), rel=1e-12)
    out = SIGRegLoss(9, reg_weight=0.1, t_max=4.0, num_knots=11)(g, local, directions=w)
    expected = 0.9 * invariance_loss(g, local) + 0.1 * sigreg_loss(all_views, w, t_max=4.0, num_knots=11)
    assert out.total.item() == pytest.approx(expected.item(), rel=1e-12)


def test_vicreg_and_barlow_modules():
    g, local = views(), views(2, seed=3)
    out = VICRegLoss()(g, local)
    all_views = torch.cat([g, local])
    assert out.invariance.item() == pytest.approx(vicreg_invariance_loss(g, local).item())
    assert out.variance.item() == pytest.approx(vicreg_variance_loss(all_views).item())
    assert out.covariance.item() == pytest.approx(2 * vicreg_covariance_loss(all_views).item())
    assert out.total.item() == pytest.approx(
        25 * out.invariance.item() + 25 * out.variance.item() + out.covariance.item()
    )
    bt = BarlowTwinsLoss(off_diagonal_weight=0.01)(g, local)
    on, off = barlow_twins_terms(g, local)
    assert bt.total.item() == pytest.approx(on.item() + 0.01 * off.item())
    for route in ("pairs", "gram"):  # both routes reach the functional: same total up to rounding
        forced = BarlowTwinsLoss(off_diagonal_weight=0.01, route=route)(g, local)
        assert forced.total.item() == pytest.approx(bt.total.item(), rel=1e-10)
    with pytest.raises(ValueError, match="route must be"):
        BarlowTwinsLoss(route="gramm")
    with pytest.raises(ValueError, match="two views"):
        VICRegLoss()(g[:1])


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: VISRegLoss(reg_weight=1.5), "reg_weight must be in \\[0, 1.0\\], got 1.5"),
        (lambda: VISRegLoss(scale_weight=-1), "scale_weight must be >= 0, got -1"),
        (lambda: VISRegLoss(shape_weight=math.nan), "shape_weight must be a finite number, got nan"),
        (lambda: VISRegLoss(center_weight="1"), "center_weight must be a finite number, got '1'"),
        (lambda: VISRegLoss(num_slices=0), r"num_slices must be an integer in \[1, 1,048,576\], got 0"),
        (lambda: VISRegLoss(num_slices=2**70), r"num_slices must be an integer in \[1, 1,048,576\]"),
        (lambda: VISRegLoss(slice_mode="shard"), "slice_mode must be one of .* got 'shard'"),
        (lambda: VISRegLoss(sort_backend="cuda"), "sort_backend must be one of .* got 'cuda'"),
        (lambda: VISRegLoss(projection_dtype=torch.int8), "projection_dtype .* got torch.int8"),
        (lambda: SIGRegLoss(num_knots=1), r"num_knots must be an integer in \[2, 4096\], got 1"),
        (lambda: SIGRegLoss(num_knots=10**8), r"num_knots must be an integer in \[2, 4096\], got 100000000"),
        (lambda: SIGRegLoss(t_max=0), "t_max must be a finite positive number, got 0"),
        (lambda: VICRegLoss(variance_weight=-2.0), "variance_weight must be >= 0, got -2.0"),
        (lambda: BarlowTwinsLoss(off_diagonal_weight=math.inf), "off_diagonal_weight must be a finite"),
        # yes/no options: the string 'false' is truthy, and bool() turned the option on (probe)
        (lambda: VISRegLoss(detach_target="false"), "detach_target must be True or False, got 'false'"),
        (lambda: SWDLoss(detach_target=0), "detach_target must be True or False, got 0"),
        (lambda: SWDLoss(auto_step="false"), "auto_step must be True or False, got 'false'"),
        (lambda: SIGRegLoss(sync="maybe"), "sync must be True or False, got 'maybe'"),
        (lambda: SIGRegLoss(detach_target=None), "detach_target must be True or False, got None"),
        (lambda: VICRegLoss(gather="no"), "gather must be True or False, got 'no'"),
        (lambda: BarlowTwinsLoss(gather="false"), "gather must be True or False, got 'false'"),
    ],
)
def test_invalid_settings_raise_value_error_naming_the_value(factory, message):
    with pytest.raises(ValueError, match=message):
        factory()


def test_invalid_inputs_raise_value_error_naming_the_shape():
    loss_fn = VISRegLoss(num_slices=4)
    with pytest.raises(ValueError, match=r"\(V, N, D\) tensor, got \(32, 8\)"):
        loss_fn(torch.randn(32, 8))
    with pytest.raises(ValueError, match=r"local_proj must be .* got \(2, 31, 8\)"):
        loss_fn(torch.randn(2, 32, 8), torch.randn(2, 31, 8))
    with pytest.raises(ValueError, match="step must be"):
        loss_fn.set_step(-1)


@pytest.mark.parametrize("loss_class", [VISRegLoss, VICRegLoss, BarlowTwinsLoss])
def test_empty_embeddings_and_non_tensor_views_are_refused(loss_class):
    """D = 0 gave NaN (VICReg) or 0.0 (Barlow) instead of an error; a list as local_proj a raw error."""
    loss_fn = loss_class(num_slices=4) if loss_class is VISRegLoss else loss_class()
    with pytest.raises(ValueError, match="D >= 1"):
        loss_fn(torch.randn(2, 8, 0))
    with pytest.raises(ValueError, match=r"local_proj must be a .* tensor or None, got list"):
        loss_fn(torch.randn(2, 8, 4), [1, 2])


def test_step_auto_increments_in_training_only_and_set_step_overrides():
    g = views()
    loss_fn = VISRegLoss(num_slices=8, seed=4)
    assert loss_fn.step == 0
    first = loss_fn(g).shape
    assert loss_fn.step == 1
    second = loss_fn(g).shape
    assert first.item() != second.item()  # new directions each training step
    loss_fn.set_step(0)
    assert loss_fn(g).shape.item() == first.item()
    loss_fn.eval()
    step = loss_fn.step
    assert loss_fn(g).shape.item() == loss_fn(g).shape.item()
    assert loss_fn.step == step
    frozen = VISRegLoss(num_slices=8, auto_step=False)
    frozen(g)
    assert frozen.step == 0


def test_state_dict_resumes_directions_exactly():
    g = views()
    loss_fn = VISRegLoss(num_slices=8, seed=123)
    for _ in range(3):
        loss_fn(g)
    state = loss_fn.state_dict()
    assert state["_extra_state"] == {"seed": 123, "step": 3}
    expected = loss_fn(g).total
    resumed = VISRegLoss(num_slices=8, seed=0)
    resumed.load_state_dict(state)
    assert (resumed.seed, resumed.step) == (123, 3)
    assert resumed(g).total.item() == expected.item()
    with pytest.raises(ValueError, match="'seed' and 'step'"):
        resumed.load_state_dict({"_extra_state": {"step": 1}})
    for module in (SWDLoss(8), SIGRegLoss(8)):
        module.set_step(9)
        assert module.state_dict()["_extra_state"]["step"] == 9


def test_local_mode_needs_no_process_group():
    assert not torch.distributed.is_initialized()
    out = VISRegLoss(num_slices=8, slice_mode="local")(views())
    assert torch.isfinite(out.total)
    # with one process every slice mode is the same computation
    g = views()
    totals = {
        mode: VISRegLoss(num_slices=8, slice_mode=mode)(g).total.item()
        for mode in ("partition", "replicate", "local")
    }
    assert len(set(totals.values())) == 1


def test_collapse_visreg_gradient_stays_while_sigreg_vanishes():
    """Paper Fig. 2 as numbers: mean per-sample gradient norm of the regulariser at feature scale r."""
    generator = torch.Generator().manual_seed(0)
    z0 = torch.randn(2, 64, 32, generator=generator, dtype=torch.float64)
    z0 = z0 / z0.norm(dim=-1, keepdim=True)
    w = torch.randn(32, 64, generator=generator, dtype=torch.float64)
    w = w / w.norm(dim=0)

    def grad_norm(loss_of, r):
        z = (z0 * r).requires_grad_()
        loss_of(z).backward()
        return z.grad.reshape(-1, z.shape[-1]).norm(dim=1).mean().item()

    scales = [1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5]
    visreg = [grad_norm(lambda z: visreg_regularizer(z, w).total, r) for r in scales]
    sigreg = [grad_norm(lambda z: sigreg_loss(z, w), r) for r in scales]
    assert min(visreg) >= 0.5 * visreg[0]  # bounded away from zero at every scale
    assert sigreg[-1] <= 1e-4 * sigreg[0]  # vanishes (linearly in r)
    assert visreg[-1] / sigreg[-1] >= 1e6 * visreg[0] / sigreg[0]  # the ratio of the two explodes
    # the scale term's gradient tends to a non-zero constant as sigma -> 0 (the paper's argument)
    scale_small, scale_smaller = (grad_norm(scale_loss, r) for r in (1e-4, 1e-5))
    assert scale_small > 0 and scale_smaller == pytest.approx(scale_small, rel=1e-3)


@pytest.mark.parametrize("loss_class", [VISRegLoss, SWDLoss, SIGRegLoss, VICRegLoss, BarlowTwinsLoss])
def test_non_contiguous_view_layouts_give_identical_results(loss_class):
    """Projectors often emit (N, V, D) and transpose: the losses must not depend on memory layout."""
    g, local = views(2), views(3, seed=5)
    results = []
    for transposed in (False, True):
        if transposed:
            g_in = g.transpose(0, 1).contiguous().requires_grad_()
            l_in = local.transpose(0, 1).contiguous().requires_grad_()
            args = (g_in.transpose(0, 1), l_in.transpose(0, 1))
        else:
            g_in, l_in = g.clone().requires_grad_(), local.clone().requires_grad_()
            args = (g_in, l_in)
        loss_fn = loss_class(8) if loss_class in (VISRegLoss, SWDLoss, SIGRegLoss) else loss_class()
        out = loss_fn(*args)
        out.total.backward()
        grads = (
            [g_in.grad, l_in.grad]
            if not transposed
            else [g_in.grad.transpose(0, 1), l_in.grad.transpose(0, 1)]
        )
        results.append((out.total.detach(), *grads))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_reprs_show_every_setting_that_changes_the_loss():
    """Logs and notebooks print the module: two losses that compute differently must not print alike."""
    from visreg_hub.losses import BarlowTwinsLoss, SIGRegLoss, SWDLoss, VICRegLoss, VISRegLoss

    variants = [VISRegLoss(), VISRegLoss(shape_weight=2.0), VISRegLoss(scale_weight=0.5),
                VISRegLoss(center_weight=0), VISRegLoss(detach_target=True),
                VISRegLoss(projection_dtype=torch.float32),
                SWDLoss(), SWDLoss(detach_target=True), VICRegLoss(), VICRegLoss(covariance_weight=2.0),
                VICRegLoss(gather=False), BarlowTwinsLoss(), BarlowTwinsLoss(off_diagonal_weight=0.01),
                BarlowTwinsLoss(route="gram"), SIGRegLoss(), SIGRegLoss(reg_weight=0.6)]  # fmt: skip
    shown = [repr(loss) for loss in variants]
    assert len(set(shown)) == len(shown), shown
    assert "shape_weight=2.0" in repr(VISRegLoss(shape_weight=2.0))
    assert "route='gram'" in repr(BarlowTwinsLoss(route="gram"))


def _official_vicreg(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """facebookresearch/vicreg's loss at its defaults (25, 25, 1), written out in float64 from its code:
    MSE; centred; std with +1e-4 under the root, hinge averaged per branch and halved; covariance
    off-diagonal squares / D summed over the two branches."""
    n, d = x.shape
    invariance = ((x - y) ** 2).mean()
    x, y = x - x.mean(dim=0), y - y.mean(dim=0)
    std_x, std_y = torch.sqrt(x.var(dim=0) + 1e-4), torch.sqrt(y.var(dim=0) + 1e-4)
    std_loss = torch.relu(1 - std_x).mean() / 2 + torch.relu(1 - std_y).mean() / 2
    cov_loss = 0.0
    for z in (x, y):
        cov = z.T @ z / (n - 1)
        cov_loss = cov_loss + (cov.square().sum() - cov.diagonal().square().sum()) / d
    return 25 * invariance + 25 * std_loss + cov_loss


def test_vicreg_default_is_the_official_objective_at_two_views():
    """A researcher's VICRegLoss() must be the official VICReg: the covariance was averaged over the two
    views (half its official weight), so every VICReg result at defaults was another objective."""
    generator = torch.Generator().manual_seed(0)
    for n, d in ((64, 32), (7, 3)):
        x = torch.randn(n, d, dtype=torch.float64, generator=generator)
        y = x + 0.5 * torch.randn(n, d, dtype=torch.float64, generator=generator)
        out = VICRegLoss()(torch.stack([x, y]))
        assert out.total.item() == pytest.approx(_official_vicreg(x, y).item(), rel=1e-12)
        # with more views the covariance keeps its weight: (2 / V) * sum over views of c(Z_v)
        four = torch.stack([x, y, 0.5 * x, y.flip(0)])
        expected = sum(vicreg_covariance_loss(view) for view in four) * 2 / 4
        assert VICRegLoss()(four).covariance.item() == pytest.approx(expected.item(), rel=1e-12)


def test_an_empty_local_stack_means_no_local_views():
    """``proj[num_global:]`` is (0, N, D) in a recipe without local crops: VISReg, SWD and SIGReg raised
    an IndexError deep in the functional code, where VICReg and Barlow Twins accepted it."""
    from visreg_hub.losses import functional as F

    g = views()
    empty = g[:0]
    w = torch.nn.functional.normalize(torch.randn(8, 9, dtype=torch.float64), dim=0)
    for loss in (VISRegLoss(9), SWDLoss(9), SIGRegLoss(9)):
        assert loss(g, empty, directions=w).total.item() == loss(g, None, directions=w).total.item()
    for loss in (VICRegLoss(), BarlowTwinsLoss()):
        assert loss(g, empty).total.item() == loss(g).total.item()
    with pytest.raises(ValueError, match=r"local_proj must be \(V_local, N, D\)"):
        F.invariance_loss(g, views(2)[:, :5])  # another N: named, not a torch broadcasting error


def test_eps_is_checked_when_the_loss_is_built_and_mixed_dtypes_are_not_rounded_down():
    """eps=inf was accepted until the first forward; a float32 local stack beside a bf16 global one was
    rounded to bf16 before the regulariser."""
    from visreg_hub.losses._numerics import all_views

    for make in (lambda: VICRegLoss(eps=float("inf")), lambda: BarlowTwinsLoss(eps=0.0)):
        with pytest.raises(ValueError, match="eps must be a finite number > 0"):
            make()
    g, local = views().bfloat16(), views(2, seed=4).float()
    stacked = all_views(g, local)
    assert stacked.dtype == torch.float32 and torch.equal(stacked[2:], local)
