"""Each K/V row is stored once: prefix chunks hold their text rows, images' rows live in the images' entries
(issue 18). A chunk whose image entry is gone is a miss, never wrong K/V."""

from __future__ import annotations

import torch
from helpers import assert_same_as_plain, greedy

from vlcache_hf import CacheStore, VLCache
from vlcache_hf.store.keys import KV_KIND, PREFIX_KIND
from vlcache_hf.tools import toy

CHUNK = 16


def _request(processor, images):
    return toy.chat_inputs(processor, [toy.message("user", "Compare these two pictures:", images[0], "and", images[1], "Which one is brighter?")])


def _rows(store: CacheStore, kind: str) -> list[torch.Tensor]:
    tier = store.tiers[0]
    return [tier.get(k).tensors["positions"][0] for k in tier.keys() if k.startswith(kind + "-")]


def test_every_prefilled_row_is_stored_once(models, images):
    model, processor = models()
    inputs = _request(processor, images)
    store = CacheStore()
    greedy(model, inputs, VLCache(model, store=store, prefix_chunk_size=CHUNK))
    ids = inputs["input_ids"][0]
    prefilled = ids.numel() - 1  # the last prompt token is computed by the model's own forward
    image_rows = set(torch.nonzero(ids[:prefilled] == model.config.image_token_id).flatten().tolist())
    chunked = set(range(prefilled))  # full chunks and the tail after them: every prefilled row
    # positions: the text axis of M-RoPE equals the row for text; image rows are counted by entry length
    text_stored = [p for t in _rows(store, PREFIX_KIND) for p in t.tolist()]
    image_stored = sum(t.numel() for t in _rows(store, KV_KIND))
    assert len(text_stored) == len(set(text_stored)) == len(chunked - image_rows)  # every text row, once
    assert image_stored == len(image_rows)  # each image's rows once
    kv_bytes = sum(store.tiers[0].get(k).tensors["kv"].nbytes for k in store.tiers[0].keys() if k.split("-")[0] in (KV_KIND, PREFIX_KIND))
    per_row = model.config.text_config.num_hidden_layers * 2 * model.config.text_config.num_key_value_heads * (
        model.config.text_config.hidden_size // model.config.text_config.num_attention_heads) * 4
    assert kv_bytes == (len(chunked - image_rows) + len(image_rows)) * per_row == prefilled * per_row


def test_chunk_without_its_image_entry_is_a_miss(models, images):
    model, processor = models()
    inputs = _request(processor, images)
    store = CacheStore()
    greedy(model, inputs, VLCache(model, store=store, prefix_chunk_size=CHUNK))
    whole = assert_same_as_plain(model, inputs, lambda: VLCache(model, store=store, prefix_chunk_size=CHUNK))
    assert whole.report.prefix_tokens >= 2 * CHUNK
    second_image = [k for k in store.tiers[0].keys() if k.startswith(KV_KIND + "-")]
    assert len(second_image) == 2
    for key in second_image:
        store.discard(key)  # the chunks' image rows are gone: those chunks cannot be rebuilt
    first_image_row = int(torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id)[0])
    cut = assert_same_as_plain(model, inputs, lambda: VLCache(model, store=store, prefix_chunk_size=CHUNK))
    assert cut.report.prefix_tokens == first_image_row // CHUNK * CHUNK  # stops at the first chunk with image rows
