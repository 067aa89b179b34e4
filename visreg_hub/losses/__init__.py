"""VISReg loss family: pure terms (:mod:`.functional`) and modules returning every term.

Modules share one calling convention, ``loss_fn(global_proj, local_proj=None)`` with ``(V, N, D)``
tensors, and return a NamedTuple whose ``total`` is the loss to back-propagate::

    from visreg_hub.losses import VISRegLoss
    loss_fn = VISRegLoss(num_slices=4096, reg_weight=0.9)
    out = loss_fn(global_proj, local_proj)      # VISRegOutput(total, invariance, regularizer, center, ...)
    out.total.backward()

See :mod:`visreg_hub.losses.modules` for defaults, steps and distributed semantics of every module (one
file per family: :mod:`.visreg`, :mod:`.swd`, :mod:`.lejepa` on the shared :mod:`._sliced` base, and
:mod:`.pairwise` for VICReg and Barlow Twins), :mod:`visreg_hub.losses.slices` for the slice modes and
:mod:`visreg_hub.losses.sort_shape` for the fast sort-based shape term and its mixed-precision choices.
"""

from .distributed import all_reduce_sum, gather_batch, world_info
from .functional import (
    RegularizerOutput,
    barlow_route,
    barlow_twins_terms,
    batch_moments,
    center_loss,
    center_term,
    epps_pulley_grid,
    gaussian_quantiles,
    invariance_loss,
    scale_loss,
    scale_term,
    shape_loss,
    sigreg_loss,
    sliced_wasserstein_loss,
    vicreg_covariance_loss,
    vicreg_invariance_loss,
    vicreg_variance_loss,
    view_pairs,
    visreg_regularizer,
)
from .lejepa import SIGRegLoss, SIGRegOutput
from .pairwise import BarlowTwinsLoss, BarlowTwinsOutput, VICRegLoss, VICRegOutput
from .slices import SLICE_MODES, SlicePlan, SliceSampler, derive_seed, partition_slices
from .swd import SWDLoss, SWDOutput
from .visreg import VISRegLoss, VISRegOutput

__all__ = [
    "SLICE_MODES",
    "BarlowTwinsLoss",
    "BarlowTwinsOutput",
    "RegularizerOutput",
    "SIGRegLoss",
    "SIGRegOutput",
    "SWDLoss",
    "SWDOutput",
    "SlicePlan",
    "SliceSampler",
    "VICRegLoss",
    "VICRegOutput",
    "VISRegLoss",
    "VISRegOutput",
    "all_reduce_sum",
    "barlow_route",
    "barlow_twins_terms",
    "batch_moments",
    "center_loss",
    "center_term",
    "derive_seed",
    "epps_pulley_grid",
    "gather_batch",
    "gaussian_quantiles",
    "invariance_loss",
    "partition_slices",
    "scale_loss",
    "scale_term",
    "shape_loss",
    "sigreg_loss",
    "sliced_wasserstein_loss",
    "vicreg_covariance_loss",
    "vicreg_invariance_loss",
    "vicreg_variance_loss",
    "view_pairs",
    "visreg_regularizer",
    "world_info",
]
