"""The prompt's fresh tail — the text after the last row the store or an image holds — is computed by the model's
own forward, in one pass over the weights with the last token, and published once that forward returned.

Expected counts come from the prompts' own lengths and from counting real decoder-layer calls (a forward hook,
nothing mocked); expected outputs from plain `generate` on the same model.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_same_as_plain, greedy

from vlcache_hf import CacheStore, VLCache
from vlcache_hf.models import get_adapter
from vlcache_hf.tools import toy


class LayerCalls:
    """How many tokens each call of decoder layer 0 ran on (the model's own forward and the selective prefill
    both go through the layer module)."""

    def __init__(self, model):
        self.tokens: list[int] = []
        layer = get_adapter(model).decoder_layers[0]
        self._handle = layer.register_forward_pre_hook(self._seen, with_kwargs=True)

    def _seen(self, module, args, kwargs) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        self.tokens.append(int(hidden.shape[1]))

    def close(self) -> None:
        self._handle.remove()


def _chat(processor, image, answer: str | None, question: str):
    messages = [toy.message("user", image, "What is on the picture?")]
    if answer is not None:
        messages += [toy.message("assistant", answer), toy.message("user", question)]
    return toy.chat_inputs(processor, messages)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_a_chat_turn_is_one_pass_over_its_new_tokens(models, images, family):
    model, processor = models(family)
    store = CacheStore()
    turn1 = _chat(processor, images[0], None, "")
    calls = LayerCalls(model)
    try:
        greedy(model, turn1, VLCache(model, store=store), max_new_tokens=1)
    finally:
        calls.close()
    # a request that reuses nothing is computed from row 0 in one selective call (bit-exact in half precision:
    # tests/test_key_paths.py), its last token by the model's forward
    assert calls.tokens == [turn1["input_ids"].shape[1] - 1, 1]
    turn2 = _chat(processor, images[0], "A picture.", "And its colour?")
    total1, total2 = turn1["input_ids"].shape[1], turn2["input_ids"].shape[1]
    assert torch.equal(turn2["input_ids"][0, :total1], turn1["input_ids"][0])  # turn 1 is turn 2's prefix

    calls = LayerCalls(model)
    try:
        cache = VLCache(model, store=store)
        out = greedy(model, turn2, cache, max_new_tokens=1)
    finally:
        calls.close()
    # turn 1 published all its rows but the last: turn 2 computes the rest, all at once, in the model's forward
    new_rows = total2 - (total1 - 1)
    assert calls.tokens == [new_rows]
    assert cache.report.prefix_tokens == total1 - 1
    assert cache.report.recomputed_per_layer == [new_rows] * get_adapter(model).kv_layout.num_layers
    plain = greedy(model, turn2, max_new_tokens=1)
    assert torch.equal(out.sequences, plain.sequences)
    assert (out.scores[0] - plain.scores[0]).abs().max() < 1e-4


def test_rows_the_models_forward_computed_are_published_for_the_next_request(models, images):
    model, processor = models("qwen2_5_vl")
    store = CacheStore()
    turn2 = _chat(processor, images[1], "A picture.", "And its colour?")
    assert_same_as_plain(model, turn2, lambda: VLCache(model, store=store, prefix_chunk_size=8))
    total = turn2["input_ids"].shape[1]
    calls = LayerCalls(model)
    try:
        repeat = VLCache(model, store=store, prefix_chunk_size=8)
        out = greedy(model, turn2, repeat, max_new_tokens=1)
    finally:
        calls.close()
    # every row but the last came from the store, the text after the image included
    assert repeat.report.prefix_tokens == total - 1
    assert calls.tokens == [1]  # the repeat's prefill forward: the last token alone
    plain = greedy(model, turn2, max_new_tokens=1)
    assert torch.equal(out.sequences, plain.sequences)
    assert (out.scores[0] - plain.scores[0]).abs().max() < 1e-4


def test_a_direct_forward_still_hands_the_model_the_last_token_alone(models, images):
    """Without `logits_to_keep` a caller may read every logit the forward returns: it gets the last token's."""
    model, processor = models("qwen2_5_vl")
    inputs = _chat(processor, images[2], "A picture.", "And its colour?")
    calls = LayerCalls(model)
    try:
        with torch.no_grad():
            logits = model(**inputs, past_key_values=VLCache(model, store=CacheStore())).logits
    finally:
        calls.close()
    assert logits.shape[1] == 1 and calls.tokens[-1] == 1
