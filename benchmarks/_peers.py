"""Loss implementations under comparison, behind one calling convention.

Every implementation is wrapped as ``fn(global_proj, local_proj) -> scalar Tensor`` computing the *total*
objective ``(1 - reg_weight) * invariance + reg_weight * regulariser`` on ``(V_g, N, D)`` and ``(V_l, N, D)``
projections, so that every row of the benchmark does the same work:

* ``ours``: :mod:`visreg_hub.losses` (``VISRegLoss``, ``SIGRegLoss``, ``SWDLoss``, ``VICRegLoss``).
* ``official``: the loss modules of the official repository (github.com/HaiyuWu/visreg, CC BY-NC 4.0),
  loaded at run time from a local checkout and never copied into this repository.  The official loss
  modules compute the regulariser only; the invariance term and the convex combination live in the
  official ``train.py`` (``inv = (proj - proj[:n_global].mean(0)).square().mean()``,
  ``loss = lamb * reg + (1 - lamb) * inv``), which :func:`official_losses` re-states here.
* ``lightly``: ``lightly.loss.VISRegLoss`` and the LeJEPA ``SIGReg`` (``lightly.loss.LeJEPALoss``) from PyPI.

Peers that are not installed are reported with a reason instead of raising, so the benchmark degrades
gracefully.

Random directions: the official and lightly losses draw their slice directions with
``torch.randn(D, K, device=z.device, dtype=z.dtype)`` from the global generator on every call and normalise
the columns.  Seeding the global generator right before the call and drawing the same ``randn`` ourselves
therefore reproduces *their* directions exactly; :func:`peer_directions` does that so the parity check can
hand the very same directions to ours through ``directions=``.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

#: ``fn(global_proj, local_proj) -> total loss``.
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: ``factory(num_slices, reg_weight) -> LossFn``.
LossFactory = Callable[[int, float], LossFn]

#: Losses the benchmark knows, in table order.
LOSS_NAMES = ("visreg", "sigreg", "swd", "vicreg", "barlow")
#: Losses whose regulariser uses random directions.
SLICED_LOSSES = ("visreg", "sigreg", "swd")

_OFFICIAL_CLASSES = {  # loss -> (file in visreg/losses/, class)
    "visreg": ("visreg", "VISReg"),
    "sigreg": ("sigreg", "SIGReg"),
    "swd": ("swd", "SlicedWasserstein"),
    "vicreg": ("vicreg", "VICReg"),
    "barlow": ("barlow", "BarlowTwins"),
}
_OUR_CLASSES = {
    "visreg": "VISRegLoss",
    "sigreg": "SIGRegLoss",
    "swd": "SWDLoss",
    "vicreg": "VICRegLoss",
    "barlow": "BarlowTwinsLoss",
}


@dataclass
class Peer:
    """One implementation family: its loss factories, or the reason it is unavailable.

    Attributes:
        name: ``ours``, ``official`` or ``lightly``.
        version: Version or commit recorded with the results.
        factories: Loss name -> factory of the total loss.
        missing_reason: Why the peer is unavailable; ``None`` when available.
    """

    name: str
    version: str = "n/a"
    factories: dict[str, LossFactory] = field(default_factory=dict)
    missing_reason: str | None = None


def invariance(global_proj: torch.Tensor, local_proj: torch.Tensor) -> torch.Tensor:
    """LeJEPA invariance as the official ``train.py`` computes it: every view to the global-view mean.

    Args:
        global_proj: (V_g, N, D) global-view projections.
        local_proj: (V_l, N, D) local-view projections.

    Returns:
        Scalar mean over (views, N, D) of the squared distance to the (not detached) global mean.
    """
    proj = torch.cat([global_proj, local_proj], dim=0)
    return (proj - global_proj.mean(0, keepdim=True)).square().mean()


# ----------------------------------------------------------------------------------------------- official
def _import_file(module_name: str, path: Path) -> ModuleType:
    """Import one source file as a module, skipping its package ``__init__`` (which pulls timm, kornia...)."""
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def _official_commit(repo: Path) -> str:
    """Commit of the official checkout: ``git rev-parse`` for a clone, else a ``COMMIT`` file written next to
    a ``git archive`` extraction (see benchmarks/README.md), else ``unknown``."""
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        )
        if out.stdout.strip() and (repo / ".git").exists():
            return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    commit_file = repo / "COMMIT"
    return commit_file.read_text().strip() if commit_file.is_file() else "unknown"


def official_losses(repo: Path) -> Peer:
    """Load the official loss modules from a checkout of github.com/HaiyuWu/visreg.

    The official losses never call ``torch.distributed`` (its all-gather sits in ``train.py``), so no process
    group is needed.

    Args:
        repo: Root of the checkout (the folder holding ``visreg/losses/visreg.py``).

    Returns:
        A :class:`Peer`, unavailable with a reason when the checkout is absent or does not import.
    """
    peer = Peer("official")
    loss_dir = repo / "visreg" / "losses"
    if not (loss_dir / "visreg.py").is_file():
        peer.missing_reason = f"not found at {repo} (git clone https://github.com/HaiyuWu/visreg {repo})"
        return peer
    peer.version = _official_commit(repo)
    try:
        modules = {
            name: _import_file(f"_official_visreg_{file}", loss_dir / f"{file}.py")
            for name, (file, _) in _OFFICIAL_CLASSES.items()
        }
    except Exception as exc:  # third-party import failures become a table row, not a crash
        peer.missing_reason = f"import failed: {exc!r}"
        return peer

    def make_factory(name: str) -> LossFactory:
        cls = getattr(modules[name], _OFFICIAL_CLASSES[name][1])

        def factory(num_slices: int, reg_weight: float) -> LossFn:
            regulariser = cls() if name in ("vicreg", "barlow") else cls(num_projections=num_slices)

            def loss(global_proj: torch.Tensor, local_proj: torch.Tensor) -> torch.Tensor:
                # As in the official train.py: regulariser over all views (globals first).
                reg = regulariser.to(global_proj.device)(torch.cat([global_proj, local_proj], dim=0))
                return reg_weight * reg + (1.0 - reg_weight) * invariance(global_proj, local_proj)

            return loss

        return factory

    peer.factories = {name: make_factory(name) for name in _OFFICIAL_CLASSES}
    return peer


# ------------------------------------------------------------------------------------------------ lightly
def lightly_losses() -> Peer:
    """lightly's ``VISRegLoss`` and LeJEPA ``SIGReg`` (via ``LeJEPALoss``), when lightly is installed."""
    peer = Peer("lightly")
    try:
        import lightly
        from lightly.loss import LeJEPALoss, VISRegLoss
    except Exception as exc:  # ImportError, or a missing transitive dependency
        peer.missing_reason = f"not installed ({exc.__class__.__name__}); pip install lightly"
        return peer
    peer.version = getattr(lightly, "__version__", "unknown")

    def visreg(num_slices: int, reg_weight: float) -> LossFn:
        module = VISRegLoss(lambda_param=reg_weight, num_slices=num_slices)
        return lambda g, loc: module(global_proj=g, local_proj=loc)

    def sigreg(num_slices: int, reg_weight: float) -> LossFn:
        module = LeJEPALoss(lambda_param=reg_weight, sigreg_num_vectors=num_slices)
        return lambda g, loc: module.to(g.device)(global_proj=g, local_proj=loc)

    peer.factories = {"visreg": visreg, "sigreg": sigreg}
    return peer


# ---------------------------------------------------------------------------------------------------- ours
def our_module(loss: str, num_slices: int, reg_weight: float) -> torch.nn.Module:
    """One of our loss modules configured like the official run (K slices, lambda = reg_weight)."""
    from visreg_hub import losses

    cls = getattr(losses, _OUR_CLASSES[loss])
    if loss in SLICED_LOSSES:
        return cls(num_slices=num_slices, reg_weight=reg_weight)
    # VICReg, Barlow Twins: the papers' objectives (VICReg 25 / 25 / 1, Barlow 0.0051), no lambda mixing
    return cls()


def our_losses() -> Peer:
    """``visreg_hub.losses``; each module is called as ``loss_fn(global_proj, local_proj).total``."""
    peer = Peer("ours")
    try:
        import visreg_hub
        from visreg_hub import losses
    except Exception as exc:
        peer.missing_reason = f"visreg_hub.losses does not import ({exc.__class__.__name__}: {exc})"
        return peer
    peer.version = visreg_hub.__version__

    def make_factory(loss: str) -> LossFactory:
        def factory(num_slices: int, reg_weight: float) -> LossFn:
            module = our_module(loss, num_slices, reg_weight)
            return lambda g, loc: module.to(g.device)(g, loc).total

        return factory

    peer.factories = {name: make_factory(name) for name, cls in _OUR_CLASSES.items() if hasattr(losses, cls)}
    if "visreg" not in peer.factories:
        peer.missing_reason = "visreg_hub.losses has no VISRegLoss"
        peer.factories = {}
    return peer


def our_loss_with_directions(
    module: torch.nn.Module, global_proj: torch.Tensor, local_proj: torch.Tensor, directions: torch.Tensor
) -> torch.Tensor:
    """Our total loss evaluated on explicit (D, K) ``directions`` (for the parity check)."""
    return module(global_proj, local_proj, directions=directions).total


# ------------------------------------------------------------------------------------------ shared slices
def peer_directions(
    seed: int, dim: int, num_slices: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """The (D, K) unit directions the official/lightly losses draw right after ``torch.manual_seed(seed)``.

    They call ``torch.randn(D, K, device=z.device, dtype=z.dtype)`` once per forward and normalise columns:
    the official VISReg with ``F.normalize`` (norm clamped at 1e-12), official SIGReg by ``norm + 1e-12``,
    official SWD by ``norm + 1e-6``, lightly by the plain norm; identical up to those epsilons.
    """
    torch.manual_seed(seed)
    return F.normalize(torch.randn(dim, num_slices, device=device, dtype=dtype), dim=0)
