"""Distributed behaviour of the losses with real gloo process groups (2 and 4 ranks, one launch each).

What is proven (see tests/losses/_dist_workers.py for the computations; ranks hold unequal batches):

* ``gather_batch``: values are the concatenation in rank order; the gradient on each rank is the sum
  over ranks of the upstream gradients of its block, also when they arrive non-contiguous (gloo pitfall).
* ``partition`` (VISReg, SWD; also explicit directions and K < M): every reported term equals one process
  with the same K directions on the concatenated batch, and each rank's input gradient equals
  ``world_size`` x that process's gradient for the rank's block (the DDP convention: averaging parameter
  gradients over ranks then gives the single-process gradient).
* ``replicate``: every term equals the mean over ranks s of the K-slice loss with rank s's own
  directions (stream s), all on the gathered batch; gradients as above for that mean.
* ``local``: runs with every collective patched to raise, and equals one process on the rank's own batch.
* SIGReg with ``sync``: equals the statistic of the concatenated batch (all-reduced characteristic
  function, no gather); VICReg and Barlow Twins with ``gather``: equal the concatenated-batch losses.

Tolerance: 1e-10 absolute on float64 values and gradients of order one (only summation order differs).
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

from tests.losses import _dist_workers

TOLERANCE = 1e-10

# Fresh processes either way. A fork server imports torch and the worker module once and then forks
# every rank from that clean process, which saves a torch import per rank (seconds on busy CI
# machines); plain spawn where a fork server does not exist (Windows).
if "forkserver" in mp.get_all_start_methods():
    START_METHOD = "forkserver"
    mp.set_forkserver_preload(["tests.losses._dist_workers"])
else:  # pragma: no cover - platform dependent
    START_METHOD = "spawn"

pytestmark = pytest.mark.distributed


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("world_size", [2, 4])
def test_distributed_losses_match_single_process(world_size, tmp_path):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    mp.start_processes(
        _dist_workers.run,
        args=(world_size, _free_port(), str(tmp_path)),
        nprocs=world_size,
        join=True,
        start_method=START_METHOD,
    )
    for rank in range(world_size):
        results = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        expected_groups = {
            "gather",
            "partition",
            "partition_explicit",
            "partition_few_slices",
            "regularizer",
            "replicate",
            "swd",
            "sigreg",
            "sigreg_functional",
            "vicreg",
            "barlow",
            "local",
        }
        assert expected_groups <= {key.split("/")[0] for key in results}
        assert results.pop("replicate/own_directions_differ_from_rank0") == 1.0
        failures = {key: value for key, value in results.items() if not value <= TOLERANCE}
        assert not failures, f"rank {rank} of {world_size}: {failures}"
