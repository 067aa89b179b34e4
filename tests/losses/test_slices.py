"""Slice directions: reproducible per (seed, step, stream), unit norm, and exact partitions."""

from __future__ import annotations

import pytest
import torch

from visreg_hub.losses import SliceSampler, derive_seed, partition_slices


def test_directions_are_reproducible_unit_columns():
    sampler = SliceSampler(num_slices=16, seed=5)
    a = sampler.directions(dim=7, step=3)
    assert a.shape == (7, 16) and a.dtype == torch.float32
    torch.testing.assert_close(a.norm(dim=0), torch.ones(16))
    assert torch.equal(a, SliceSampler(16, seed=5).directions(7, 3))  # a fresh sampler, same draw
    torch.manual_seed(99)  # the global RNG plays no part
    assert torch.equal(a, sampler.directions(7, 3))
    assert not torch.equal(a, sampler.directions(7, 4))
    assert not torch.equal(a, sampler.directions(7, 3, stream=1))
    assert not torch.equal(a, SliceSampler(16, seed=6).directions(7, 3))
    assert sampler.directions(7, 3, dtype=torch.float64).dtype == torch.float64


def test_derived_seeds_are_distinct_and_in_range():
    seeds = {
        derive_seed(seed, step, stream) for seed in range(4) for step in range(50) for stream in range(4)
    }
    assert len(seeds) == 4 * 50 * 4
    assert all(0 <= s < 2**63 for s in seeds)


@pytest.mark.parametrize("num_slices", [1, 3, 7, 8, 4096, 4097])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8])
def test_partition_tiles_the_slices_exactly(num_slices, world_size):
    blocks = [partition_slices(num_slices, world_size, rank) for rank in range(world_size)]
    assert blocks[0][0] == 0 and blocks[-1][1] == num_slices
    assert all(blocks[r][1] == blocks[r + 1][0] for r in range(world_size - 1))
    sizes = [stop - start for start, stop in blocks]
    assert max(sizes) - min(sizes) <= 1


def test_invalid_sampler_arguments():
    with pytest.raises(ValueError, match=r"num_slices must be an integer in \[1, 1,048,576\], got -3"):
        SliceSampler(-3)
    with pytest.raises(ValueError, match="seed must be an integer"):
        SliceSampler(4, seed=1.5)
    with pytest.raises(ValueError, match="rank 2 is not in a world of size 2"):
        partition_slices(4, 2, 2)
