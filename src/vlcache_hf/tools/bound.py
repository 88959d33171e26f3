"""The ideal time to first token of a reuse mode, from what it must still do — the benchmark's honest bound.

    ideal = encoder time of the images missed
          + the full prefill's time × the FLOP share of the rows recomputed (each recomputed row attends over
            the whole prompt, so attention is counted at full length)
          + bytes of the entries loaded / the measured copy bandwidth

Everything is measured in the same run: the vision tower's time per image on the scenario's images, the
full prefill's time (plain TTFT minus the encoder time of all its images), the device's copy bandwidth. A
mode's *share of bound* is ideal / measured TTFT: 100 % means no overhead beyond the work itself.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from statistics import median

import torch

from ..metrics import PrefillReport


@dataclass(frozen=True)
class LayerFlops:
    """FLOPs of one decoder layer: per token through its projections and MLP, per (query, key) in attention."""

    per_token: float
    per_query_key: float

    @classmethod
    def of(cls, text_config) -> LayerFlops:
        h, heads = text_config.hidden_size, text_config.num_attention_heads
        kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
        head_dim = getattr(text_config, "head_dim", None) or h // heads
        projections = h * heads * head_dim * 2 + h * kv_heads * head_dim * 2  # q and o; k and v
        mlp = 3 * h * text_config.intermediate_size  # gate, up, down
        return cls(per_token=2.0 * (projections + mlp), per_query_key=4.0 * heads * head_dim)

    def full_prefill(self, tokens: int, layers: int) -> float:
        """Every token of a causal prefill: token i attends to i + 1 keys."""
        return layers * (tokens * self.per_token + tokens * (tokens + 1) / 2 * self.per_query_key)

    def selective(self, rows_per_layer: list[int], tokens: int) -> float:
        """The rows recomputed per layer, each attending over the full prompt (an upper bound of causal)."""
        return sum(rows * (self.per_token + tokens * self.per_query_key) for rows in rows_per_layer)


@dataclass(frozen=True)
class BoundInputs:
    """The measured costs the bound is built from (one set per scenario and model)."""

    encoder_s_per_image: float
    full_prefill_s: float
    copy_bytes_per_s: float
    flops: LayerFlops
    kv_bytes_per_token: int
    encoder_bytes_per_token: int


def loaded_bytes(report: PrefillReport, inputs: BoundInputs) -> float:
    """Bytes of the stored entries a request reads: the K/V of its reused tokens and its encoder hits' outputs."""
    hit_tokens = report.image_tokens * report.encoder_hits / max(1, report.images)
    return report.reused_tokens * inputs.kv_bytes_per_token + hit_tokens * inputs.encoder_bytes_per_token


def ideal_ttft(report: PrefillReport, inputs: BoundInputs) -> tuple[float, dict[str, float]]:
    """Seconds a mode would take with no overhead, and its parts (encoder, prefill, load)."""
    tokens, layers = report.total_tokens, len(report.recomputed_per_layer)
    share = inputs.flops.selective(report.recomputed_per_layer, tokens) / inputs.flops.full_prefill(tokens, layers)
    loaded = loaded_bytes(report, inputs)
    parts = {
        "encoder": report.encoder_misses * inputs.encoder_s_per_image,
        "prefill": inputs.full_prefill_s * min(1.0, share),
        "load": loaded / inputs.copy_bytes_per_s,
    }
    return sum(parts.values()), parts


def copy_bandwidth(device: torch.device | str, megabytes: int = 64, repeats: int = 7) -> float:
    """Bytes per second of a device-to-device copy (what filling the cache from a memory tier costs)."""
    source = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    times = []
    for _ in range(repeats):
        if source.is_cuda:
            torch.cuda.synchronize(source.device)
        start = time.perf_counter()
        target.copy_(source)
        if source.is_cuda:
            torch.cuda.synchronize(source.device)
        times.append(time.perf_counter() - start)
    return source.numel() / median(times[1:])
