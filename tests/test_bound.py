"""The benchmark's honest bound, against hand-computed FLOPs and times."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vlcache_hf.metrics import PrefillReport
from vlcache_hf.tools.bound import BoundInputs, LayerFlops, ideal_ttft


def test_layer_flops_by_hand():
    # hidden 8, 2 heads of 4, 1 KV head, MLP 16: q,o = 8*8 each; k,v = 8*4 each; MLP 3*8*16 = 384
    config = SimpleNamespace(hidden_size=8, num_attention_heads=2, num_key_value_heads=1, head_dim=4, intermediate_size=16)
    flops = LayerFlops.of(config)
    assert flops.per_token == 2 * (64 + 64 + 32 + 32 + 384)  # 1152
    assert flops.per_query_key == 4 * 2 * 4  # QK and AV: 2 FLOPs per multiply-add, 2 heads of 4
    assert flops.full_prefill(3, 2) == 2 * (3 * 1152 + 6 * 32)  # causal: 1 + 2 + 3 query-key pairs
    assert flops.selective([1, 0], 3) == 1152 + 3 * 32


def test_ideal_ttft_adds_the_work_left():
    flops = LayerFlops(per_token=10.0, per_query_key=0.0)  # no attention: the share is the share of rows
    inputs = BoundInputs(encoder_s_per_image=0.5, full_prefill_s=2.0, copy_bytes_per_s=100.0, flops=flops,
                         kv_bytes_per_token=3, encoder_bytes_per_token=2)
    report = PrefillReport(policy="vlcache", total_tokens=10, reused_tokens=8, prefix_tokens=2, recomputed_tokens=2,
                           recomputed_per_layer=[2, 2], image_tokens=6, images=2, encoder_hits=1, encoder_misses=1,
                           kv_hits=2, kv_misses=0)
    ideal, parts = ideal_ttft(report, inputs)
    # encoder: 1 miss × 0.5 s; prefill: 2 of 10 rows on both layers → 20 % of 2 s; load: (8×3 + 3×2) B / 100 B/s
    assert parts == pytest.approx({"encoder": 0.5, "prefill": 0.4, "load": 0.3})
    assert ideal == pytest.approx(1.2)
