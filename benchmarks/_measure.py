"""Timing, peak memory, operator profiles and the run's environment, on CPU or CUDA.

* Time: forward + backward of ``fn(global_proj, local_proj)``.  CUDA: CUDA events around the step after
  warm-up; CPU: ``time.perf_counter``, or the process's CPU time (:data:`CPU_CLOCK`).  Reported as
  median and min over the repeats.
* Peak memory, reported *including the inputs* (as ``torch.cuda.max_memory_allocated`` does).  CUDA: the
  allocator's peak.  CPU: ``tracemalloc`` cannot see torch's allocations and the resident-set size hides
  them behind glibc's caching, so the peak is reconstructed from the CPU allocator events that
  ``torch.profiler`` records with ``profile_memory=True`` (each allocation and free with its size, in time
  order; a running sum gives the peak of bytes allocated during the step).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.profiler import ProfilerActivity, profile

Step = Callable[[], torch.Tensor]

#: The CPU timer: wall time by default; ``time.process_time`` (CPU seconds of this process) when a shared,
#: oversubscribed machine makes wall time measure the queue for a core (``--clock cpu`` of losses.py).
CPU_CLOCK: Callable[[], float] = time.perf_counter
#: CPU peak memory needs a profiled step (several times slower); ``--skip memory`` turns it off.
PROFILE_CPU_MEMORY = True


@dataclass
class Timing:
    """Forward+backward wall times of one cell, in milliseconds."""

    times_ms: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def min(self) -> float:
        return min(self.times_ms)


def _run_step(step: Step, leaves: tuple[torch.Tensor, ...]) -> None:
    for leaf in leaves:
        leaf.grad = None
    step().backward()


def time_interleaved(
    steps: list[Step], leaves: tuple[torch.Tensor, ...], device: torch.device, warmup: int, repeats: int
) -> list[Timing]:
    """Time ``step().backward()`` for several implementations in interleaved rounds.

    Round r runs every step once, in order, so a change in machine load (a shared CPU) hits all of them
    alike and their ratios stay comparable. ``leaves`` are the inputs whose ``.grad`` is cleared first.
    """
    for _ in range(max(0, warmup)):
        for step in steps:
            _run_step(step, leaves)
    times: list[list[float]] = [[] for _ in steps]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(repeats):
        for index, step in enumerate(steps):
            if device.type == "cuda":
                start.record()
                _run_step(step, leaves)
                end.record()
                torch.cuda.synchronize(device)
                times[index].append(start.elapsed_time(end))
            else:
                t0 = CPU_CLOCK()
                _run_step(step, leaves)
                times[index].append((CPU_CLOCK() - t0) * 1e3)
    return [Timing(t) for t in times]


def time_fwd_bwd(
    step: Step, leaves: tuple[torch.Tensor, ...], device: torch.device, warmup: int, repeats: int
) -> Timing:
    """Time ``step().backward()`` alone (see :func:`time_interleaved`)."""
    return time_interleaved([step], leaves, device, warmup, repeats)[0]


def profiled_step(
    step: Step, leaves: tuple[torch.Tensor, ...], device: torch.device, extra_bytes: int = 0
) -> tuple[float, torch.Tensor, int | None]:
    """One forward+backward with its peak memory.

    Args:
        step: returns the scalar loss.
        leaves: input tensors (their ``.grad`` is cleared first, so gradients count as new allocations).
        device: where the step runs.
        extra_bytes: bytes of other inputs the step reads (e.g. explicit directions), added to the peak.

    Returns:
        ``(loss value, input gradient flattened in float64, peak bytes or None)``; the peak includes the
        inputs and is ``None`` when it cannot be measured.
    """
    for leaf in leaves:
        leaf.grad = None
    input_bytes = sum(leaf.numel() * leaf.element_size() for leaf in leaves) + extra_bytes
    peak: int | None = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        loss = step()
        loss.backward()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before + input_bytes
    elif not PROFILE_CPU_MEMORY:
        loss = step()
        loss.backward()
    else:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            loss = step()
            loss.backward()
        peak = _cpu_peak(prof)
        peak = None if peak is None else peak + input_bytes
    grad = torch.cat([leaf.grad.flatten() for leaf in leaves]).double()
    return loss.item(), grad, peak


def _cpu_peak(prof) -> int | None:
    """Peak of the running sum of CPU allocator events (allocations positive, frees negative)."""
    try:
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except Exception:  # the kineto event API is semi-private: report n/a rather than a wrong number
        return None
    running = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        running += event.nbytes()
        peak = max(peak, running)
    return peak


def top_ops(step: Step, leaves: tuple[torch.Tensor, ...], limit: int = 10) -> list[tuple[str, float, float]]:
    """Profile one forward+backward; return ``(op, self time ms, share of total self time)`` rows."""
    for leaf in leaves:
        leaf.grad = None
    with profile(activities=[ProfilerActivity.CPU, *_cuda_activity(leaves)]) as prof:
        step().backward()
    averages = prof.key_averages()
    on_cuda = leaves[0].device.type == "cuda"

    def self_us(avg) -> float:
        return avg.self_device_time_total if on_cuda else avg.self_cpu_time_total

    total = sum(self_us(a) for a in averages) or 1.0
    rows = sorted(averages, key=self_us, reverse=True)[:limit]
    return [(a.key, self_us(a) / 1e3, self_us(a) / total) for a in rows]


def _cuda_activity(leaves: tuple[torch.Tensor, ...]) -> list[ProfilerActivity]:
    return [ProfilerActivity.CUDA] if leaves[0].device.type == "cuda" else []


def format_bytes(num_bytes: int | None) -> str:
    if num_bytes is None:
        return "n/a"
    if num_bytes >= 2**30:
        return f"{num_bytes / 2**30:.2f} GiB"
    if num_bytes >= 2**20:
        return f"{num_bytes / 2**20:.0f} MiB"
    return f"{num_bytes / 2**10:.0f} KiB"


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (Linux), else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_average() -> str:
    """The 1-minute load average: on a shared machine, how contended the timings are."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except (AttributeError, OSError):
        return "n/a"


def device_description(device: torch.device, threads: str = "torch threads") -> str:
    """Human description of where the numbers were taken; ``threads`` names what uses torch's thread count."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"CPU: {cpu_model()}, {usable} usable cores, {threads} {torch.get_num_threads()}"
