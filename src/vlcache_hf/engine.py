"""One request's prefill, end to end: images → plan → load → assemble → selective prefill → publish.

`prefill_request` is what the forward pre-hook runs on `generate`'s prefill call. It fills the `VLCache`
with the prompt up to its *fresh tail* and returns the kwargs with which the model's own forward computes that
tail (and so the first logits) on top of the cache. When every row before it was loaded exactly (a chat turn, an
exact repeat), the fresh tail is the text after the last stored row — a chat turn's new question — so one
forward computes it in the same pass over the weights as the last token (a selective prefill of it would cost a
second pass). Otherwise it is the last token alone. What the request computed is published once that forward succeeded (`publish_computed`, run by the
forward hook).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from . import encoder
from .errors import VLCacheError
from .metrics import PrefillReport, PrefillTimings
from .plan import ImageSpan, find_image_spans, plan_prefill
from .prefill import LayerBuffers, allocate_buffers, fill_moved, fill_prefix, run_layers
from .reuse import (
    PrefixChunk,
    SpanHit,
    load_image_kv,
    load_prefix,
    load_tail,
    publish_image,
    publish_prefix,
    publish_tail,
)
from .selection import SelectionContext
from .store.keys import CONTEXT_BLOCK, chain_prefix_hashes, context_hashes, prefix_root

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
                cache.adapter, modality, cache.store, cache.fingerprint, kwargs[modality.pixels_arg], layout,
                pending=cache.pending_entries,
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


def _contexts(
    fp: str, input_ids: torch.Tensor, kwargs: dict[str, Any], positions: torch.Tensor, spans: list[ImageSpan], chunk: int,
    num_tokens: int,
):
    """Prefix chunk hashes of tokens [0, num_tokens), per span start the context hash of the tokens up to its end,
    and a function giving the context hash of tokens [0, end) for any `end` (tails).

    Both cover everything the K/V is computed from: token ids with image content keys, the positions the
    adapter computed (so every input its position computation reads — padding, video timing — counts without
    the engine naming it) and which tokens are visible (the attention mask).
    """
    ids = input_ids[0, :num_tokens].tolist()
    image_keys_at = {pos: s.key for s in spans for pos in range(s.start, s.end)}
    pos = positions[:, 0, :num_tokens].to("cpu", torch.long)
    mask = kwargs.get("attention_mask")
    visible = torch.ones(num_tokens, dtype=torch.bool) if mask is None else mask[0, :num_tokens].to("cpu", torch.bool)
    hashes = chain_prefix_hashes(fp, ids, image_keys_at, chunk, pos, visible)
    blocks = hashes if chunk == CONTEXT_BLOCK else ()  # the same chain: hash the prompt once
    ends = context_hashes(fp, ids, image_keys_at, [s.end for s in spans if s.end <= num_tokens], pos, visible, blocks)

    def end_context(end: int) -> str:
        return context_hashes(fp, ids, image_keys_at, [end], pos, visible, blocks)[end]

    return hashes, {s.start: ends[s.end] for s in spans if s.end <= num_tokens}, end_context


def prefill_request(cache, args: tuple, kwargs: dict[str, Any], keep: int = 1, fresh_tail: bool = False) -> dict[str, Any]:
    """Fill `cache` with the prompt but its last `keep` tokens (more with `fresh_tail`); return kwargs for the
    model's forward over the rest.

    `keep` > 1 when the caller needs the logits of the last `keep` tokens (assisted decoding's candidates,
    `logits_to_keep`). With `fresh_tail` (the caller keeps only the last `keep` logits) the model's forward also
    takes every fresh text token after the last stored or image row. The store's view of the request (lookups,
    what is published) is the prompt but its last `keep` tokens either way.
    """
    start = time.perf_counter()
    settings = cache.settings
    adapter, store, fp, policy = cache.adapter, cache.store, cache.fingerprint, settings.policy
    input_ids = _input_ids(args, kwargs)
    device, total, layout = input_ids.device, input_ids.shape[1], adapter.kv_layout
    num_tokens, chunk = total - keep, settings.prefix_chunk_size
    timings = PrefillTimings()

    features, spans = _visual_features(cache, kwargs, input_ids)
    timings.encoder_s = features.seconds
    positions = adapter.prompt_positions(kwargs, input_ids)
    chunk_hashes, contexts, end_context = _contexts(fp, input_ids, kwargs, positions, spans, chunk, num_tokens)
    # K/V at length-dependent rotary frequencies holds for this prompt length only: neither reused nor stored
    base_rope = adapter.rope_frequencies_are_base(positions)
    fallback = "" if base_rope else (
        "rope frequencies depend on the prompt length here (dynamic NTK / LongRoPE past the original length): "
        "stored K/V not reused and this request's K/V not published"
    )

    # 1. what the store already holds: exact prefix chunks, then per image span its K/V from this same
    #    context (exact) or from another one (moved)
    tick = time.perf_counter()
    prefix_chunks: list[PrefixChunk] = []
    full_chunks = prefix_tokens = 0  # full chunks loaded; rows of the exact prefix (with a tail, past them)
    loaded_tail: tuple[str, int] | None = None  # (parent hash, end) of the tail used
    hits: dict[int, SpanHit] = {}  # by span start: a duplicated image is two spans with their own hits
    if policy.reuses_kv and base_rope:
        prefix_chunks, prefix_image_hits = load_prefix(store, fp, layout, chunk_hashes, chunk, spans, contexts)
        full_chunks = len(prefix_chunks)
        prefix_tokens = full_chunks * chunk
        parent = chunk_hashes[full_chunks - 1] if full_chunks else prefix_root(fp)
        tail = load_tail(store, fp, layout, parent, prefix_tokens, num_tokens, spans, contexts, end_context, prefix_image_hits)
        if tail is not None:
            prefix_chunks.append(tail[0])
            loaded_tail, prefix_tokens = (parent, tail[1]), tail[1]
        for span in spans:
            if prefix_tokens < span.end <= num_tokens:
                hit = prefix_image_hits.get(span.start) or load_image_kv(store, fp, layout, span, contexts[span.start])
                if hit is not None:
                    hits[span.start] = hit
    span_hits = {start: hit.exact for start, hit in hits.items()}
    plan = plan_prefill(num_tokens, spans, prefix_tokens, device=device, span_hits=span_hits)
    # rows [0, computed_until) are loaded or selectively computed here; the rest, fresh text, by the model's forward.
    # The tail goes to the model's forward only when every row before it was loaded exactly (a chat turn, an exact
    # repeat): then this request runs one pass over the weights instead of two. When the selective prefill runs
    # anyway (moved images, fresh rows before the tail) the tail rides along in it, whose attention is cheaper
    # than the model's own over a long cache (no per-group K/V copies), and the model's forward takes the last
    # token only. A request that reuses nothing is computed from row 0 in one call, as the model's own prefill
    # computes it, so its K/V (and every later exact repeat of it) stays bit-exact in half precision.
    computed_until = plan.prefix_tokens if fresh_tail and _only_text_after_prefix(plan, spans) else num_tokens
    buffers = allocate_buffers(layout, num_tokens, device)
    fill_prefix(buffers, prefix_chunks)
    _sync(device)
    timings.store_load_s = time.perf_counter() - tick

    # 2. reused image spans at their new positions
    tick = time.perf_counter()
    for part in plan.reused_spans:  # part.offset: where the reused part starts within its stored span
        entry = hits[part.start - part.offset].entry
        fill_moved(adapter, buffers, entry, part.offset, part.start, part.end, positions)
    for layer, (keys, values) in zip(cache.layers, buffers, strict=True):
        layer.load(keys, values, computed_until)
    _sync(device)
    timings.rerotation_s = time.perf_counter() - tick

    # 3. the selective prefill (nothing to run when every row before the fresh tail was loaded exactly)
    tick = time.perf_counter()
    rows = slice(0, computed_until)
    embeds: torch.Tensor | None = None
    counts = [0] * layout.num_layers
    if computed_until > 0 and (plan.moved_spans or bool(plan.fresh_mask[rows].any())):
        with torch.no_grad():
            embeds = _embeddings(cache, input_ids, spans, features)
            cos, sin = adapter.rotary_cos_sin(embeds, positions)
            ctx = SelectionContext(
                computed_until,
                layout.num_layers,
                plan.fresh_mask[rows],
                plan.moved_spans,
                reused_keys=lambda i: cache.layers[i].keys,
                positions=positions[:, 0, rows],
            )
            injections = adapter.layer_injections(spans, features, embeds[:, rows])
            mask = kwargs.get("attention_mask")
            key_padding = None if mask is None or bool(mask.all()) else mask[0, rows].bool()
            counts = run_layers(adapter, cache, embeds[:, rows], cos[:, rows], sin[:, rows], policy, ctx, key_padding, injections)
    _sync(device)
    timings.prefill_s = time.perf_counter() - tick

    # 4. publish what this request computed — once the model's forward has computed the rest (forward hook)
    if settings.publish and num_tokens > 0 and base_rope:

        def publish() -> None:
            layer_buffers = _published_buffers(cache, buffers)
            exact_until = plan.exact_until  # K/V after a moved (approximate) part is approximate too
            publish_prefix(store, fp, layer_buffers, positions, chunk_hashes, chunk, full_chunks, exact_until, spans)
            tail_start = len(chunk_hashes) * chunk
            parent = chunk_hashes[-1] if chunk_hashes else prefix_root(fp)
            if tail_start < num_tokens <= exact_until and loaded_tail != (parent, num_tokens):
                publish_tail(store, fp, layer_buffers, positions, parent, tail_start, num_tokens, spans, end_context(num_tokens))
            for span in spans:
                if span.end <= num_tokens and span.start not in hits and span.end > plan.prefix_tokens:
                    exact = span.end <= exact_until
                    publish_image(store, fp, layer_buffers, positions, span, contexts[span.start], exact)

        cache.pending_kv = publish
    adapter.after_prefill(positions, total)
    timings.total_s = features.seconds + time.perf_counter() - start

    computed_at_layer0 = counts[0] if counts else 0
    by_the_model = total - computed_until  # rows the model's own forward computes
    kv_hits = sum(1 for s in spans if s.end <= plan.prefix_tokens or s.start in hits)
    moved_tokens = sum(part.length for part in plan.moved_parts)
    cache.report = PrefillReport(
        policy=policy.name,
        total_tokens=total,
        reused_tokens=computed_until - computed_at_layer0,
        prefix_tokens=plan.prefix_tokens,
        recomputed_tokens=computed_at_layer0 + by_the_model,
        recomputed_per_layer=[c + by_the_model for c in counts],
        image_tokens=sum(s.length for s in spans),
        images=len({s.index for s in spans}),
        encoder_hits=sum(features.hits),
        encoder_misses=len(features.hits) - sum(features.hits),
        kv_hits=kv_hits if policy.reuses_kv else 0,
        kv_misses=len(spans) - kv_hits if policy.reuses_kv else 0,
        timings=timings,
        allocation=getattr(policy, "allocation", ""),
        fallback=fallback,
        exact_span_tokens=sum(part.length for part in plan.reused_spans) - moved_tokens,
        moved_tokens=moved_tokens,
    )
    cache.mark_prefilled()
    def embeddings() -> torch.Tensor:
        with torch.no_grad():
            return embeds if embeds is not None else _embeddings(cache, input_ids, spans, features)

    return _last_token_kwargs(cache, kwargs, input_ids, positions, embeddings, spans, by_the_model)


def _published_buffers(cache, buffers: LayerBuffers) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The cache's K/V to publish from: the prefill's buffers (with their block, for one-copy gathers) while every
    layer still reads them, else each layer's own keys and values (a layer that grew past its capacity)."""
    layers = [(layer.keys, layer.values) for layer in cache.layers]
    owned = len(layers) == len(buffers) and all(
        k.data_ptr() == bk.data_ptr() and v.data_ptr() == bv.data_ptr() for (k, v), (bk, bv) in zip(layers, buffers, strict=True)
    )
    return buffers if owned else layers


def _only_text_after_prefix(plan, spans: list[ImageSpan]) -> bool:
    """True when the exact prefix is not empty and every image (in the store's view, rows [0, plan.num_tokens))
    ends inside it: every row past it is then fresh text, nothing reused or to be encoded."""
    return plan.prefix_tokens > 0 and all(s.end <= plan.prefix_tokens for s in spans if s.start < plan.num_tokens)


def publish_computed(cache) -> None:
    """Publish what the request's prefill computed (its K/V rows, then its encoder outputs), after the model's
    forward has succeeded: the rows the forward computed are in the cache by then, and a request whose forward
    failed publishes nothing."""
    publish_kv, cache.pending_kv = cache.pending_kv, None
    start = time.perf_counter()
    if publish_kv is not None:
        with torch.no_grad():
            publish_kv()
    encoder.publish_pending(cache)
    if cache.report is not None and cache.report.timings is not None:
        _sync(cache.model.device)
        cache.report.timings.publish_s = time.perf_counter() - start


def plain_prefill(cache, args: tuple, kwargs: dict[str, Any], reason: str) -> None:
    """Leave the whole prompt to the model's own forward (it fills the empty cache like a `DynamicCache`), for a
    forward that must return something of every position; nothing is reused or published but encoder outputs.
    The report says why. Encoder hits are those of the items `generate` encoded through the store."""
    input_ids = _input_ids(args, kwargs)
    total, modalities = input_ids.shape[1], cache.adapter.modalities()
    hits: list[bool] = []
    for modality in modalities:
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get(modality.name)
        hits += getattr(getattr(encoded, encoder.FEATURES_ATTR, None), "hits", [])
    cache.report = PrefillReport(
        policy=cache.settings.policy.name,
        total_tokens=total,
        reused_tokens=0,
        prefix_tokens=0,
        recomputed_tokens=total,
        recomputed_per_layer=[total] * cache.adapter.kv_layout.num_layers,
        image_tokens=sum(int((input_ids == m.token_id).sum()) for m in modalities),
        images=len(hits),
        encoder_hits=sum(hits),
        encoder_misses=len(hits) - sum(hits),
        kv_hits=0,
        kv_misses=0,
        fallback=f"plain prefill by the model's own forward: {reason}",
    )
    cache.mark_prefilled()


def _last_token_kwargs(cache, kwargs, input_ids, positions, embeddings, spans, keep: int = 1) -> dict[str, Any]:
    """kwargs for the model's own forward over the last `keep` prompt tokens, on top of the filled cache.
    `embeddings()` gives the prompt's input embeddings (images included), needed when images are among them."""
    consumed = set(_PREFILL_ONLY_INPUTS) | cache.adapter.prefill_only_inputs()
    new = {k: v for k, v in kwargs.items() if k not in consumed}
    new["input_ids"] = input_ids[:, -keep:]
    new["position_ids"] = cache.adapter.last_token_position_ids(kwargs, positions, keep)
    for name in _PER_TOKEN_INPUTS:
        if new.get(name) is not None:
            new[name] = new[name][..., -keep:]
    first = input_ids.shape[1] - keep
    if any(s.start < input_ids.shape[1] and s.end > first for s in spans):  # image tokens among them: pass embeddings
        new["input_ids"] = None
        new["inputs_embeds"] = embeddings()[:, first:]
    return new
