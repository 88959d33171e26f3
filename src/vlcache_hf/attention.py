"""The attention used inside the selective prefill, whatever the model's own `attn_implementation`.

The recompute set's queries sit at arbitrary positions of the prompt, so each needs a causal mask by its
position in the full sequence. FlashAttention kernels cannot take such a mask, and transformers' SDPA path
copies K/V per query-head group (`repeat_kv`) whenever a mask is given. So the layer loop switches the
model's attention config to this function (registered through the public `AttentionInterface`) and back:
SDPA with native grouped-query attention on CPU, and on CUDA the memory-efficient kernel (which takes masks).
A model loaded with `attn_implementation="eager"` keeps its own eager kernel (its family's
`eager_attention_forward`, fed our mask as the additive float mask eager masks are), so its prefill rounds as
the model's own does: in bf16/fp16 SDPA and eager round differently by up to one unit in the last place.
The model's own implementation still serves the prompt's fresh tail and every decoding step.
The config is shared by every thread using the model, so while one thread's selective prefill has it switched,
another thread's ordinary forward of the same model reaches this function too: outside a selective prefill it
is the model's own implementation, fed the mask that implementation builds (`own_implementation_mask`).
Masks carry every restriction (causality by prompt position, padding, sliding windows), so the
`sliding_window` argument the model passes is not needed here.

The seam: a `SelectiveAttentionBackend` owns both halves of this attention — `plan` builds its per-layer
metadata once per recompute set and window (today a dense boolean [queries, keys] mask), and `attend` runs
the kernel with it. The layer loop hands the metadata through the model's decoder layer as its
`attention_mask` argument, so a backend may use any form: a CUDA FlashAttention-2 varlen backend would plan
`cu_seqlens` and per-query key lengths instead of a mask, a block-sparse one its block list. Register one with
`register_backend`; `backend_for` chooses per device and attention implementation.
"""

from __future__ import annotations

import sys
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, ClassVar

import torch
from torch.nn.functional import scaled_dot_product_attention
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

SELECTIVE_ATTENTION = "vlcache_selective"
#: the attention implementation the model was configured with, while `selective_attention_enabled` replaces it
_replaced: ContextVar[str | None] = ContextVar("vlcache_replaced_attention", default=None)


def _family_eager_attention(module) -> Any:
    """The `eager_attention_forward` of the modeling module that defines `module`'s class, or None."""
    return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)


def _eager_attention(module, query, key, value, attention_mask, dropout, scaling):
    """The model family's own eager attention over our bool mask (None: the whole prompt, causal), or None if the
    family's modeling file has no `eager_attention_forward`."""
    forward = _family_eager_attention(module)
    if forward is None:
        return None
    if attention_mask is None:
        q, k = query.shape[2], key.shape[2]
        attention_mask = torch.ones(q, k, dtype=torch.bool, device=query.device).tril(k - q)[None, None]
    zero = torch.zeros((), dtype=query.dtype, device=query.device)
    additive = torch.where(attention_mask, zero, torch.finfo(query.dtype).min)
    output, _ = forward(module, query, key, value, additive, scaling=scaling, dropout=dropout)
    return output, None


def attention_mask_for(
    query_idx: torch.Tensor, num_keys: int, key_padding: torch.Tensor | None, window: int | None = None
) -> torch.Tensor | None:
    """Bool mask [1, 1, q, num_keys] letting query i (at prompt position query_idx[i]) see keys 0..query_idx[i],
    or only the last `window` of them (query_idx[i] - window < j) on a sliding-window layer.

    `None` when the set is the whole prompt without padding and no window cuts into it: plain causal attention.
    """
    windowed = window is not None and window < num_keys
    if query_idx.numel() == num_keys and key_padding is None and not windowed:
        return None
    keys = torch.arange(num_keys, device=query_idx.device)
    allowed = keys[None, :] <= query_idx[:, None]
    if windowed:
        allowed &= keys[None, :] > query_idx[:, None] - window
    if key_padding is not None:
        allowed &= key_padding[None, :] | (keys[None, :] == query_idx[:, None])
    return allowed[None, None]


class SelectiveAttentionBackend(ABC):
    """Attention of the recompute set's queries (at arbitrary prompt positions) over the full-length K/V."""

    name: ClassVar[str]

    @abstractmethod
    def plan(self, query_idx: torch.Tensor, num_keys: int, key_padding: torch.Tensor | None, window: int | None) -> Any:
        """Metadata for `attend` on one layer: query i sits at prompt position `query_idx[i]` and may see keys
        up to it (only the last `window` on a sliding-window layer), never a padded key (`key_padding` False)."""

    @abstractmethod
    def attend(
        self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        plan: Any, dropout: float, scaling: float | None,
    ) -> torch.Tensor:
        """[batch, q, heads, head_dim] attention output for query [batch, heads, q, d] over key/value
        [batch, kv_heads, num_keys, d] (grouped-query attention: kv_heads divides heads)."""


class DenseMaskSDPA(SelectiveAttentionBackend):
    """A dense boolean mask and PyTorch SDPA: native grouped-query attention on CPU; on CUDA the
    memory-efficient kernel (which takes masks), K/V repeated per group. A model loaded with eager attention
    keeps its family's eager kernel (same rounding as its own prefill)."""

    name = "dense-sdpa"

    def plan(self, query_idx, num_keys, key_padding, window):
        return attention_mask_for(query_idx, num_keys, key_padding, window)

    def attend(self, module, query, key, value, plan, dropout, scaling):
        if _replaced.get() == "eager":
            eager = _eager_attention(module, query, key, value, plan, dropout, scaling)
            if eager is not None:
                return eager[0]
        groups = query.shape[1] // key.shape[1]
        native_gqa = groups > 1 and (query.device.type != "cuda" or plan is None)
        if groups > 1 and not native_gqa:
            key = key.repeat_interleave(groups, dim=1)
            value = value.repeat_interleave(groups, dim=1)
        output = scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=plan,
            is_causal=plan is None and query.shape[2] > 1,
            scale=scaling,
            enable_gqa=native_gqa,
        )
        return output.transpose(1, 2).contiguous()


#: selective-attention backends by name; `backend_for` picks among them
BACKENDS: dict[str, SelectiveAttentionBackend] = {DenseMaskSDPA.name: DenseMaskSDPA()}
#: the backend of the selective prefill running in this context
_active: ContextVar[SelectiveAttentionBackend | None] = ContextVar("vlcache_attention_backend", default=None)


def register_backend(backend: SelectiveAttentionBackend) -> SelectiveAttentionBackend:
    """Make a backend available by its `name` (e.g. a CUDA varlen kernel); `backend_for` may then choose it."""
    BACKENDS[backend.name] = backend
    return backend


def backend_for(device: torch.device, attn_implementation: str | None) -> SelectiveAttentionBackend:
    """The backend for a prefill on `device` of a model configured with `attn_implementation`. Today every
    case is served by the dense-mask SDPA backend; a varlen FlashAttention-2 backend would be chosen here for
    CUDA models loaded with `flash_attention_2`."""
    return BACKENDS[DenseMaskSDPA.name]


def selective_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The function registered with transformers' `AttentionInterface`: `attention_mask` is the active
    backend's plan for this layer (handed through the decoder layer unchanged)."""
    backend = _active.get()
    if backend is None:  # an ordinary forward while another thread's selective prefill has the config switched
        return _own_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    return backend.attend(module, query, key, value, attention_mask, dropout, scaling), None


def own_implementation(config: Any) -> str:
    """The attention implementation `config` has outside selective prefills (what they switched it from). Read
    under the lock that switches it, so a prefill ending meanwhile is seen either before or after, never half."""
    with _switch_lock:
        switched = _switched.get(id(config))
        return switched[0] if switched is not None else config._attn_implementation


def _own_attention(module: torch.nn.Module, query, key, value, attention_mask, **kwargs) -> tuple[torch.Tensor, Any]:
    """The model's own attention, as its modeling code would have called it."""
    own = own_implementation(module.config)
    if own == "eager":
        forward = _family_eager_attention(module)
        if forward is None:
            raise RuntimeError(f"{type(module).__name__}: no eager_attention_forward in its modeling module")
        return forward(module, query, key, value, attention_mask, **kwargs)
    return ALL_ATTENTION_FUNCTIONS[own](module, query, key, value, attention_mask, **kwargs)


def own_implementation_mask(**kwargs: Any) -> Any:
    """The mask function transformers calls (with keywords only, `config` among them) for a config switched to
    selective attention: a forward outside a selective prefill gets the mask of the model's own implementation
    (None where that one builds none)."""
    own = own_implementation(kwargs["config"])
    if own not in ALL_MASK_ATTENTION_FUNCTIONS:
        return None
    return ALL_MASK_ATTENTION_FUNCTIONS[own](**kwargs)


AttentionInterface.register(SELECTIVE_ATTENTION, selective_attention)
AttentionMaskInterface.register(SELECTIVE_ATTENTION, own_implementation_mask)


_switch_lock = threading.Lock()
#: per attention config being switched: (the model's own implementation, selective prefills running on it)
_switched: dict[int, tuple[str, int]] = {}


@contextmanager
def selective_attention_enabled(attention_config, backend: SelectiveAttentionBackend) -> Iterator[None]:
    """Route the decoder's attention through `backend` (via `selective_attention`) for the duration of the block.

    Counted per config, so prefills overlapping in several threads restore the model's own implementation
    when the last one ends (each saving "the previous value" would leave the model switched for good).
    """
    with _switch_lock:
        own, running = _switched.get(id(attention_config), (attention_config._attn_implementation, 0))
        _switched[id(attention_config)] = (own, running + 1)
        attention_config._attn_implementation = SELECTIVE_ATTENTION
    token, backend_token = _replaced.set(own), _active.set(backend)
    try:
        yield
    finally:
        _active.reset(backend_token)
        _replaced.reset(token)
        with _switch_lock:
            own, running = _switched.pop(id(attention_config))
            if running > 1:
                _switched[id(attention_config)] = (own, running - 1)
            else:
                attention_config._attn_implementation = own
