"""The benchmark's peak-memory column (`tools.memory.peak_memory`): the allocator's peak on CUDA, the profiler's
record of tensor allocations on the CPU; "–" where nothing was measured."""

from __future__ import annotations

import torch

from vlcache_hf.tools.bench import ModeResult, markdown
from vlcache_hf.tools.memory import peak_memory, peak_of_allocations

MiB = 2**20


def test_cpu_peak_counts_what_is_alive_at_once_not_what_was_allocated_in_all():
    # sizes known by construction: 16 + 16 MiB alive together, then 8 MiB after both were freed
    with peak_memory("cpu") as peak:
        first = torch.ones(16 * MiB // 4)  # float32: 4 bytes each
        second = first * 2
        del first, second
        third = torch.ones(8 * MiB // 1, dtype=torch.uint8)
        del third
    assert 32 * MiB <= peak.bytes <= 32 * MiB + 64 * 1024  # a few small temporaries at most


def test_cpu_peak_counts_memory_kept_after_the_block():
    kept = []
    with peak_memory("cpu") as peak:
        kept.append(torch.zeros(4 * MiB // 4))
    assert 4 * MiB <= peak.bytes <= 4 * MiB + 64 * 1024


def test_peak_of_allocations_takes_events_in_time_order():
    assert peak_of_allocations([(3, -10), (1, 10), (2, 5), (4, 7)]) == 15
    assert peak_of_allocations([(1, -4), (2, 3)]) == 0  # a free of memory older than the block is no growth
    assert peak_of_allocations([]) == 0


def test_markdown_shows_peak_and_loaded_columns_and_the_hf_prefix_ratio():
    rows = [
        ModeResult("a-chat", "hf-prefix", {"median": 0.400, "min": 0.39, "max": 0.41}, peak_mib=150.0),
        ModeResult("a-chat", "naive", {"median": 0.500, "min": 0.49, "max": 0.51}, peak_mib=None, loaded_mib=64.0),
    ]
    table = markdown(rows, repeats=3)
    assert table.splitlines()[0].endswith("| peak MiB | entries loaded MiB |")
    assert "| 150 | – |" in table and "| – | 64 |" in table
    assert "- a-chat: HF prefix cache 400.0 ms / naive reuse 500.0 ms = 0.80×" in table
    rows[0].copy_ms = 12.5
    assert "- a-chat: HF prefix cache 400.0 ms (its per-request cache copy: 12.5 ms) / naive reuse 500.0 ms = 0.80×" in markdown(rows, repeats=3)
