"""Time to first token (TTFT): from the `generate` call until its first new token exists."""

from __future__ import annotations

import time
from statistics import median

import torch

from .compat import with_cache


def _sync(model) -> None:
    if next(model.parameters()).device.type == "cuda":
        torch.cuda.synchronize()


def time_first_token(model, inputs, cache=None) -> float:
    """Seconds from the `generate` call to the first generated token (one greedy token)."""
    _sync(model)
    start = time.perf_counter()
    model.generate(**inputs, max_new_tokens=1, do_sample=False, **with_cache(model, cache))
    _sync(model)
    return time.perf_counter() - start


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of `repeats` calls of `fn` (for micro-benchmarks of store and hashing work)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return median(times)


def summarize(samples: list[float]) -> dict[str, float]:
    """Median and spread (min, max) of repeated timings, in seconds."""
    ordered = sorted(samples)
    return {"median": median(ordered), "min": ordered[0], "max": ordered[-1], "n": float(len(ordered))}
