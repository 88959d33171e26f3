"""One request's prefill, end to end: images → plan → load → assemble → selective prefill → publish.

`prefill_request` is what the forward pre-hook runs on `generate`'s prefill call. It fills the `VLCache`
with every prompt token but the last and returns the kwargs with which the model's own forward computes
that last token (and so the first logits) on top of the cache.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from . import encoder
from .errors import VLCacheError
from .metrics import PrefillReport, PrefillTimings
from .plan import ImageSpan, find_image_spans, plan_prefill
from .prefill import allocate_buffers, fill_moved, fill_prefix, run_layers
from .reuse import load_image_kv, load_prefix, publish_image, publish_prefix
from .selection import SelectionContext
from .store.entry import KVEntry
from .store.keys import chain_prefix_hashes

# generate's inputs consumed by the prefill that must not reach the last-token forward (besides the visual
# inputs each adapter names: pixels, layouts, pre-encoded outputs)
_PREFILL_ONLY_INPUTS = ("cache_position",)
_PER_TOKEN_INPUTS = ("mm_token_type_ids", "token_type_ids")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _visual_features(cache, kwargs: dict[str, Any], input_ids: torch.Tensor):
    """Per-item embeddings, content keys and token spans of every image and video in the prompt.

    Items come from `generate`'s pre-encoded outputs (tagged by our encoder wrapper) or are encoded here
    from pixels; items of all modalities are indexed in one list, modality by modality.
    """
    features = encoder.ImageFeatures([], [], [])
    spans: list[ImageSpan] = []
    for modality in cache.adapter.modalities():
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get(modality.name)
        if encoded is not None:
            found = getattr(encoded, encoder.FEATURES_ATTR, None) or encoder.features_from_output(encoded)
        elif kwargs.get(modality.pixels_arg) is not None:
            layout = cache.adapter.item_layout(modality, kwargs)
            found = encoder.encode_items(
                cache.adapter, modality, cache.store, cache.fingerprint, kwargs[modality.pixels_arg], layout
            )
        else:
            found = encoder.ImageFeatures([], [], [])
        spans += find_image_spans(input_ids, modality.token_id, found.tokens_per_image, found.keys, len(features.keys))
        features = features + found
    return features, sorted(spans, key=lambda span: span.start)


def _input_ids(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    if input_ids is None:
        raise VLCacheError("VLCache needs input_ids (inputs_embeds-only prompts are not supported)")
    if input_ids.shape[0] != 1:
        raise VLCacheError(
            f"VLCache serves one request at a time (batch size 1), got batch size {input_ids.shape[0]}; "
            "call generate once per request with its own VLCache (they share one CacheStore)"
        )
    return input_ids


def _embeddings(cache, input_ids: torch.Tensor, spans: list[ImageSpan], features: encoder.ImageFeatures):
    embeds = cache.adapter.embed_tokens(input_ids)
    for span in spans:
        rows = features.embeddings[span.index][span.offset : span.offset + span.length]
        embeds[0, span.start : span.end] = rows.to(embeds.device, embeds.dtype)
    return embeds


def prefill_request(cache, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Fill `cache` with all prompt tokens but the last; return kwargs for the model's last-token forward."""
    start = time.perf_counter()
    adapter, store, fp, policy = cache.adapter, cache.store, cache.fingerprint, cache.policy
    input_ids = _input_ids(args, kwargs)
    device, total, layout = input_ids.device, input_ids.shape[1], adapter.kv_layout
    num_tokens, chunk = total - 1, cache.prefix_chunk_size
    timings = PrefillTimings()

    features, spans = _visual_features(cache, kwargs, input_ids)
    timings.encoder_s = features.seconds
    positions = adapter.prompt_positions(kwargs, input_ids)
    image_keys_at = {pos: s.key for s in spans for pos in range(s.start, s.end)}
    chunk_hashes = chain_prefix_hashes(fp, input_ids[0, :num_tokens].tolist(), image_keys_at, chunk)

    # 1. what the store already holds
    tick = time.perf_counter()
    prefix_entries: list[KVEntry] = []
    span_entries: dict[str, KVEntry] = {}
    if policy.reuses_kv:
        prefix_entries = load_prefix(store, fp, layout, chunk_hashes, chunk)
        for span in spans:
            if len(prefix_entries) * chunk < span.end <= num_tokens:
                entry = load_image_kv(store, fp, layout, span)
                if entry is not None:
                    span_entries[span.key] = entry
    plan = plan_prefill(num_tokens, spans, len(prefix_entries) * chunk, set(span_entries), device)
    buffers = allocate_buffers(layout, num_tokens, device)
    fill_prefix(buffers, prefix_entries, chunk)
    _sync(device)
    timings.store_load_s = time.perf_counter() - tick

    # 2. reused image spans at their new positions
    tick = time.perf_counter()
    for part in plan.reused_spans:  # part.offset: where the reused part starts within its stored span
        fill_moved(adapter, buffers, span_entries[part.key], part.offset, part.start, part.end, positions)
    for layer_idx, layer in enumerate(cache.layers):
        layer.load(buffers[layer_idx, 0], buffers[layer_idx, 1], num_tokens)
    _sync(device)
    timings.rerotation_s = time.perf_counter() - tick

    # 3. the selective prefill
    tick = time.perf_counter()
    with torch.no_grad():
        embeds = _embeddings(cache, input_ids, spans, features)
        cos, sin = adapter.rotary_cos_sin(embeds, positions)
        ctx = SelectionContext(num_tokens, layout.num_layers, plan.fresh_mask, plan.moved_spans, cache.recompute_ratio)
        injections = adapter.layer_injections(spans, features, embeds[:, :num_tokens])
        mask = kwargs.get("attention_mask")
        key_padding = None if mask is None or bool(mask.all()) else mask[0, :num_tokens].bool()
        counts = (
            run_layers(adapter, cache, embeds[:, :num_tokens], cos[:, :num_tokens], sin[:, :num_tokens], policy, ctx, key_padding, injections)
            if num_tokens > 0
            else [0] * layout.num_layers
        )
    _sync(device)
    timings.prefill_s = time.perf_counter() - tick

    # 4. publish what this request computed
    tick = time.perf_counter()
    if cache.publish and num_tokens > 0:
        layer_buffers = [(layer.keys, layer.values) for layer in cache.layers]
        exact_until = min((p.start for p in plan.reused_spans), default=num_tokens)
        publish_prefix(store, fp, layer_buffers, positions, chunk_hashes, chunk, len(prefix_entries), exact_until)
        for span in spans:
            if span.end <= num_tokens and span.key not in span_entries and span.end > plan.prefix_tokens:
                publish_image(store, fp, layer_buffers, positions, span)
    _sync(device)
    timings.publish_s = time.perf_counter() - tick
    adapter.after_prefill(positions, total)
    timings.total_s = features.seconds + time.perf_counter() - start

    computed_at_layer0 = counts[0] if counts else 0
    kv_hits = sum(1 for s in spans if s.end <= plan.prefix_tokens or s.key in span_entries)
    cache.report = PrefillReport(
        policy=policy.name,
        total_tokens=total,
        reused_tokens=num_tokens - computed_at_layer0,
        prefix_tokens=plan.prefix_tokens,
        recomputed_tokens=computed_at_layer0 + 1,
        recomputed_per_layer=[c + 1 for c in counts],
        image_tokens=sum(s.length for s in spans),
        images=len({s.index for s in spans}),
        encoder_hits=sum(features.hits),
        encoder_misses=len(features.hits) - sum(features.hits),
        kv_hits=kv_hits if policy.reuses_kv else 0,
        kv_misses=len(spans) - kv_hits if policy.reuses_kv else 0,
        timings=timings,
        allocation=getattr(policy, "allocation", ""),
    )
    cache.mark_prefilled()
    return _last_token_kwargs(cache, kwargs, input_ids, positions, embeds, spans)


def _last_token_kwargs(cache, kwargs, input_ids, positions, embeds, spans) -> dict[str, Any]:
    consumed = set(_PREFILL_ONLY_INPUTS) | cache.adapter.prefill_only_inputs()
    new = {k: v for k, v in kwargs.items() if k not in consumed}
    new["input_ids"] = input_ids[:, -1:]
    new["position_ids"] = cache.adapter.last_token_position_ids(kwargs, positions)
    for name in _PER_TOKEN_INPUTS:
        if new.get(name) is not None:
            new[name] = new[name][..., -1:]
    last = input_ids.shape[1] - 1
    if any(s.start <= last < s.end for s in spans):  # the prompt ends inside an image: pass its embedding
        new["input_ids"] = None
        new["inputs_embeds"] = embeds[:, -1:]
    return new
