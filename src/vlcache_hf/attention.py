"""The attention used inside the selective prefill, whatever the model's own `attn_implementation`.

The recompute set's queries sit at arbitrary positions of the prompt, so each needs a causal mask by its
position in the full sequence. FlashAttention kernels cannot take such a mask, and transformers' SDPA path
copies K/V per query-head group (`repeat_kv`) whenever a mask is given. So the layer loop switches the
model's attention config to this function (registered through the public `AttentionInterface`) and back:
SDPA with native grouped-query attention on CPU, and on CUDA the memory-efficient kernel (which takes masks).
The model's own implementation still serves the last prompt token and every decoding step.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.nn.functional import scaled_dot_product_attention
from transformers import AttentionInterface

SELECTIVE_ATTENTION = "vlcache_selective"


def selective_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """SDPA over full-length K/V. `attention_mask` is bool [1, 1, q, kv] (True = visible) or None (causal, q == kv)."""
    groups = query.shape[1] // key.shape[1]
    native_gqa = groups > 1 and (query.device.type != "cuda" or attention_mask is None)
    if groups > 1 and not native_gqa:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    output = scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        is_causal=attention_mask is None and query.shape[2] > 1,
        scale=scaling,
        enable_gqa=native_gqa,
    )
    return output.transpose(1, 2).contiguous(), None


AttentionInterface.register(SELECTIVE_ATTENTION, selective_attention)


@contextmanager
def selective_attention_enabled(attention_config) -> Iterator[None]:
    """Route the decoder's attention through `selective_attention` for the duration of the block."""
    previous = attention_config._attn_implementation
    attention_config._attn_implementation = SELECTIVE_ATTENTION
    try:
        yield
    finally:
        attention_config._attn_implementation = previous
