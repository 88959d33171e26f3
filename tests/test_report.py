"""PrefillReport figures checked against the prompt's token layout."""

from __future__ import annotations

from helpers import greedy

from vlcache_hf import CacheStore, VLCache
from vlcache_hf.tools import toy

CHUNK = 16
IMAGE_TOKENS = toy.image_tokens(112)


def _inputs(processor, images, text, order):
    return toy.chat_inputs(processor, [toy.message("user", text, *[images[i] for i in order], "Which is brighter?")])


def test_report_counts_follow_the_layout(models, images):
    model, processor = models("qwen2_5_vl")
    store = CacheStore()
    first = _inputs(processor, images, "Look:", [0, 1])
    length = first["input_ids"].shape[1]

    cold = VLCache(model, store=store, policy="none", prefix_chunk_size=CHUNK)
    greedy(model, first, cold)
    r = cold.report
    assert (r.total_tokens, r.reused_tokens, r.recomputed_tokens, r.prefix_tokens) == (length, 0, length, 0)
    assert (r.images, r.image_tokens) == (2, 2 * IMAGE_TOKENS)
    assert (r.encoder_hits, r.encoder_misses, r.kv_hits, r.kv_misses) == (0, 2, 0, 2)
    assert r.recomputed_per_layer == [length] * model.config.text_config.num_hidden_layers

    moved = _inputs(processor, images, "Another, longer preamble!", [1, 0])
    length = moved["input_ids"].shape[1]
    warm = VLCache(model, store=store, policy="none", prefix_chunk_size=CHUNK)
    greedy(model, moved, warm)
    r = warm.report
    assert r.prefix_tokens == 0  # the preambles differ within the first chunk
    assert r.reused_tokens == 2 * IMAGE_TOKENS
    assert r.recomputed_tokens == length - 2 * IMAGE_TOKENS
    assert r.reused_tokens + r.recomputed_tokens == r.total_tokens
    assert (r.encoder_hits, r.encoder_misses, r.kv_hits, r.kv_misses) == (2, 0, 2, 0)

    # an approximately served request publishes prefix chunks only up to its first reused image token
    image_rows = (moved["input_ids"][0] == model.config.image_token_id).nonzero().flatten().tolist()
    repeat_moved = VLCache(model, store=store, policy="none", prefix_chunk_size=CHUNK)
    greedy(model, moved, repeat_moved)
    assert repeat_moved.report.prefix_tokens == image_rows[0] // CHUNK * CHUNK

    # an exactly computed request is reusable as a prefix up to its last prefilled token (chunks and tail)
    length = first["input_ids"].shape[1]
    repeat = VLCache(model, store=store, policy="none", prefix_chunk_size=CHUNK)
    greedy(model, first, repeat)
    r = repeat.report
    expected_prefix = length - 1
    image_rows = (first["input_ids"][0] == model.config.image_token_id).nonzero().flatten().tolist()
    images_past_prefix = sum(1 for i in image_rows if i >= expected_prefix)
    assert r.prefix_tokens == expected_prefix
    assert r.reused_tokens == expected_prefix + images_past_prefix
    assert r.recomputed_tokens == length - r.reused_tokens

    full = VLCache(model, store=store, policy="full")
    greedy(model, moved, full)
    length = moved["input_ids"].shape[1]
    r = full.report
    assert (r.reused_tokens, r.prefix_tokens, r.kv_hits, r.kv_misses) == (0, 0, 0, 0)
    assert r.encoder_hits == 2
    assert r.timings.total_s >= r.timings.prefill_s > 0
