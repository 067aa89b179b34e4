"""The paper's Fig. 2 on this project's losses: does a regulariser still push when the features collapse?

    python training/experiments/collapse_figure.py                    # writes docs/collapse_gradients.png

Features ``z = r * z0`` with ``z0`` a fixed standard-normal batch of shape (V, N, D) = (2, 256, 64) in
float64, for r from 1e-5 to 10. For each regulariser (no invariance term, unit weights unless named) the
gradient with respect to ``z`` is taken and the mean over the V * N samples of its per-sample L2 norm is
plotted against r on log-log axes:

* VISReg (scale + shape + center), its scale term and its shape term alone;
* SIGReg (LeJEPA's Epps-Pulley statistic, 17 knots on [0, 3]);
* SWD (the shape term without centring or standardising);
* VICReg's regulariser (25 * variance hinge + 1 * covariance, its paper's weights, eps 1e-4).

Sliced losses share the same K = 512 unit directions. The numbers are also printed as a markdown table.

A second panel shows what of that gradient acts along the collapse path itself: ``-dL/dr`` per sample,
``-(1 / (V N)) sum <dL/dz, z0>``, positive when a gradient step enlarges the features. A term that is
whose value is invariant to the feature scale can still have a component along r when part of its
graph is cut by a stop-gradient (the shape term divides by ``stopgrad(sigma)``). Symlog axis, linear
within +-1e-5.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
import torch

from visreg_hub.losses import functional as F
from visreg_hub.losses.sigreg import sigreg_loss

SCALES = np.logspace(-5, 1, 25)


def regularizers(directions: torch.Tensor) -> dict:
    """Name -> function of z ``(V, N, D)`` returning the scalar regulariser."""
    return {
        "VISReg (scale + shape + center)": lambda z: F.visreg_regularizer(z, directions).total,
        "VISReg scale term": F.scale_loss,
        "VISReg shape term": lambda z: F.shape_loss(z, directions),
        "SIGReg": lambda z: sigreg_loss(z, directions),
        "SWD": lambda z: F.sliced_wasserstein_loss(z, directions),
        "VICReg (25 variance + 1 covariance)": lambda z: (
            25.0 * F.vicreg_variance_loss(z) + F.vicreg_covariance_loss(z)
        ),
    }


def sample_gradient(loss_of, z0: torch.Tensor, r: float) -> tuple[float, float]:
    """At ``z = r * z0``: (mean over samples (v, n) of ``||dL/dz_{v,n}||``, ``-dL/dr`` per sample)."""
    z = (z0 * r).requires_grad_()
    loss_of(z).backward()
    samples = z.shape[0] * z.shape[1]
    norm = z.grad.reshape(-1, z.shape[-1]).norm(dim=1).mean().item()
    return norm, -(z.grad * z0).sum().item() / samples


def gradient_curves(scales=SCALES, views=2, samples=256, dim=64, num_slices=512, seed=0) -> tuple[dict, dict]:
    """({name: mean per-sample gradient norm per scale}, {name: -dL/dr per sample per scale})."""
    generator = torch.Generator().manual_seed(seed)
    z0 = torch.randn(views, samples, dim, generator=generator, dtype=torch.float64)
    directions = torch.randn(dim, num_slices, generator=generator, dtype=torch.float64)
    directions = directions / directions.norm(dim=0)
    norms, radial = {}, {}
    for name, loss_of in regularizers(directions).items():
        norms[name], radial[name] = map(list, zip(*(sample_gradient(loss_of, z0, float(r)) for r in scales)))
    return norms, radial


def plot(scales, norms: dict, radial: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"VISReg scale term": ":", "VISReg shape term": "--"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8), dpi=150)
    for name in norms:
        style = dict(marker="o", markersize=3, label=name)
        left.loglog(scales, norms[name], styles.get(name, "-"), **style)
        right.plot(scales, radial[name], styles.get(name, "-"), **style)
    right.set_xscale("log")
    right.set_yscale("symlog", linthresh=1e-5)  # signed: the sign says which way a step moves r
    right.axhline(0.0, color="black", linewidth=0.8)
    right.text(
        0.02,
        0.97,
        "> 0: a descent step enlarges the features",
        transform=right.transAxes,
        va="top",
        fontsize=8,
    )
    right.text(0.02, 0.03, "< 0: a descent step shrinks them", transform=right.transAxes, fontsize=8)
    left.set_ylabel("mean per-sample gradient norm  ||dL/dz_i||")
    left.set_title("Gradient norm (the paper's Fig. 2)", fontsize=10)
    right.set_ylabel("-dL/dr per sample (symlog)")
    right.set_title("Signed push along the collapse path z = r z0", fontsize=10)
    for ax in (left, right):
        ax.set_xlabel("feature scale r   (z = r · z0,  z0 ~ N(0, I),  N = 256,  D = 64)")
        ax.grid(True, which="major", alpha=0.3)
    left.legend(fontsize=7)
    fig.suptitle("Regulariser gradients as the features shrink to a point (r → 0)", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def markdown(scales, norms: dict, show=(1e-5, 1e-3, 1e-1, 1.0, 10.0)) -> str:
    columns = [int(np.argmin(np.abs(np.log10(scales) - np.log10(r)))) for r in show]
    lines = ["| regulariser | " + " | ".join(f"r = {scales[c]:g}" for c in columns) + " |"]
    lines.append("|---|" + "---:|" * len(columns))
    for name, values in norms.items():
        lines.append(f"| {name} | " + " | ".join(f"{values[c]:.3g}" for c in columns) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/collapse_gradients.png"))
    args = parser.parse_args(argv)
    norms, radial = gradient_curves()
    plot(SCALES, norms, radial, args.out)
    print("mean per-sample gradient norm\n\n" + markdown(SCALES, norms))
    print("-dL/dr per sample (positive: a descent step enlarges the features)\n\n" + markdown(SCALES, radial))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
