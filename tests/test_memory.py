"""The benchmark's peak-memory column (`tools.memory.peak_memory`): measured on CUDA, "–" on the CPU."""

from __future__ import annotations

import torch

from vlcache_hf.tools.bench import ModeResult, markdown
from vlcache_hf.tools.memory import peak_memory

MiB = 2**20


def test_cpu_reports_no_figure_rather_than_a_wrong_one():
    with peak_memory("cpu") as peak:
        block = torch.ones(16 * MiB // 4)
        del block
    assert peak.bytes is None


def test_markdown_shows_peak_and_loaded_columns_and_the_hf_prefix_ratio():
    rows = [
        ModeResult("a-chat", "hf-prefix", {"median": 0.400, "min": 0.39, "max": 0.41}, peak_mib=150.0),
        ModeResult("a-chat", "naive", {"median": 0.500, "min": 0.49, "max": 0.51}, peak_mib=None, loaded_mib=64.0),
    ]
    table = markdown(rows, repeats=3)
    assert table.splitlines()[0].endswith("| peak MiB | entries loaded MiB |")
    assert "| 150 | – |" in table and "| – | 64 |" in table
    assert "- a-chat: HF prefix cache 400.0 ms / naive reuse 500.0 ms = 0.80×" in table
