"""Entries that do not fit the model are misses: dropped from the store, and the answer stays right."""

from __future__ import annotations

import pytest
import torch
from helpers import greedy

from vlcache_hf import CacheStore, VLCache
from vlcache_hf.models import get_adapter
from vlcache_hf.store.entry import FORMAT_VERSION, EncoderEntry, KVEntry, StoredEntry
from vlcache_hf.tools import toy


def layout_hidden(model) -> int:
    return get_adapter(model).hidden_size


def _poison(entry: StoredEntry, how: str) -> StoredEntry:
    tensors = {k: v.clone() for k, v in entry.tensors.items()}
    meta = dict(entry.metadata)
    if how == "fingerprint":
        meta["fingerprint"] = "0" * 64
    elif how == "format":
        meta["format_version"] = str(int(FORMAT_VERSION) + 1)
    elif how == "shape":
        name = "kv" if "kv" in tensors else "embeddings"
        tensors[name] = tensors[name][..., :-1].contiguous()
    elif how == "dtype":
        name = "kv" if "kv" in tensors else "embeddings"
        tensors[name] = tensors[name].double()
    elif how == "kind":
        meta["kind"] = "something-else"
    return StoredEntry(tensors, meta)


@pytest.mark.parametrize("how", ["fingerprint", "format", "shape", "dtype", "kind"])
def test_poisoned_entries_are_misses_and_answers_stay_exact(models, images, how):
    model, processor = models("qwen2_5_vl")
    store = CacheStore()
    inputs = toy.chat_inputs(processor, [toy.message("user", "Look:", images[0], images[1], "Which?")])
    greedy(model, inputs, VLCache(model, store=store, policy="none", prefix_chunk_size=16))
    tier = store.tiers[0]
    keys = tier.keys()
    assert {k.split("-")[0] for k in keys} == {"enc", "kv", "pfx"}
    for key in keys:
        tier.put(key, _poison(tier.get(key), how))

    plain = greedy(model, inputs)
    cache = VLCache(model, store=store, policy="none", prefix_chunk_size=16)
    ours = greedy(model, inputs, cache)
    assert torch.equal(plain.sequences, ours.sequences)
    assert (plain.scores[0] - ours.scores[0]).abs().max() < 1e-4
    report = cache.report
    assert report.encoder_hits == 0 and report.kv_hits == 0 and report.reused_tokens == 0
    # every poisoned entry was dropped, then replaced by a valid one when the request published its own
    layout = get_adapter(model).kv_layout
    for key in keys:
        entry = tier.get(key)
        assert entry.metadata["fingerprint"] == cache.fingerprint
        assert entry.metadata["format_version"] == FORMAT_VERSION
        if key.startswith("enc-"):
            EncoderEntry.from_stored(entry, cache.fingerprint, layout_hidden(model), torch.float32)
        else:
            KVEntry.from_stored(entry, cache.fingerprint, layout.as_tuple, layout.dtype)


def test_entries_of_another_model_are_never_used(models, images):
    """Two models with the same architecture but different weights share a store without mixing entries."""
    model_a, processor = models("qwen2_5_vl")
    model_b = toy.build_model("qwen2_5_vl", seed=99)
    store = CacheStore()
    inputs = toy.chat_inputs(processor, [toy.message("user", images[2], "Describe.")])
    greedy(model_a, inputs, VLCache(model_a, store=store))
    plain_b = greedy(model_b, inputs)
    cache_b = VLCache(model_b, store=store)
    ours_b = greedy(model_b, inputs, cache_b)
    assert torch.equal(plain_b.sequences, ours_b.sequences)
    assert cache_b.report.encoder_hits == 0 and cache_b.report.kv_hits == 0
