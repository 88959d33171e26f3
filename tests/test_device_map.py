"""Big-model loading: a model loaded with an accelerate `device_map` that offloads decoder layers to disk
(`offload_folder`). Accelerate's real hooks then move each offloaded layer's weights in around its forward —
including the forwards the selective prefill makes — and leave meta tensors on the module between calls."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_same_as_plain, greedy
from transformers import AutoModelForImageTextToText

from vlcache_hf import CacheStore, VLCache, VLCacheError
from vlcache_hf.fingerprint import fingerprint
from vlcache_hf.tools import toy


@pytest.fixture(scope="module")
def offloaded(tmp_path_factory):
    """(model in memory, the same checkpoint with every other decoder layer offloaded to disk, processor)."""
    model, processor = toy.build_model(), toy.build_processor()
    directory = tmp_path_factory.mktemp("checkpoint")
    model.save_pretrained(directory)
    device_map = {name: "cpu" for name in ("model.visual", "model.language_model.embed_tokens", "model.language_model.norm", "model.language_model.rotary_emb", "lm_head")}
    for layer in range(model.config.text_config.num_hidden_layers):
        device_map[f"model.language_model.layers.{layer}"] = "disk" if layer % 2 else "cpu"
    loaded = AutoModelForImageTextToText.from_pretrained(
        directory, device_map=device_map, offload_folder=str(directory / "offload"), attn_implementation="sdpa"
    )
    assert any(p.is_meta for p in loaded.parameters()), "expected disk-offloaded (meta) weights"
    return model, loaded, processor


def test_offloaded_model_equals_plain_generate(offloaded, images):
    model, loaded, processor = offloaded
    inputs = toy.chat_inputs(processor, [toy.message("user", images[0], images[1], "What is shown?")])
    store = CacheStore()
    full = assert_same_as_plain(loaded, inputs, lambda: VLCache(loaded, store=store, policy="full"))
    assert full.report.encoder_misses == 2
    repeat = assert_same_as_plain(loaded, inputs, lambda: VLCache(loaded, store=store))  # exact repeat, policy "none"
    assert repeat.report.encoder_hits == 2 and repeat.report.reused_tokens > 0
    # the offloaded model's own answer is the in-memory model's (the checkpoint is the same)
    assert torch.equal(greedy(loaded, inputs).sequences, greedy(model, inputs).sequences)


def test_offloaded_weights_are_fingerprinted_from_where_accelerate_keeps_them(offloaded, images):
    """Meta tensors have no data: the fingerprint reads offloaded weights through accelerate's weights map, so
    the offloaded model and the in-memory one share entries (same weights), and moved reuse runs on it."""
    model, loaded, processor = offloaded
    assert fingerprint(loaded) == fingerprint(model)
    store = CacheStore()
    greedy(model, toy.chat_inputs(processor, [toy.message("user", images[2], images[3], "What?")]), VLCache(model, store=store))
    moved = toy.chat_inputs(processor, [toy.message("user", "Now:", images[3], images[2], "What?")])
    cache = VLCache(loaded, store=store, policy="vlcache", recompute_ratio=0.1)
    greedy(loaded, moved, cache)
    assert cache.report.encoder_hits == 2 and cache.report.moved_tokens > 0


def test_meta_weights_without_offload_are_a_clear_error():
    with torch.device("meta"):
        model = toy.build_model()
    with pytest.raises(VLCacheError, match="meta device"):
        fingerprint(model)
