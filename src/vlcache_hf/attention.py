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
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
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
    """The model's own attention, as its modeling code would have called it (for SDPA on the CPU without its
    per-group K/V copies: `native_gqa_sdpa`, bitwise the same output)."""
    own = own_implementation(module.config)
    if own == "eager":
        forward = _family_eager_attention(module)
        if forward is None:
            raise RuntimeError(f"{type(module).__name__}: no eager_attention_forward in its modeling module")
        return forward(module, query, key, value, attention_mask, **kwargs)
    if own == "sdpa":
        output = native_gqa_sdpa(module, query, key, value, attention_mask, **kwargs)
        if output is not None:
            return output, None
    return ALL_ATTENTION_FUNCTIONS[own](module, query, key, value, attention_mask, **kwargs)


#: arguments of transformers' SDPA path that `native_gqa_sdpa` does not reproduce (it then declines)
_UNHANDLED_SDPA_ARGUMENTS = ("softcap", "position_bias", "is_causal", "output_attentions")


def native_gqa_sdpa(
    module: torch.nn.Module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None, **kwargs
) -> torch.Tensor | None:
    """Transformers' SDPA attention for a masked multi-token query on the CPU, with SDPA's native grouped-query
    attention instead of copying K/V once per query group (`repeat_kv`), which transformers does whenever a
    mask is given: for a chat turn's new text over a long cached prompt those copies cost as much as the
    attention itself. On the CPU both run the same kernel on the same values — bitwise equal outputs, checked in
    `tests/test_native_gqa.py` over dtypes, head sizes, group counts and mask kinds. None (the caller then runs
    transformers' own path) wherever that is not the case: no grouped heads, one query (transformers packs
    the groups itself), no mask (transformers uses native GQA itself), CUDA (native GQA with a mask falls back to
    the math kernel there), dropout, or an argument this function does not reproduce."""
    groups = getattr(module, "num_key_value_groups", 1)
    if (
        groups <= 1
        or query.device.type != "cpu"
        or query.shape[2] < 2
        or not isinstance(attention_mask, torch.Tensor)
        or dropout
        or key.shape[-1] != value.shape[-1]
        or any(kwargs.get(name) is not None for name in _UNHANDLED_SDPA_ARGUMENTS)
    ):
        return None
    output = scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling, enable_gqa=True)
    return output.transpose(1, 2).contiguous()


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


def _switch(attention_config) -> str:
    """Point `attention_config` at `selective_attention`; returns the model's own implementation.

    Counted per config, so switches overlapping in several threads restore the model's own implementation
    when the last one ends (each saving "the previous value" would leave the model switched for good).
    """
    with _switch_lock:
        own, running = _switched.get(id(attention_config), (attention_config._attn_implementation, 0))
        _switched[id(attention_config)] = (own, running + 1)
        attention_config._attn_implementation = SELECTIVE_ATTENTION
    return own


def _switch_back(attention_config) -> None:
    with _switch_lock:
        own, running = _switched.pop(id(attention_config))
        if running > 1:
            _switched[id(attention_config)] = (own, running - 1)
        else:
            attention_config._attn_implementation = own


@contextmanager
def selective_attention_enabled(attention_config, backend: SelectiveAttentionBackend) -> Iterator[None]:
    """Route the decoder's attention through `backend` (via `selective_attention`) for the duration of the block."""
    own = _switch(attention_config)
    token, backend_token = _replaced.set(own), _active.set(backend)
    try:
        yield
    finally:
        _active.reset(backend_token)
        _replaced.reset(token)
        _switch_back(attention_config)


def native_gqa_forward(attention_config, device: torch.device, owner: object) -> Callable[[], Any] | None:
    """Route the model's own forward's attention through `_own_attention` until the returned callable is called,
    so SDPA on the CPU runs without per-group K/V copies (`native_gqa_sdpa`); None when that changes nothing
    (another implementation or device: nothing is switched).

    The prefill forward of a chat turn computes its new text over the whole cached prompt in one call; the hooks
    around that forward switch here and back (`hook.py`). The callable switches back once (later calls do
    nothing), and at the latest when `owner` (the request's cache) is garbage-collected: a forward interrupted by
    a `KeyboardInterrupt` skips the hook that would have called it. The switch is not tied to a context: any
    forward of the model meanwhile (another thread's) gets native GQA too, which is bitwise what it computes.
    """
    if device.type != "cpu" or own_implementation(attention_config) != "sdpa":
        return None
    _switch(attention_config)
    return weakref.finalize(owner, _switch_back, attention_config)
