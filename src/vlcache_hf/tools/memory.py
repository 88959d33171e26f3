"""Peak memory of one block of work, as growth over what was in use when it started (the benchmark's
memory column: a mode should need at most plain `generate`'s peak plus the bytes of the entries it loads).

Measured on CUDA only: the caching allocator's peak (`torch.cuda.max_memory_allocated`), reset at the start.
On the CPU the measurement is None (reported as "–"), never a guess: PyTorch keeps no CPU allocator
statistics, and the process's resident high-water mark (`VmHWM`, resettable through `/proc/self/clear_refs`)
cannot tell one mode's needs apart — tried in the benchmark, a mode that allocates a fresh 70 MiB K/V block
read 0 MiB of growth after earlier modes, because freed memory stays resident (allocator and BLAS caches) and
is reused without growing the resident set.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


class PeakMemory:
    """Filled in by `peak_memory`: `bytes` is the peak growth over the start, or None where unmeasurable."""

    bytes: int | None = None


@contextmanager
def peak_memory(device: torch.device | str) -> Iterator[PeakMemory]:
    """Measure the peak memory growth of the block on `device` (see the module docstring)."""
    device = torch.device(device)
    result = PeakMemory()
    if device.type != "cuda":
        yield result
        return
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    yield result
    torch.cuda.synchronize(device)
    result.bytes = torch.cuda.max_memory_allocated(device) - start
