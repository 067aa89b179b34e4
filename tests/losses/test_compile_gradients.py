"""``torch.compile`` (inductor) of every loss gives eager's values and input gradients.

Users compile the whole training step (``train.compile``), losses included, and inductor compiles the
custom autograd Functions' backward too: it once returned Barlow Twins' on-diagonal gradient 13 % off while
the loss value stayed right, which only a gradient comparison catches. Eager is checked against float64
references elsewhere (test_modules.py); here compiled must equal eager.
"""

from __future__ import annotations

import pytest
import torch

from visreg_hub.losses import BarlowTwinsLoss, SIGRegLoss, SWDLoss, VICRegLoss, VISRegLoss

LOSSES = {
    "barlow-pairs": lambda: BarlowTwinsLoss(route="pairs"),
    "barlow-gram": lambda: BarlowTwinsLoss(route="gram"),
    "vicreg": lambda: VICRegLoss(),
    "visreg": lambda: VISRegLoss(num_slices=16, seed=0).eval(),
    "swd": lambda: SWDLoss(num_slices=16, seed=0).eval(),
    "sigreg": lambda: SIGRegLoss(num_slices=16, seed=0).eval(),
}


def _value_and_grad(loss, views: torch.Tensor, local: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    views = views.clone().requires_grad_()
    total = loss(views, local).total
    total.backward()
    return total.detach(), views.grad


# the route that broke runs by default; each other compile adds ~10 s on a CPU, so they run with -m slow
@pytest.mark.parametrize(
    "name", ["barlow-pairs", *(pytest.param(name, marks=pytest.mark.slow) for name in list(LOSSES)[1:])]
)
def test_compiled_loss_matches_eager_value_and_gradient(name):
    pytest.importorskip("torch._inductor")
    torch.manual_seed(0)
    views, local = torch.randn(2, 48, 24), torch.randn(2, 48, 24)  # 2 global + 2 local views, N 48, D 24
    eager_value, eager_grad = _value_and_grad(LOSSES[name](), views, local)
    torch._dynamo.reset()
    compiled_value, compiled_grad = _value_and_grad(torch.compile(LOSSES[name]()), views, local)
    torch.testing.assert_close(compiled_value, eager_value, rtol=1e-5, atol=1e-6)
    relative = float((compiled_grad - eager_grad).norm() / eager_grad.norm())
    assert relative < 1e-5, f"compiled {name} gradient is {relative:.1%} off eager's"
