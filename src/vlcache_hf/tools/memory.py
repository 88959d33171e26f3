"""Peak memory of one block of work, as growth over what was in use when it started (the benchmark's
memory column: a mode should need at most plain `generate`'s peak plus the bytes of the entries it loads).

CUDA: the caching allocator's peak (`torch.cuda.max_memory_allocated`), reset at the start. CPU on Linux:
the process's resident-set high-water mark (`VmHWM`), reset at the start by writing 5 to
`/proc/self/clear_refs` — resident memory, so it counts what the work touched, not what it reserved. Where
neither is available the measurement is None (reported as "–"), never a guess.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_bytes(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.M)
    if match is None:
        raise OSError(f"no {field} in {_STATUS}")
    return int(match.group(1)) * 1024


def _reset_resident_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Filled in by `peak_memory`: `bytes` is the peak growth over the start, or None where unmeasurable."""

    bytes: int | None = None


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
    measurable = _STATUS.exists() and _reset_resident_peak()
    start = _status_bytes("VmRSS") if measurable else 0
    yield result
    if measurable:
        result.bytes = max(0, _status_bytes("VmHWM") - start)
