"""Loss modules with one calling convention: ``loss_fn(global_proj, local_proj=None) -> NamedTuple``.

``global_proj`` is ``(Vg, N, D)`` (Vg global views of the same N images, projector dim D) and
``local_proj`` an optional ``(Vl, N, D)`` for local crops. Every module returns a NamedTuple whose first
field ``total`` is the loss to back-propagate and whose other fields are the unweighted terms, for logging.

Defaults and their sources:

* :class:`VISRegLoss`: ``reg_weight=0.9`` (lambda of the official repository's ViT-B/16 ImageNet-1K
  config; it uses 0.8 for ViT-L/14 and 0.6 for small data), ``num_slices=4096``, term weights 1, 1, 1.
* :class:`SIGRegLoss`: ``reg_weight=0.05`` (LeJEPA's recommended lambda), ``num_slices=4096``
  (the VISReg repository's SIGReg config), 17 knots on ``[0, 3]``.
* :class:`SWDLoss`: ``reg_weight=0.9`` (the VISReg repository uses one lambda for all its regularisers).
* :class:`VICRegLoss`: invariance 25, variance 25, covariance 1, gamma 1 (VICReg paper), the variance
  averaged and the covariance summed over two views as the official code does (its class docstring says
  how more views count).
* :class:`BarlowTwinsLoss`: off-diagonal weight 0.0051 (Barlow Twins paper).

Views. The regularisers of VISReg, SWD and SIGReg see *all* views (global and local stacked, as the
official code does): every view counts once in their means. VICReg's invariance and Barlow Twins'
cross-correlation average over :func:`~visreg_hub.losses.functional.view_pairs` (global-global and
global-local pairs).

Slices and steps. Directions come from a :class:`~visreg_hub.losses.SliceSampler` seeded by
``(seed, step)``. ``step`` is the step the next call uses; each call in training mode then advances it by
one (``auto_step=True``), and :meth:`set_step` overrides it, so calling ``loss_fn.set_step(global_step)``
before every call, or never, both work. ``(seed, step)`` is saved in ``state_dict()`` (extra state), so
resuming is exact. An explicit ``directions=`` ``(D, K)`` overrides the sampler (in ``partition`` mode the
ranks split its columns; in ``replicate`` and ``local`` modes every rank uses all of them).

Distributed (slice_mode, see :mod:`visreg_hub.losses.slices`). ``partition`` never gathers the
embeddings: the batch moments come from every rank's shard sums all-reduced, and one all-to-all hands each
rank all samples on its K/M slices (:mod:`visreg_hub.losses.partition`), so per-rank work and traffic
shrink with M. ``replicate`` gathers the batch (every rank needs all of it for its own K directions). In
``partition`` mode every reported term equals the single-process value on the concatenated batch (the
per-rank partial values are summed with one small all-reduce; the invariance is averaged over ranks
too). In ``replicate`` mode each rank draws its own K directions, so the terms equal one process using
the M x K stacked directions (not the single-process value with K); with explicit ``directions=`` both
modes equal the single process. In both, the gradient on each rank's inputs is ``world_size`` times that
process's gradient, which DDP's gradient averaging turns into its parameter gradient exactly. ``local``
mode communicates nothing.

Mixed precision. Batch statistics, residuals and every reduction run in float32; the slice projections run
in the autocast dtype (bf16) and are sorted as such, which equals sorting their float32 upcast; pass
``projection_dtype=torch.float32`` to project in float32 instead. See
:mod:`visreg_hub.losses.sort_shape`.
"""

# One file per loss family; this module keeps the overview above and the import path
# ``visreg_hub.losses.modules`` (used before the split).
from .lejepa import SIGRegLoss, SIGRegOutput
from .pairwise import BarlowTwinsLoss, BarlowTwinsOutput, VICRegLoss, VICRegOutput
from .swd import SWDLoss, SWDOutput
from .visreg import VISRegLoss, VISRegOutput

__all__ = [
    "BarlowTwinsLoss",
    "BarlowTwinsOutput",
    "SIGRegLoss",
    "SIGRegOutput",
    "SWDLoss",
    "SWDOutput",
    "VICRegLoss",
    "VICRegOutput",
    "VISRegLoss",
    "VISRegOutput",
]
