"""`model.generate(**inputs, past_key_values=VLCache(...))` across generate's features."""

from __future__ import annotations

import pytest
import torch
from helpers import greedy
from transformers.generation.streamers import BaseStreamer

from vlcache_hf import CacheStore, VLCache, VLCacheError
from vlcache_hf.tools import toy


def test_multi_turn_chat_reuses_turn_one(models, images):
    model, processor = models("qwen2_5_vl")
    store = CacheStore()
    turn1 = [toy.message("user", "Here are two pictures.", images[0], images[1], "Describe the first.")]
    inputs1 = toy.chat_inputs(processor, turn1)
    out1 = greedy(model, inputs1, VLCache(model, store=store, prefix_chunk_size=16), max_new_tokens=8)
    answer = processor.decode(out1.sequences[0, inputs1["input_ids"].shape[1] :], skip_special_tokens=True)

    turn2 = [*turn1, toy.message("assistant", answer), toy.message("user", "And the second?")]
    inputs2 = toy.chat_inputs(processor, turn2)
    plain = greedy(model, inputs2, max_new_tokens=8)
    cache = VLCache(model, store=store, policy="none", prefix_chunk_size=16)
    ours = greedy(model, inputs2, cache, max_new_tokens=8)
    # turn 1 is an exact prefix of turn 2, so naive reuse is exact here
    assert torch.equal(plain.sequences, ours.sequences)
    assert (plain.scores[0] - ours.scores[0]).abs().max() < 1e-4
    # everything turn 1 prefilled is reused (its full chunks and its tail), as a copied DynamicCache would be
    assert cache.report.prefix_tokens == inputs1["input_ids"].shape[1] - 1
    assert cache.report.encoder_hits == 2 and cache.report.kv_hits == 2


def test_second_generate_call_continues_the_same_cache(models, images):
    """A prefilled VLCache is a normal cache: generate can continue from it like from a DynamicCache.

    The second call's positions come from the `rope_deltas` the prefill left on the model; one position off
    changes no greedy token here but moves the logits by ~1e-3, so every step's logits are compared."""
    model, processor = models("qwen2_5_vl")
    turn1 = [toy.message("user", images[2], "Name it.")]
    inputs1 = toy.chat_inputs(processor, turn1)
    cache = VLCache(model, store=CacheStore(), policy="full")
    first = greedy(model, inputs1, cache, max_new_tokens=4)
    follow = torch.cat([first.sequences, processor.tokenizer("ok?", return_tensors="pt")["input_ids"]], dim=1)
    kwargs = {k: v for k, v in inputs1.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    token_types = torch.zeros_like(follow)
    token_types[:, : inputs1["mm_token_type_ids"].shape[1]] = inputs1["mm_token_type_ids"]
    # the images are already in the cache: like with a DynamicCache, pixels are not passed again
    ours = greedy(model, {"input_ids": follow, "mm_token_type_ids": token_types}, cache, max_new_tokens=4)
    plain = greedy(model, {"input_ids": follow, "mm_token_type_ids": token_types, **kwargs}, max_new_tokens=4)
    assert torch.equal(ours.sequences, plain.sequences)
    for step, (a, b) in enumerate(zip(plain.scores, ours.scores, strict=True)):
        diff = (a - b).abs().max().item()
        print(f"step {step}: max logit difference {diff:.2e}")
        assert diff < 1e-5, f"step {step}: logits differ by {diff}"


def test_sampling_with_seed_matches_plain(models, images):
    model, processor = models("qwen2_5_vl")
    inputs = toy.chat_inputs(processor, [toy.message("user", images[0], "Say something.")])
    kwargs = dict(do_sample=True, top_k=20, temperature=1.3, max_new_tokens=10)
    torch.manual_seed(123)
    plain = model.generate(**inputs, **kwargs)
    cache = VLCache(model, store=CacheStore(), policy="full")
    torch.manual_seed(123)
    ours = model.generate(**inputs, past_key_values=cache, **kwargs)
    assert torch.equal(plain, ours)


@pytest.mark.parametrize("max_new_tokens", [1, 5])
def test_max_new_tokens(models, images, max_new_tokens):
    model, processor = models("qwen2_5_vl")
    inputs = toy.chat_inputs(processor, [toy.message("user", images[1], "Count.")])
    out = model.generate(
        **inputs,
        past_key_values=VLCache(model, store=CacheStore()),
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
    )
    assert out.shape[1] == inputs["input_ids"].shape[1] + max_new_tokens


class Collector(BaseStreamer):
    def __init__(self):
        self.chunks: list[torch.Tensor] = []
        self.ended = False

    def put(self, value):
        self.chunks.append(value.flatten())

    def end(self):
        self.ended = True


def test_streaming(models, images):
    model, processor = models("qwen2_5_vl")
    inputs = toy.chat_inputs(processor, [toy.message("user", images[3], "Stream.")])
    streamer = Collector()
    out = model.generate(
        **inputs, past_key_values=VLCache(model, store=CacheStore()), max_new_tokens=5, do_sample=False, streamer=streamer
    )
    assert streamer.ended
    assert torch.equal(torch.cat(streamer.chunks), out[0])


def test_batch_larger_than_one_is_a_clear_error(models, images):
    model, processor = models("qwen2_5_vl")
    texts = [
        processor.apply_chat_template([toy.message("user", images[0], q)], add_generation_prompt=True)
        for q in ("a?", "bb?")
    ]
    processor.tokenizer.padding_side = "left"
    inputs = processor(text=texts, images=[images[0], images[0]], padding=True, return_tensors="pt")
    with pytest.raises(VLCacheError, match="batch size 1"):
        model.generate(**inputs, past_key_values=VLCache(model, store=CacheStore()), max_new_tokens=2)


def test_direct_forward_returns_last_token_logits(models, images):
    model, processor = models("qwen2_5_vl")
    inputs = toy.chat_inputs(processor, [toy.message("user", images[0], images[1], "Forward.")])
    with torch.no_grad():
        plain = model(**inputs).logits[:, -1]
        ours = model(**inputs, past_key_values=VLCache(model, store=CacheStore(), policy="full")).logits[:, -1]
    torch.testing.assert_close(ours, plain, atol=1e-4, rtol=1e-4)


def test_text_only_prompt(models):
    model, processor = models("qwen2_5_vl")
    inputs = toy.chat_inputs(processor, [toy.message("user", "No pictures today.")])
    plain = greedy(model, inputs)
    cache = VLCache(model, store=CacheStore(), policy="none")
    ours = greedy(model, inputs, cache)
    assert torch.equal(plain.sequences, ours.sequences)
    assert cache.report.images == 0
