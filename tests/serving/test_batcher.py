"""DynamicBatcher on its own: outputs in request order, equal shares of each batch for concurrent
requests (a small request is not held behind a large one), cancelled requests cost no forward pass."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import torch

from visreg_hub.serving.batcher import DynamicBatcher


def tagged(tag: int, n: int) -> torch.Tensor:
    """(n, 1, 2, 2) uint8 images whose pixels say which request (``tag``) and which image (0..n-1)."""
    images = torch.zeros(n, 1, 2, 2, dtype=torch.uint8)
    images[:, 0, 0, 0] = tag
    images[:, 0, 0, 1] = torch.arange(n, dtype=torch.uint8)
    return images


class GatedForward:
    """A forward pass that records each batch's (tag, index) pairs; holds the first until released."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int]]] = []
        self.first_started = threading.Event()
        self.release = threading.Event()

    def __call__(self, pixels: torch.Tensor) -> np.ndarray:
        self.batches.append([(int(p[0, 0, 0]), int(p[0, 0, 1])) for p in pixels])
        if len(self.batches) == 1:
            self.first_started.set()
            self.release.wait(30)
        return pixels[:, 0, 0, :2].numpy().astype(np.float32)  # (B, 2): tag, index


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_outputs_come_back_in_order_across_batches():
    forward = GatedForward()
    forward.release.set()
    batcher = DynamicBatcher(forward, max_batch_size=4, max_wait_ms=1.0, max_queue=100)
    try:
        out = run(batcher.submit(tagged(7, 11)))
    finally:
        batcher.close()
    np.testing.assert_array_equal(out, np.stack([np.full(11, 7), np.arange(11)], 1).astype(np.float32))
    assert [len(b) for b in forward.batches] == [4, 4, 3]


def test_a_small_request_shares_the_next_batch_with_a_large_one():
    """First come, first served would give the 1-image request batch 5 of 5; equal shares give it batch 2."""
    forward = GatedForward()
    batcher = DynamicBatcher(forward, max_batch_size=4, max_wait_ms=0.0, max_queue=100)

    async def scenario():
        large = asyncio.ensure_future(batcher.submit(tagged(1, 16)))
        await asyncio.get_running_loop().run_in_executor(None, forward.first_started.wait, 30)
        small = asyncio.ensure_future(batcher.submit(tagged(2, 1)))
        await asyncio.sleep(0.05)  # the small request is queued while batch 1 (4 large images) runs
        forward.release.set()
        return await large, await small

    try:
        large, small = run(scenario())
    finally:
        batcher.close()
    second = forward.batches[1]
    assert (2, 0) in second and len(second) == 4, forward.batches
    assert sorted(i for tag, i in second if tag == 1) == [4, 5, 6]  # the large one keeps the rest, in order
    np.testing.assert_array_equal(large[:, 1], np.arange(16))
    np.testing.assert_array_equal(small, [[2.0, 0.0]])
    assert sum(len(b) for b in forward.batches) == 17


def test_equal_shares_between_two_large_requests_and_cancelled_ones_dropped():
    forward = GatedForward()
    batcher = DynamicBatcher(forward, max_batch_size=6, max_wait_ms=0.0, max_queue=100)

    async def scenario():
        first = asyncio.ensure_future(batcher.submit(tagged(1, 6)))
        await asyncio.get_running_loop().run_in_executor(None, forward.first_started.wait, 30)
        a = asyncio.ensure_future(batcher.submit(tagged(2, 9)))
        b = asyncio.ensure_future(batcher.submit(tagged(3, 9)))
        gone = asyncio.ensure_future(batcher.submit(tagged(4, 9)))
        await asyncio.sleep(0.05)
        gone.cancel()
        await asyncio.sleep(0.05)
        forward.release.set()
        return await first, await a, await b

    try:
        first, a, b = run(scenario())
        assert first.shape == (6, 2)
        assert batcher.queued == 0
    finally:
        batcher.close()
    assert forward.batches[0] == [(1, i) for i in range(6)]
    assert [tag for tag, _ in forward.batches[1]] == [2, 2, 2, 3, 3, 3]
    assert all(tag != 4 for batch in forward.batches for tag, _ in batch)
    for out, tag in ((a, 2), (b, 3)):
        np.testing.assert_array_equal(out, np.stack([np.full(9, tag), np.arange(9)], 1).astype(np.float32))


def test_more_requests_than_batch_room_still_serve_a_new_one_next():
    """Six 40-image requests fill every batch of 4 several times over; a 1-image request sent after them
    goes into one of the next two batches (the fewest images served go first; whether the first batch
    held four requests or one depends on when the worker woke), not after the first four are done."""
    forward = GatedForward()
    batcher = DynamicBatcher(forward, max_batch_size=4, max_wait_ms=0.0, max_queue=1000)

    async def scenario():
        large = [asyncio.ensure_future(batcher.submit(tagged(tag, 40))) for tag in range(1, 7)]
        await asyncio.get_running_loop().run_in_executor(None, forward.first_started.wait, 30)
        await asyncio.sleep(0.05)
        small = asyncio.ensure_future(batcher.submit(tagged(9, 1)))
        await asyncio.sleep(0.05)
        forward.release.set()
        return [await job for job in large], await small

    try:
        large, small = run(scenario())
    finally:
        batcher.close()
    first_with_small = next(n for n, batch in enumerate(forward.batches) if (9, 0) in batch)
    assert first_with_small <= 2, [sorted({tag for tag, _ in b}) for b in forward.batches[:4]]
    np.testing.assert_array_equal(small, [[9.0, 0.0]])
    for tag, out in enumerate(large, 1):  # every large request complete and in order
        np.testing.assert_array_equal(out, np.stack([np.full(40, tag), np.arange(40)], 1).astype(np.float32))
    served = [{tag for tag, _ in batch} for batch in forward.batches[1:8]]
    assert all(len(tags) == 4 for tags in served)  # each batch spread over four requests


def test_a_failed_forward_pass_drops_the_rest_of_its_requests():
    calls = []

    def forward(pixels: torch.Tensor) -> np.ndarray:
        calls.append(int(pixels.shape[0]))
        raise RuntimeError("out of memory")

    batcher = DynamicBatcher(forward, max_batch_size=4, max_wait_ms=0.0, max_queue=100)
    try:
        with pytest.raises(RuntimeError, match="out of memory"):
            run(batcher.submit(tagged(1, 16)))
        time.sleep(0.2)
        assert calls == [4] and batcher.queued == 0  # not 4 passes for a request already failed
    finally:
        batcher.close()
