"""Selective prefill: run the decoder layers on the recompute set only, over full-length K/V buffers.

Queries are the recompute tokens; keys/values are the whole prompt's buffers, which start out holding the
reused K/V and receive the fresh K/V of each layer's recompute set as the layer runs (`VLCacheLayer` does
the scatter write). The causal mask is built by position in the full sequence (and windowed on the layers the
model windows, see `LayerPlans`); how that attention runs is the `SelectiveAttentionBackend`'s business
(`attention.py`). With the recompute set = all tokens this is the model's own prefill; with a 2 % set a layer
costs about 2 % of its full prefill.
"""

from __future__ import annotations

import torch

from .attention import SelectiveAttentionBackend, backend_for, selective_attention_enabled
from .models import KVLayout, ModelAdapter
from .reuse import PrefixChunk, block_of
from .rope import apply_rotation, position_delta
from .selection import SelectionContext, SelectionPolicy
from .selection.shift import rotation_table, shift_unrecomputed_rows
from .store.entry import KVEntry, to_device

DECODE_HEADROOM = 256


class LayerBuffers(list[tuple[torch.Tensor, torch.Tensor]]):
    """Per decoder layer, its (keys, values) buffers, each [1, kv_heads, capacity, head_dim].

    `block`, when not None, is one tensor [layers, 2, 1, kv_heads, capacity, head_dim] of which every layer's
    buffers are views: a span of stored rows is then copied into all layers and both sides at once, one copy per
    span. Per-layer copies cost one operator call per layer and side — on a GPU, where a 7B prompt's prefix
    of ~70 spans is ~8,000 such calls, that launch overhead (~20 ms) dwarfed the copy itself (~0.1 ms).
    """

    block: torch.Tensor | None = None


def allocate_buffers(layout: KVLayout, num_tokens: int, device: torch.device, block: bool | None = None) -> LayerBuffers:
    """Per layer, uninitialised keys and values [1, kv_heads, capacity, head_dim]; rows are filled before they
    are read.

    The capacity leaves room for the final prompt token and the first decoding steps, which then append
    in place (see `VLCacheLayer`). On the CPU (`block` None or False): one tensor per layer and side, not one
    block for the whole prompt: a block of tens of MiB is mapped fresh by the C allocator on every request and
    every page of it faults in on first touch (measured: 25.9 ms against 6.0 ms to fill a warm 70 MiB block on
    the CPU), while per-layer tensors reuse the memory the previous request freed, as `DynamicCache`'s do. On
    other devices (`block` None or True) one block: their caching allocators reuse it, and filling it takes one
    copy per span instead of one per span, layer and side (see `LayerBuffers`).
    """
    shape = (1, layout.num_kv_heads, num_tokens + DECODE_HEADROOM, layout.head_dim)
    use_block = device.type != "cpu" if block is None else block
    if use_block:
        whole = torch.empty((layout.num_layers, 2, *shape), dtype=layout.dtype, device=device)
        buffers = LayerBuffers((whole[layer, 0], whole[layer, 1]) for layer in range(layout.num_layers))
        buffers.block = whole
        return buffers
    return LayerBuffers(
        (torch.empty(shape, dtype=layout.dtype, device=device), torch.empty(shape, dtype=layout.dtype, device=device))
        for _ in range(layout.num_layers)
    )


def fill_prefix(buffers: list[tuple[torch.Tensor, torch.Tensor]], chunks: list[PrefixChunk]) -> None:
    """Copy the exact prefix chunks into their rows: each chunk's text rows from the chunk entry, its image rows
    from the images' exact entries (stored at these very positions: no re-rotation).

    With a block (`LayerBuffers.block`) each run of rows is one copy into every layer. Without one, runs of rows
    that abut are copied together, one concatenation per layer and side written into the buffer's rows: a
    4k-token prefix is ~65 chunks, and a copy per chunk, layer and side (~1000 small copies) cost twice the
    bytes' own copy time.
    """
    runs: list[tuple[int, torch.Tensor]] = []  # (first row, stored K/V [layers, 2, kv_heads, rows, head_dim])
    for chunk in chunks:
        runs += _text_runs(chunk)
        runs += [(first, entry.kv[:, :, :, offset : offset + last - first]) for first, last, entry, offset in chunk.image_parts]
    block = block_of(buffers)
    if block is not None:
        for first, part in runs:
            block[:, :, 0, :, first : first + part.shape[3]] = to_device(part, block.device)
        return
    runs.sort(key=lambda run: run[0])
    device = buffers[0][0].device
    group: list[tuple[int, torch.Tensor]] = []
    for run in [*runs, None]:
        if run is not None and (not group or group[-1][0] + group[-1][1].shape[3] == run[0]):
            group.append(run)
            continue
        if group:
            first = group[0][0]
            last = first + sum(part.shape[3] for _, part in group)
            # each part as its 2 × layers [kv_heads, rows, head_dim] views in one call (indexing every part per
            # layer and side would be two operator calls each)
            views = [part.flatten(0, 1).unbind(0) for _, part in group]
            for layer, (keys, values) in enumerate(buffers):
                for side, dest in ((0, keys), (1, values)):
                    parts = [to_device(view[2 * layer + side], device) for view in views]
                    # one copy straight into the buffer's rows (a concatenation then a copy read and wrote
                    # every byte twice)
                    torch.cat(parts, dim=1, out=dest[0, :, first:last])
        group = [run] if run is not None else []


def _text_runs(chunk: PrefixChunk) -> list[tuple[int, torch.Tensor]]:
    """A chunk's text rows as runs of consecutive rows, each with its columns of the chunk entry's K/V."""
    rows = chunk.text_rows.tolist()
    runs, begin = [], 0
    for index in range(1, len(rows) + 1):
        if index == len(rows) or rows[index] != rows[index - 1] + 1:
            runs.append((rows[begin], chunk.text.kv[:, :, :, begin:index]))
            begin = index
    return runs


def fill_moved(
    adapter: ModelAdapter,
    buffers: list[tuple[torch.Tensor, torch.Tensor]],
    entry: KVEntry,
    entry_offset: int,
    start: int,
    end: int,
    new_positions: torch.Tensor,
) -> None:
    """Copy a stored span into rows [start, end), its keys re-rotated from their stored to their new positions.

    `entry_offset` skips the entry's first rows when the span's start lies inside an exact prefix.
    """
    count = end - start
    kv = to_device(entry.kv[:, :, :, entry_offset : entry_offset + count], buffers[0][0].device)
    old = entry.positions[:, entry_offset : entry_offset + count]
    delta = position_delta(new_positions[:, 0, start:end], old)
    if bool((delta == 0).all()):
        keys = kv[:, 0]
    else:
        cos, sin = adapter.rotation_cos_sin(kv, delta)
        keys = apply_rotation(kv[:, 0], cos, sin)
    block = block_of(buffers)
    if block is not None:
        block[:, 0, 0, :, start:end] = keys
        block[:, 1, 0, :, start:end] = kv[:, 1]
        return
    for layer, (layer_keys, layer_values) in enumerate(buffers):
        layer_keys[0, :, start:end] = keys[layer]
        layer_values[0, :, start:end] = kv[layer, 1]


class LayerPlans:
    """The attention backend's plan (its mask or metadata) for each decoder layer and the current recompute
    set, built once per distinct window.

    Layers differ only by their sliding window (`ModelAdapter.attention_window`); a new recompute set
    (`reset`) drops the plans built for the previous one.
    """

    def __init__(self, adapter: ModelAdapter, num_tokens: int, key_padding: torch.Tensor | None, backend: SelectiveAttentionBackend):
        self._windows = [adapter.attention_window(i) for i in range(len(adapter.decoder_layers))]
        self._num_tokens, self._key_padding, self._backend = num_tokens, key_padding, backend
        self._query_idx: torch.Tensor | None = None
        self._built: dict[int | None, object] = {}

    def reset(self, query_idx: torch.Tensor) -> None:
        self._query_idx, self._built = query_idx, {}

    def for_layer(self, layer_idx: int) -> object:
        window = self._windows[layer_idx]
        if window not in self._built:
            self._built[window] = self._backend.plan(self._query_idx, self._num_tokens, self._key_padding, window)
        return self._built[window]


def normalise_set(candidate: torch.Tensor, within: torch.Tensor | None, fresh: torch.Tensor) -> torch.Tensor:
    """Sorted unique indices of `candidate` ∪ `fresh`, restricted to `within` (the previous layer's set)."""
    merged = torch.unique(torch.cat([candidate.to(fresh.device, torch.long), fresh]))
    if within is not None:
        merged = merged[torch.isin(merged, within)]
    return merged


def run_layers(
    adapter: ModelAdapter,
    cache,
    embeddings: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    policy: SelectionPolicy,
    ctx: SelectionContext,
    key_padding: torch.Tensor | None,
    injections: dict[int, torch.Tensor] | None = None,
) -> list[int]:
    """The layer loop over nested recompute sets. Returns how many tokens each layer computed.

    `injections[l]` ([1, num_tokens, hidden]) is added to layer l's output rows (Qwen3-VL's deepstack
    visual features), as the model's own forward adds it to every token's hidden state.
    """
    injections = injections or {}
    fresh = ctx.fresh_indices
    current = normalise_set(policy.initial_set(ctx), None, fresh)
    hidden = embeddings[:, current]
    attention_config = adapter.attention_config()
    backend = backend_for(embeddings.device, attention_config._attn_implementation)
    plans = LayerPlans(adapter, ctx.num_tokens, key_padding, backend)
    plans.reset(current)
    counts: list[int] = []
    shift_scales = policy.shift_scales
    # the shift's rotary table of every prompt position, built once per request
    rotation = rotation_table(adapter, ctx, embeddings) if shift_scales.get("keys") and ctx.positions is not None else None
    with selective_attention_enabled(attention_config, backend):
        for layer_idx in range(ctx.num_layers):
            if current.numel() == 0:  # nested sets: nothing deeper either
                return counts + [0] * (ctx.num_layers - layer_idx)
            layer_cache = cache.layers[layer_idx]
            layer_cache.begin_write(current, capture_previous=policy.needs_observation)
            plan = plans.for_layer(layer_idx)
            hidden = adapter.run_decoder_layer(layer_idx, hidden, plan, (cos[:, current], sin[:, current]), cache)
            if layer_idx in injections:
                hidden = hidden + injections[layer_idx][:, current].to(hidden.dtype)
            observation = layer_cache.end_write(layer_idx)
            if shift_scales and observation is not None:  # only moved rows this layer did not recompute
                shift_unrecomputed_rows(adapter, layer_cache.keys, layer_cache.values, ctx, observation, shift_scales, rotation)
            counts.append(int(current.numel()))
            if layer_idx + 1 == ctx.num_layers:
                break
            proposed = policy.after_layer(layer_idx, ctx, current, observation)
            if proposed is not current:
                proposed = normalise_set(proposed, current, fresh)
                hidden = hidden[:, torch.searchsorted(current, proposed)]
                current = proposed
                plans.reset(current)
    return counts
