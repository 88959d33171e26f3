"""The attention used inside the selective prefill, whatever the model's own `attn_implementation`.

The recompute set's queries sit at arbitrary positions of the prompt, so each needs a causal mask by its
position in the full sequence. FlashAttention kernels cannot take such a mask, and transformers' SDPA path
copies K/V per query-head group (`repeat_kv`) whenever a mask is given. So the layer loop switches the
model's attention config to this function (registered through the public `AttentionInterface`) and back:
SDPA with native grouped-query attention on CPU, and on CUDA the memory-efficient kernel (which takes masks).
A model loaded with `attn_implementation="eager"` keeps its own eager kernel (its family's
`eager_attention_forward`, fed our mask as the additive float mask eager masks are), so its prefill rounds as
the model's own does: in bf16/fp16 SDPA and eager round differently by up to one unit in the last place.
The model's own implementation still serves the last prompt token and every decoding step.
Masks carry every restriction (causality by prompt position, padding, sliding windows: see `prefill.py`), so
the `sliding_window` argument the model passes is not needed here.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch.nn.functional import scaled_dot_product_attention
from transformers import AttentionInterface

SELECTIVE_ATTENTION = "vlcache_selective"
#: the attention implementation the model was configured with, while `selective_attention_enabled` replaces it
_replaced: ContextVar[str | None] = ContextVar("vlcache_replaced_attention", default=None)


def _eager_attention(module, query, key, value, attention_mask, dropout, scaling):
    """The model family's own eager attention over our bool mask (None: the whole prompt, causal), or None if the
    family's modeling file has no `eager_attention_forward`."""
    forward = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if forward is None:
        return None
    if attention_mask is None:
        q, k = query.shape[2], key.shape[2]
        attention_mask = torch.ones(q, k, dtype=torch.bool, device=query.device).tril(k - q)[None, None]
    zero = torch.zeros((), dtype=query.dtype, device=query.device)
    additive = torch.where(attention_mask, zero, torch.finfo(query.dtype).min)
    output, _ = forward(module, query, key, value, additive, scaling=scaling, dropout=dropout)
    return output, None


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
    if _replaced.get() == "eager":
        eager = _eager_attention(module, query, key, value, attention_mask, dropout, scaling)
        if eager is not None:
            return eager
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


_switch_lock = threading.Lock()
#: per attention config being switched: (the model's own implementation, selective prefills running on it)
_switched: dict[int, tuple[str, int]] = {}


@contextmanager
def selective_attention_enabled(attention_config) -> Iterator[None]:
    """Route the decoder's attention through `selective_attention` for the duration of the block.

    Counted per config, so prefills overlapping in several threads restore the model's own implementation
    when the last one ends (each saving "the previous value" would leave the model switched for good).
    """
    with _switch_lock:
        own, running = _switched.get(id(attention_config), (attention_config._attn_implementation, 0))
        _switched[id(attention_config)] = (own, running + 1)
        attention_config._attn_implementation = SELECTIVE_ATTENTION
    token = _replaced.set(own)
    try:
        yield
    finally:
        _replaced.reset(token)
        with _switch_lock:
            own, running = _switched.pop(id(attention_config))
            if running > 1:
                _switched[id(attention_config)] = (own, running - 1)
            else:
                attention_config._attn_implementation = own
