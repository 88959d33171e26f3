"""A chat turn's new text runs its attention over the cached prompt without per-group K/V copies on the CPU
(`attention.native_gqa_sdpa`, switched on around the prefill forward by the hooks), bitwise as the model's own.

References are independent of the code under test: transformers' own `sdpa_attention_forward` for the kernel,
plain `generate` and Hugging Face's own prefix caching for whole requests, and transformers' `repeat_kv` (observed, not replaced) for the copies.
"""

from __future__ import annotations

import gc
from types import SimpleNamespace

import pytest
import torch
import transformers.integrations.sdpa_attention as hf_sdpa
from helpers import RepeatKVCalls, greedy
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

from vlcache_hf import CacheStore, VLCache
from vlcache_hf.attention import SELECTIVE_ATTENTION, native_gqa_sdpa
from vlcache_hf.models import get_adapter
from vlcache_hf.tools import toy


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    head_dim=st.sampled_from([16, 32, 64, 80]),
    kv_heads=st.integers(1, 3),
    groups=st.integers(2, 5),
    queries=st.integers(2, 40),
    extra_keys=st.integers(0, 300),
    mask_kind=st.sampled_from(["causal", "padded", "additive"]),
    seed=st.integers(0, 2**16),
)
def test_native_gqa_is_bitwise_transformers_sdpa(dtype, head_dim, kv_heads, groups, queries, extra_keys, mask_kind, seed):
    generator = torch.Generator().manual_seed(seed)
    keys_len = queries + extra_keys

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(dtype)

    query, key, value = randn(2, kv_heads * groups, queries, head_dim), randn(2, kv_heads, keys_len, head_dim), randn(2, kv_heads, keys_len, head_dim)
    mask = torch.ones(queries, keys_len, dtype=torch.bool).tril(extra_keys)[None, None].repeat(2, 1, 1, 1)
    if mask_kind == "padded":
        mask[0, :, :, : min(3, extra_keys)] = False
    if mask_kind == "additive":
        mask = torch.where(mask, torch.zeros((), dtype=dtype), torch.finfo(dtype).min)
    module = SimpleNamespace(num_key_value_groups=groups, is_causal=True)  # the attributes the SDPA path reads
    expected, _ = hf_sdpa.sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
    ours = native_gqa_sdpa(module, query, key, value, mask, scaling=0.25, sliding_window=None)
    assert ours is not None and torch.equal(ours, expected)


def test_native_gqa_declines_what_transformers_does_otherwise():
    query, key = torch.randn(1, 4, 3, 16), torch.randn(1, 2, 5, 16)
    mask = torch.ones(3, 5, dtype=torch.bool).tril(2)[None, None]
    grouped, single = SimpleNamespace(num_key_value_groups=2), SimpleNamespace(num_key_value_groups=1)
    assert native_gqa_sdpa(grouped, query, key, key, mask) is not None
    assert native_gqa_sdpa(single, query[:, :2], key, key, mask) is None  # no groups: nothing is copied anyway
    assert native_gqa_sdpa(grouped, query[:, :, :1], key, key, mask[:, :, :1]) is None  # one query: packed by HF
    assert native_gqa_sdpa(grouped, query, key, key, None) is None  # no mask: HF uses native GQA itself
    assert native_gqa_sdpa(grouped, query, key, key, mask, dropout=0.1) is None
    assert native_gqa_sdpa(grouped, query, key, key, mask, softcap=30.0) is None
    assert native_gqa_sdpa(grouped, query, key, key, mask, position_bias=torch.zeros(1, 4, 3, 5)) is None
    assert native_gqa_sdpa(SimpleNamespace(), query[:, :2], key, key, mask) is None  # a module that groups no heads


def test_an_argument_native_gqa_does_not_reproduce_goes_to_transformers_own_sdpa():
    """Under the switched config the model's own SDPA path still sees every argument: transformers refuses a
    softcap, so the call must reach it (native GQA would silently drop it)."""
    from vlcache_hf.attention import _own_attention

    config = SimpleNamespace(_attn_implementation="sdpa")
    module = SimpleNamespace(num_key_value_groups=2, is_causal=True, config=config)
    query, key = torch.randn(1, 4, 3, 16), torch.randn(1, 2, 5, 16)
    mask = torch.ones(3, 5, dtype=torch.bool).tril(2)[None, None]
    output, _ = _own_attention(module, query, key, key, mask, dropout=0.0, scaling=0.25)
    assert torch.equal(output, hf_sdpa.sdpa_attention_forward(module, query, key, key, mask, scaling=0.25)[0])
    with pytest.raises(ValueError, match="softcap"):
        _own_attention(module, query, key, key, mask, dropout=0.0, scaling=0.25, softcap=30.0)


def _chat(processor, image, answer: str | None):
    messages = [toy.message("user", image, "What is on the picture?")]
    if answer is not None:
        messages += [toy.message("assistant", answer), toy.message("user", "And what colour is it, in a few words?")]
    return toy.chat_inputs(processor, messages)


def hf_prefix_caching(model, inputs, prefix: int, max_new_tokens: int):
    """Hugging Face's own prefix caching, the independent reference of a chat turn: a `DynamicCache` filled by the
    model's forward over the first `prefix` tokens, then `generate` over the whole prompt with it."""
    cache = DynamicCache(config=model.config)
    per_token = ("input_ids", "attention_mask", "mm_token_type_ids")
    prefix_inputs = {name: value[:, :prefix] if name in per_token else value for name, value in inputs.items()}
    with torch.no_grad():
        model(**prefix_inputs, past_key_values=cache, use_cache=True)
    rest = {name: value for name, value in inputs.items() if name not in ("pixel_values", "image_grid_thw", "image_sizes")}
    return greedy(model, rest, cache, max_new_tokens=max_new_tokens)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava", "qwen3_vl"])
def test_a_chat_turn_copies_no_kv_and_is_bitwise_hf_prefix_caching_in_bf16(family, images, monkeypatch):
    model, processor = toy.build_model(family, dtype=torch.bfloat16), toy.build_processor(family)
    config = get_adapter(model).attention_config()
    assert config.num_attention_heads > config.num_key_value_heads  # grouped-query attention
    store = CacheStore()
    greedy(model, _chat(processor, images[0], None), VLCache(model, store=store), max_new_tokens=1)
    turn2 = _chat(processor, images[0], "A picture.")

    counter = RepeatKVCalls(monkeypatch)
    cache = VLCache(model, store=store)
    ours = greedy(model, turn2, cache, max_new_tokens=3)
    # the turn's new text was computed by the model's forward (several tokens), and it copied no K/V
    assert cache.report.recomputed_tokens > 1 and counter.calls == 0
    assert config._attn_implementation == "sdpa"  # switched back after the forward
    counter.calls = 0
    reference = hf_prefix_caching(model, turn2, cache.report.prefix_tokens, max_new_tokens=3)
    assert counter.calls > 0  # transformers' own forward of the same tokens copies K/V per group
    assert torch.equal(ours.sequences, reference.sequences)
    assert all(torch.equal(a, b) for a, b in zip(ours.scores, reference.scores, strict=True))
    assert torch.equal(ours.sequences, greedy(model, turn2, max_new_tokens=3).sequences)  # and plain generate's tokens


def _raise_in_forward(model, error: BaseException):
    """A pre-hook on the last decoder layer that raises `error` on a forward of several tokens (the tail)."""

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] > 1:
            raise error

    return get_adapter(model).decoder_layers[-1].register_forward_pre_hook(hook, with_kwargs=True)


def test_a_failed_or_interrupted_chat_turn_gives_the_model_its_own_attention_back(images):
    model, processor = toy.build_model("qwen2_5_vl"), toy.build_processor("qwen2_5_vl")
    config = get_adapter(model).attention_config()
    store = CacheStore()
    greedy(model, _chat(processor, images[1], None), VLCache(model, store=store), max_new_tokens=1)
    turn2 = _chat(processor, images[1], "A picture.")

    handle = _raise_in_forward(model, RuntimeError("layer failed"))
    try:
        with pytest.raises(RuntimeError, match="layer failed"):
            greedy(model, turn2, VLCache(model, store=store), max_new_tokens=1)
    finally:
        handle.remove()
    assert config._attn_implementation == "sdpa"

    def interrupted() -> None:
        handle = _raise_in_forward(model, KeyboardInterrupt())
        try:
            greedy(model, turn2, VLCache(model, store=store), max_new_tokens=1)
        except KeyboardInterrupt:
            pass
        finally:
            handle.remove()
        # a KeyboardInterrupt skips torch's always-called hooks: the switch stands while the request's cache lives
        assert config._attn_implementation == SELECTIVE_ATTENTION

    interrupted()
    gc.collect()
    assert config._attn_implementation == "sdpa"
    plain = greedy(model, turn2, max_new_tokens=2)
    assert torch.equal(greedy(model, turn2, VLCache(model, store=store), max_new_tokens=2).sequences, plain.sequences)


def test_a_forward_of_the_model_while_switched_is_bitwise_its_own(images, monkeypatch):
    """While a chat turn's forward has the attention switched, another forward of the same model (another
    thread's) reaches the switched config too: it gets native GQA, and exactly the logits it gets unswitched."""
    from vlcache_hf.attention import native_gqa_forward

    model, processor = toy.build_model("qwen2_5_vl", dtype=torch.bfloat16), toy.build_processor("qwen2_5_vl")
    config = get_adapter(model).attention_config()
    inputs = _chat(processor, images[2], "A picture.")
    inputs["attention_mask"][0, :2] = 0  # padding: transformers hands SDPA a mask
    with torch.no_grad():
        own = model(**inputs).logits
    counter = RepeatKVCalls(monkeypatch)

    class Owner:
        pass

    owner = Owner()
    release = native_gqa_forward(config, torch.device("cpu"), owner)
    assert release is not None and config._attn_implementation == SELECTIVE_ATTENTION
    with torch.no_grad():
        switched = model(**inputs).logits
    release()
    release()  # once only: a second call switches nothing back twice
    assert config._attn_implementation == "sdpa" and counter.calls == 0
    assert torch.equal(switched, own)
    assert native_gqa_forward(config, torch.device("cuda"), owner) is None  # nothing switched off the CPU
    assert config._attn_implementation == "sdpa"
