"""generate's modes that need more from the prefill forward than the last prompt token's logits.

Assisted and prompt-lookup decoding verify candidate tokens in the prefill forward itself (prompt + candidates,
one logit per candidate); `output_hidden_states` / `output_attentions` / `labels` read every prompt position.
Each is compared with the unmodified model's own `generate` / forward.
"""

from __future__ import annotations

import pytest
import torch
from helpers import greedy

from vlcache_hf import CacheStore, VLCache
from vlcache_hf.compat import with_cache
from vlcache_hf.tools import toy


def request(processor, images, preamble: str, order: list[int], question: str = "What is shown? Say it twice."):
    return toy.chat_inputs(processor, [toy.message("user", preamble, *[images[i] for i in order], question)])


def assert_equal_outputs(plain, ours, atol: float = 1e-4) -> None:
    assert torch.equal(plain.sequences, ours.sequences), (plain.sequences, ours.sequences)
    for step, (a, b) in enumerate(zip(plain.scores, ours.scores, strict=True)):
        assert (a - b).abs().max().item() < atol, f"step {step}"


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
@pytest.mark.parametrize("mode", ["assistant", "prompt_lookup"])
def test_candidate_decoding_equals_plain(models, images, family, mode):
    """Cold store (every token computed) and warm store (prefix and image K/V reused): both equal plain."""
    model, processor = models(family)
    if mode == "assistant":
        extra = {"assistant_model": toy.build_model(family, seed=1)}
    else:
        extra = {"prompt_lookup_num_tokens": 3}
    store = CacheStore()
    inputs = request(processor, images, "Look, look:", [0, 1])
    plain = greedy(model, inputs, max_new_tokens=8, **extra)
    for policy in ("full", "none"):  # "none" second: the warm store serves the exact repeat
        cache = VLCache(model, store=store, policy=policy, prefix_chunk_size=16)
        assert_equal_outputs(plain, greedy(model, inputs, cache, max_new_tokens=8, **extra))
        assert cache.report.total_tokens > inputs["input_ids"].shape[1]  # the candidates came with the prompt
    assert cache.report.prefix_tokens > 0 and cache.report.kv_hits == 2


def test_logits_to_keep_is_honoured(models, images):
    """A forward asking for the last n positions' logits gets them, equal to the plain forward's."""
    model, processor = models("qwen2_5_vl")
    inputs = request(processor, images, "Hi", [2])
    with torch.no_grad():
        plain = model(**inputs, logits_to_keep=5).logits
        cache = VLCache(model, store=CacheStore(), policy="full")
        ours = model(**inputs, logits_to_keep=5, **with_cache(model, cache)).logits
    assert ours.shape == plain.shape == (1, 5, plain.shape[-1])
    assert (plain - ours).abs().max() < 1e-4
    assert cache.report.fallback == ""  # the selective prefill ran, on all but the last 5 tokens


@pytest.mark.parametrize("flag", ["output_hidden_states", "output_attentions"])
def test_prefill_outputs_of_every_position_equal_plain(flag, images, encoder_counter):
    model = toy.build_model("qwen2_5_vl", attn_implementation="eager")  # attentions need the eager kernel
    processor = toy.build_processor("qwen2_5_vl")
    inputs = request(processor, images, "Hi", [3])
    plain = greedy(model, inputs, max_new_tokens=3, **{flag: True})
    store, counter = CacheStore(), encoder_counter(model)
    greedy(model, inputs, VLCache(model, store=store, policy="full"), max_new_tokens=1, **{flag: True})
    counter.calls = 0
    cache = VLCache(model, store=store, policy="full")
    ours = greedy(model, inputs, cache, max_new_tokens=3, **{flag: True})
    assert counter.calls == 0 and cache.report.encoder_hits == 1  # the encoder cache still serves
    assert_equal_outputs(plain, ours)
    field = "hidden_states" if flag == "output_hidden_states" else "attentions"
    first_plain, first_ours = getattr(plain, field)[0], getattr(ours, field)[0]  # the prefill step: every layer
    assert len(first_plain) == len(first_ours)
    for a, b in zip(first_plain, first_ours, strict=True):
        assert a.shape == b.shape and a.shape[-2] == inputs["input_ids"].shape[1]
        assert (a - b).abs().max() < 1e-4
    assert "plain prefill" in cache.report.fallback and flag in cache.report.fallback
    assert cache.report.recomputed_tokens == cache.report.total_tokens


def test_forward_with_labels_gives_the_plain_loss(models, images):
    model, processor = models("qwen2_5_vl")
    inputs = request(processor, images, "Hi", [4])
    labels = inputs["input_ids"].clone()
    with torch.no_grad():
        plain = model(**inputs, labels=labels)
        cache = VLCache(model, store=CacheStore(), policy="full")
        ours = model(**inputs, labels=labels, **with_cache(model, cache))
    assert torch.isfinite(plain.loss) and (plain.loss - ours.loss).abs() < 1e-5
    assert ours.logits.shape == plain.logits.shape
    assert "labels" in cache.report.fallback


@pytest.mark.parametrize("keep", ["all", "length", "tensor"])
def test_a_forward_asking_for_every_logit_gets_the_plain_forwards(models, images, keep):
    """`logits_to_keep` = 0 (all), ≥ the prompt's length, or an index tensor reads logits of positions the
    selective prefill never computes: such a forward runs as the model's own, on a warm store too."""
    model, processor = models("qwen2_5_vl")
    inputs = request(processor, images, "Every logit:", [5])
    length = inputs["input_ids"].shape[1]
    value = {"all": 0, "length": length, "tensor": torch.arange(length)}[keep]
    store = CacheStore()
    greedy(model, inputs, VLCache(model, store=store), max_new_tokens=1)  # the prompt's K/V is stored
    with torch.no_grad():
        plain = model(**inputs, logits_to_keep=value).logits
        cache = VLCache(model, store=store)
        ours = model(**inputs, logits_to_keep=value, **with_cache(model, cache)).logits
    assert ours.shape == plain.shape == (1, length, plain.shape[-1])
    assert (plain - ours).abs().max() < 1e-4
    assert "logits_to_keep" in cache.report.fallback and cache.report.reused_tokens == 0
