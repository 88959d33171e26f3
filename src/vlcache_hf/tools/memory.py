"""Peak memory of one block of work, as growth over what was in use when it started (the benchmark's
memory column: a mode should need at most plain `generate`'s peak plus the bytes of the entries it loads).

- CUDA: the caching allocator's peak (`torch.cuda.max_memory_allocated`), reset at the start.
- CPU: PyTorch keeps no CPU allocator statistics, so the block runs under the PyTorch profiler with
  `profile_memory=True`, which records every tensor allocation and free with its size and time; the peak of
  their running sum is the peak growth of tensor memory. Python objects other than tensors are not counted, and
  the profiler slows the block down: measure in a run that is not timed.
  The process's resident high-water mark (`VmHWM`) was tried first and withdrawn: freed memory stays resident
  (allocator and BLAS caches) and is reused without growing it, so a mode that allocates a fresh 70 MiB K/V
  block after earlier modes read 0 MiB of growth.
Anything else (another device type, a profiler without the raw event list) measures None, never a guess.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch


class PeakMemory:
    """Filled in by `peak_memory`: `bytes` is the peak growth over the start, or None where unmeasurable."""

    bytes: int | None = None


def peak_of_allocations(events: Iterable[tuple[int, int]]) -> int:
    """The peak of the running sum of (time, signed bytes) allocation events, taken in time order; 0 if memory
    never grew above the start."""
    running = peak = 0
    for _, size in sorted(events):
        running += size
        peak = max(peak, running)
    return peak


def _cpu_allocation_events(profiler: torch.profiler.profile) -> list[tuple[int, int]] | None:
    """(start ns, signed bytes) of every CPU tensor allocation and free the profiler saw, or None if this
    PyTorch does not expose its raw event list."""
    results = getattr(getattr(profiler, "profiler", None), "kineto_results", None)
    if results is None:
        return None
    cpu = torch.autograd.DeviceType.CPU
    return [
        (event.start_ns(), event.nbytes())
        for event in results.events()
        if event.name() == "[memory]" and event.device_type() == cpu
    ]


@contextmanager
def peak_memory(device: torch.device | str) -> Iterator[PeakMemory]:
    """Measure the peak memory growth of the block on `device` (see the module docstring)."""
    device = torch.device(device)
    result = PeakMemory()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        yield result
        torch.cuda.synchronize(device)
        result.bytes = torch.cuda.max_memory_allocated(device) - start
        return
    if device.type != "cpu":
        yield result
        return
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profiler:
        yield result
    events = _cpu_allocation_events(profiler)
    result.bytes = None if events is None else peak_of_allocations(events)
