"""Bad input gets a clear error that names what to change."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from vlcache_hf import CacheStore, UnsupportedModelError, VLCache, VLCacheError
from vlcache_hf.tools import toy


def test_unsupported_model():
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(UnsupportedModelError, match="Qwen2-VL / Qwen2.5-VL"):
        VLCache(model)


@pytest.mark.parametrize("ratio", [-0.1, 1.5, "0.5", True, float("nan")])
def test_recompute_ratio_out_of_range(models, ratio):
    with pytest.raises(VLCacheError, match="recompute_ratio"):
        VLCache(models()[0], recompute_ratio=ratio)


def test_recompute_ratio_none_means_not_given(models):
    """None is the default (0 for a policy given by name; a policy instance keeps its own)."""
    assert VLCache(models()[0], policy="first_k", recompute_ratio=None).recompute_ratio == 0.0


def test_unknown_policy(models):
    with pytest.raises(VLCacheError, match="unknown policy 'fastest'.*full.*none"):
        VLCache(models()[0], policy="fastest")


def test_bad_prefix_chunk_size(models):
    with pytest.raises(ValueError, match="prefix_chunk_size"):
        VLCache(models()[0], prefix_chunk_size=0)


def test_images_not_matching_image_tokens(models, images):
    model, processor = models()
    inputs = toy.chat_inputs(processor, [toy.message("user", images[0], images[1], "Two?")])
    first_patches = int(inputs["image_grid_thw"][0].prod())
    inputs["pixel_values"] = inputs["pixel_values"][:first_patches]
    inputs["image_grid_thw"] = inputs["image_grid_thw"][:1]
    # (generate itself fails earlier, in transformers' own position computation; a direct forward reaches us)
    with pytest.raises(VLCacheError, match="image tokens"):
        model(**inputs, past_key_values=VLCache(model, store=CacheStore()))


def test_cache_of_another_model(models, images):
    model_a, processor = models("qwen2_5_vl")
    model_b, _ = models("qwen2_5_vl", "eager")
    inputs = toy.chat_inputs(processor, [toy.message("user", images[0], "?")])
    VLCache(model_b, store=CacheStore())  # model_b now routes VLCache prefills through vlcache-hf
    with pytest.raises(VLCacheError, match="another model"):
        model_b.generate(**inputs, past_key_values=VLCache(model_a, store=CacheStore()), max_new_tokens=2)


def test_inputs_embeds_only(models):
    model, processor = models()
    embeds = model.get_input_embeddings()(torch.tensor([[1, 2, 3]]))
    with pytest.raises(VLCacheError, match="input_ids"):
        model(inputs_embeds=embeds, past_key_values=VLCache(model, store=CacheStore()))
