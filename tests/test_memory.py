"""The benchmark's peak-memory measurement (`tools.memory.peak_memory`) against allocations of known size."""

from __future__ import annotations

import sys

import pytest
import torch

from vlcache_hf.tools.bench import ModeResult, markdown
from vlcache_hf.tools.memory import peak_memory

MiB = 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CPU measurement reads /proc (Linux)")
def test_cpu_peak_is_the_growth_of_what_the_block_touched():
    with peak_memory("cpu") as idle:
        pass
    with peak_memory("cpu") as peak:
        block = torch.ones(96 * MiB // 4)  # 96 MiB, every page written
        del block
    assert idle.bytes is not None and idle.bytes < 8 * MiB
    assert peak.bytes is not None and 0.95 * 96 * MiB <= peak.bytes < 112 * MiB  # a few pages may be resident already


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CPU measurement reads /proc (Linux)")
def test_a_freed_peak_still_counts_and_the_next_block_starts_afresh():
    with peak_memory("cpu") as first:
        block = torch.ones(64 * MiB // 4)
        del block
        small = torch.ones(MiB // 4)
    with peak_memory("cpu") as second:
        small.add_(1)
    assert 0.95 * 64 * MiB <= first.bytes < 80 * MiB
    assert second.bytes < 8 * MiB  # the high-water mark was reset at the start of the second block


def test_markdown_shows_peak_and_loaded_columns_and_the_hf_prefix_ratio():
    rows = [
        ModeResult("a-chat", "hf-prefix", {"median": 0.400, "min": 0.39, "max": 0.41}, peak_mib=150.0),
        ModeResult("a-chat", "naive", {"median": 0.500, "min": 0.49, "max": 0.51}, peak_mib=120.4, loaded_mib=64.0),
    ]
    table = markdown(rows, repeats=3)
    assert table.splitlines()[0].endswith("| peak MiB | entries loaded MiB |")
    assert "| 150 | – |" in table and "| 120 | 64 |" in table
    assert "- a-chat: HF prefix cache 400.0 ms / naive reuse 500.0 ms = 0.80×" in table
