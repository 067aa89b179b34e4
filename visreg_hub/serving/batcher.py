"""Dynamic batching: concurrent requests share model forward passes, off the event loop.

Requests hand :meth:`DynamicBatcher.submit` a (n, C, H, W) uint8 tensor of preprocessed images and await
a future. One worker thread per model collects queued images into batches of at most ``max_batch_size``:
it waits up to ``max_wait_ms`` after the first queued image for others to join, then runs the model once
for the batch and resolves each request's future from the event loop's thread. A request larger than
the batch size is split across batches; a batch can hold parts of several requests, and concurrent
requests share each batch in equal parts, so a small request never waits behind all of a large one.

Back-pressure: at most ``max_queue`` images wait per model. A request that would exceed it is refused
at once with :class:`QueueFullError` (HTTP 429 with ``Retry-After``), so memory stays bounded however
many clients push. A request cancelled while queued (client gone, timeout) is dropped before it costs
a forward pass.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from visreg_hub.errors import VisregHubError

logger = logging.getLogger(__name__)


class QueueFullError(VisregHubError, RuntimeError):
    """The batcher's queue is full; ``retry_after`` is a whole number of seconds to wait."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BatcherClosedError(VisregHubError, RuntimeError):
    """The batcher was closed (the server is shutting down)."""


@dataclass(eq=False)
class _Job:
    pixels: torch.Tensor  # (n, C, H, W) uint8
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    arrival: float
    taken: int = 0  # images handed to batches so far
    done: int = 0  # images whose outputs came back
    parts: list[tuple[int, np.ndarray]] = field(default_factory=list)
    cancelled: bool = False

    @property
    def size(self) -> int:
        return int(self.pixels.shape[0])


def _resolve(future: asyncio.Future, value=None, error: BaseException | None = None) -> None:
    if future.done():  # cancelled by the awaiting request meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


class DynamicBatcher:
    """Coalesce concurrent embedding requests into model batches (one worker thread).

    Args:
        forward: (B, C, H, W) uint8 -> (B, E) float32 numpy embeddings; runs in the worker thread.
        max_batch_size: images per forward pass.
        max_wait_ms: how long the first queued image waits for more to arrive.
        max_queue: images allowed to wait; beyond it :meth:`submit` raises :class:`QueueFullError`.
        name: for the thread name and logs.
        on_batch: called with the batch size and seconds after each forward pass (for metrics).
        on_queue: called with the number of waiting images whenever it changes (for metrics).
    """

    def __init__(
        self,
        forward: Callable[[torch.Tensor], np.ndarray],
        *,
        max_batch_size: int,
        max_wait_ms: float,
        max_queue: int,
        name: str = "model",
        on_batch: Callable[[int, float], None] | None = None,
        on_queue: Callable[[int], None] | None = None,
    ) -> None:
        self.forward = forward
        self.max_batch_size = int(max_batch_size)
        self.max_wait_s = float(max_wait_ms) / 1000.0
        self.max_queue = int(max_queue)
        self.name = name
        self._on_batch = on_batch or (lambda size, seconds: None)
        self._on_queue = on_queue or (lambda depth: None)
        self._cond = threading.Condition()
        self._jobs: deque[_Job] = deque()
        self._queued = 0  # images in _jobs not yet taken into a batch
        self._closed = False
        self._seconds_per_image = 0.0  # running estimate, for Retry-After
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        """Images waiting for a batch."""
        return self._queued

    def retry_after(self) -> int:
        """Seconds until the current queue is likely drained (at least 1)."""
        return max(1, math.ceil(self._queued * self._seconds_per_image))

    async def submit(self, pixels: torch.Tensor) -> np.ndarray:
        """Embed (n, C, H, W) uint8 pixels; returns (n, E) float32 in the same order.

        Raises:
            QueueFullError: ``n`` more images would exceed ``max_queue``.
            BatcherClosedError: the batcher is closed.
        """
        n = int(pixels.shape[0])
        loop = asyncio.get_running_loop()
        job = _Job(pixels, loop.create_future(), loop, time.monotonic())
        with self._cond:
            if self._closed:
                raise BatcherClosedError("the server is shutting down; retry on another replica")
            if self._queued + n > self.max_queue:
                raise QueueFullError(
                    f"the {self.name!r} queue is full ({self._queued} images waiting, limit max_queue="
                    f"{self.max_queue}); retry after the Retry-After seconds",
                    self.retry_after(),
                )
            self._jobs.append(job)
            self._queued += n
            self._on_queue(self._queued)
            self._cond.notify()
        try:
            return await job.future
        except asyncio.CancelledError:
            with self._cond:  # the images not yet taken leave the queue now, not when the worker next looks:
                job.cancelled = True  # the request's admission is released at once, so the room must be too
                self._queued -= job.size - job.taken
                job.taken = job.size
                self._on_queue(self._queued)
            raise

    def close(self, timeout: float | None = 30.0) -> None:
        """Finish the queued work, then stop the worker thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    # ------------------------------------------------------------------ worker thread
    def _take_batch(self) -> list[tuple[_Job, int, int]] | None:
        """Wait for work, then pop up to max_batch_size images: [(job, start, stop)]; None when closed."""
        with self._cond:
            while not self._jobs and not self._closed:
                self._cond.wait()
            if not self._jobs:
                return None
            deadline = self._jobs[0].arrival + self.max_wait_s
            while self._queued < self.max_batch_size and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            for job in self._jobs:
                if job.cancelled:  # dropped below with the jobs fully taken
                    self._queued -= job.size - job.taken
                    job.taken = job.size
            parts = self._fair_shares()
            self._on_queue(self._queued)
            return parts

    def _fair_shares(self) -> list[tuple[_Job, int, int]]:
        """Fill one batch from the queued jobs in equal shares (caller holds the lock).

        Why not first come, first served: a request of thousands of images would hold every batch until
        it is done while a one-image request behind it waits, for seconds or until its timeout. Each pass
        gives every job with images left an equal share of the room left (at least one image). When more
        jobs wait than a batch has room, the least served go first (fewest images taken, then arrival): a
        new request waits only for those served no more than it, never for all of the large ones.
        """
        parts: dict[int, list] = {}  # id(job) -> [job, start, stop]
        count = 0
        while count < self.max_batch_size:
            # sorted() is stable: equal counts keep their arrival order
            waiting = sorted((job for job in self._jobs if job.taken < job.size), key=lambda job: job.taken)
            if not waiting:
                break
            share = max(1, (self.max_batch_size - count) // len(waiting))
            for job in waiting:
                take = min(job.size - job.taken, share, self.max_batch_size - count)
                if take == 0:
                    break
                part = parts.setdefault(id(job), [job, job.taken, job.taken])
                part[2] += take
                job.taken += take
                count += take
                self._queued -= take
        self._jobs = deque(job for job in self._jobs if job.taken < job.size)
        return [(job, start, stop) for job, start, stop in parts.values()]

    def _loop(self) -> None:
        while True:
            parts = self._take_batch()
            if parts is None:
                return
            if not parts:
                continue
            pixels = [job.pixels[start:stop] for job, start, stop in parts]
            batch = pixels[0] if len(pixels) == 1 else torch.cat(pixels)
            started = time.perf_counter()
            try:
                outputs = self.forward(batch)
            except Exception as exc:  # why: one failing batch must fail its requests, not the thread
                logger.exception("forward pass of %d images failed", batch.shape[0])
                for job, _, _ in parts:
                    job.cancelled = True  # its images still queued would cost passes nobody awaits
                    job.loop.call_soon_threadsafe(_resolve, job.future, None, exc)
                continue
            seconds = time.perf_counter() - started
            size = int(batch.shape[0])
            self._seconds_per_image = 0.8 * self._seconds_per_image + 0.2 * seconds / size
            self._on_batch(size, seconds)
            offset = 0
            for job, start, stop in parts:
                job.parts.append((start, outputs[offset : offset + stop - start]))
                offset += stop - start
                job.done += stop - start
                if job.done == job.size:
                    job.parts.sort(key=lambda part: part[0])
                    result = (
                        np.concatenate([out for _, out in job.parts])
                        if len(job.parts) > 1
                        else (job.parts[0][1])
                    )
                    job.loop.call_soon_threadsafe(_resolve, job.future, result)
