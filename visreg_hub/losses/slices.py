"""Slice directions: a step-seeded generator shared by every rank, and how ranks split the slices.

Sliced losses (VISReg's shape term, SWD, SIGReg) project the embeddings on K random unit directions
per training step. Here the directions are a pure function of ``(seed, step, stream)`` and of the device
type they are drawn on, so

* every rank draws the same directions without communicating (``stream=0``);
* a run resumed from a checkpoint that stored ``(seed, step)`` draws exactly the directions it would have
  drawn without the interruption;
* ``slice_mode="replicate"`` (the official VISReg repository's behaviour: every GPU its own K directions)
  is reproduced by giving rank ``r`` its own stream ``r``.

Slice modes on M ranks (see :data:`SLICE_MODES`):

``"partition"`` (default)
    Rank r evaluates its contiguous block of the K directions on the whole batch without gathering it:
    the moments are all-reduced and one all-to-all hands it every sample's projections on its block
    (:mod:`visreg_hub.losses.partition`); block sizes differ by at most one when M does not divide K
    (:func:`partition_slices`). M ranks together compute exactly what one process with K directions
    computes on the concatenated batch.
``"replicate"``
    Rank r gathers the whole batch and evaluates K directions of its own (stream r): M*K slices in all,
    the work repeated M times. The reported value is the mean of the M K-slice losses.
``"local"``
    No communication at all: every rank evaluates the K shared directions on its own batch.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

from visreg_hub.errors import UserInputError

# directions per draw: the paper uses 4,096; a bound far above any useful K keeps a typo (an extra digit
# or twenty) from reaching torch.randn as a multi-terabyte request
MAX_SLICES = 1 << 20

SliceMode = Literal["partition", "replicate", "local"]
SLICE_MODES: tuple[str, ...] = ("partition", "replicate", "local")

_MASK64 = (1 << 64) - 1


def _splitmix64(value: int) -> int:
    """One round of SplitMix64: a bijective 64-bit mixer with good avalanche (Steele et al., 2014)."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def derive_seed(seed: int, step: int, stream: int = 0) -> int:
    """A 63-bit generator seed from ``(seed, step, stream)``; nearby inputs give unrelated seeds."""
    mixed = 0
    for part in (seed, step, stream):
        mixed = _splitmix64(mixed ^ (int(part) & _MASK64))
    return mixed >> 1  # torch.Generator.manual_seed accepts any non-negative 63-bit value


def partition_slices(num_slices: int, world_size: int, rank: int) -> tuple[int, int]:
    """The ``[start, stop)`` block of ``num_slices`` directions that ``rank`` evaluates in partition mode.

    The first ``num_slices % world_size`` ranks take one direction more than the others, so the blocks
    tile ``range(num_slices)`` exactly; with fewer slices than ranks some blocks are empty.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise UserInputError(f"rank {rank} is not in a world of size {world_size}")
    base, extra = divmod(num_slices, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class SliceSampler:
    """Random unit directions that depend only on ``(seed, step, stream)`` and the device type.

    Args:
        num_slices: K, the number of directions per draw.
        seed: base seed of the run.

    Example::

        sampler = SliceSampler(num_slices=4096, seed=0)
        W = sampler.directions(dim=256, step=global_step, device=z.device)  # (256, 4096), unit columns
    """

    def __init__(self, num_slices: int, seed: int = 0) -> None:
        valid_int = isinstance(num_slices, int) and not isinstance(num_slices, bool)
        if not valid_int or not 1 <= num_slices <= MAX_SLICES:
            raise UserInputError(f"num_slices must be an integer in [1, {MAX_SLICES:,}], got {num_slices!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise UserInputError(f"seed must be an integer, got {seed!r}")
        self.num_slices = num_slices
        self.seed = seed
        self._generators: dict[str, torch.Generator] = {}

    def __repr__(self) -> str:
        return f"SliceSampler(num_slices={self.num_slices}, seed={self.seed})"

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        generator = self._generators.get(key)
        if generator is None:
            generator = torch.Generator(device=device)
            self._generators[key] = generator
        return generator

    def directions(
        self,
        dim: int,
        step: int,
        *,
        stream: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Draw the ``(dim, num_slices)`` matrix of unit-norm columns for ``step`` (and ``stream``).

        Drawn on ``device`` (CPU by default) in float32 from a generator seeded with
        :func:`derive_seed`, normalised, then cast to ``dtype``. Two calls with the same arguments return
        identical tensors; CPU and CUDA draws differ from each other. (Under ``torch.compile`` the
        generator call is a graph break, by design: directions are data, not traced computation.)
        """
        if dim < 1:
            raise UserInputError(f"dim must be positive, got {dim}")
        device = torch.device("cpu") if device is None else torch.device(device)
        generator = self._generator(device)
        generator.manual_seed(derive_seed(self.seed, step, stream))
        raw = torch.randn(dim, self.num_slices, generator=generator, device=device, dtype=torch.float32)
        return (raw / raw.norm(dim=0, keepdim=True)).to(dtype)


class SlicePlan(NamedTuple):
    """How this rank evaluates a sliced term in one step.

    Attributes:
        mode: ``"single"`` (one process, or ``slice_mode="local"``: this rank's own batch, no
            communication), ``"partition"`` (all ranks' samples on this rank's block of ``directions``,
            exchanged with an all-to-all) or ``"replicate"`` (the gathered batch on this rank's own
            ``directions``).
        directions: ``(D, K)``: all K shared directions in ``partition`` mode, this rank's own otherwise.
        world_size: ranks taking part.
        rank: this rank.
    """

    mode: str
    directions: torch.Tensor
    world_size: int
    rank: int

    @property
    def communicates(self) -> bool:
        return self.mode != "single"


def plan_slices(
    sampler: SliceSampler,
    slice_mode: str,
    dim: int,
    step: int,
    device: torch.device,
    world: tuple[int, int],
    directions: torch.Tensor | None = None,
) -> SlicePlan:
    """The :class:`SlicePlan` of one step: which directions this rank uses and how it evaluates them.

    Args:
        sampler: the run's direction generator.
        slice_mode: one of :data:`SLICE_MODES`.
        dim: D, the embedding dimension.
        step: the step whose directions are drawn.
        device: where to draw them.
        world: ``(world_size, rank)``.
        directions: explicit ``(D, K)`` directions; they replace the sampler's draw (in ``partition`` mode
            the ranks split their columns, otherwise every rank uses all of them).
    """
    world_size, rank = world
    if slice_mode == "local" or world_size == 1:
        mode, stream = "single", 0
    elif slice_mode == "partition":
        mode, stream = "partition", 0
    else:  # replicate: every rank K directions of its own stream
        mode, stream = "replicate", rank
    if directions is None:
        directions = sampler.directions(dim, step, stream=stream, device=device)
    return SlicePlan(mode, directions, world_size, rank)
