"""The selective prefill's pieces that mutation testing (issue 17) found unchecked: masks by hand, the dense
backend's attention against a hand-written softmax attention, the model's own eager kernel, the attention
switch's nesting and restore, buffers, prefix and moved-span filling, per-window plans and the layer loop's
counts. Expected values are hand-computed or come from an independent implementation written here
(`_reference_attention`: plain softmax(q·kᵀ·scale + mask)·v, grouped-query by head index)."""

from __future__ import annotations

import sys
import threading

import pytest
import torch

from vlcache_hf import attention
from vlcache_hf.attention import (
    BACKENDS,
    SELECTIVE_ATTENTION,
    DenseMaskSDPA,
    _active,
    _eager_attention,
    attention_mask_for,
    backend_for,
    register_backend,
    selective_attention,
    selective_attention_enabled,
)
from vlcache_hf.models import KVLayout, get_adapter
from vlcache_hf.prefill import DECODE_HEADROOM, LayerPlans, allocate_buffers, fill_moved, fill_prefix
from vlcache_hf.reuse import PrefixChunk
from vlcache_hf.store.entry import KVEntry


def _reference_attention(query, key, value, allowed, scale):
    """softmax(q kᵀ · scale, masked) v per head; query head h reads kv head h // (heads / kv_heads).
    Returns [batch, q, heads, d] like the backend."""
    groups = query.shape[1] // key.shape[1]
    key = key[:, torch.arange(query.shape[1]) // groups]
    value = value[:, torch.arange(query.shape[1]) // groups]
    scores = torch.einsum("bhqd,bhkd->bhqk", query.double(), key.double()) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.einsum("bhqk,bhkd->bhqd", scores.softmax(-1), value.double())
    return out.transpose(1, 2).to(query.dtype)


def _qkv(q_len=3, k_len=5, heads=4, kv_heads=2, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, heads, q_len, dim, generator=g), torch.randn(1, kv_heads, k_len, dim, generator=g),
            torch.randn(1, kv_heads, k_len, dim, generator=g))


def test_masks_by_hand():
    query = torch.tensor([0, 2, 4])
    plain = attention_mask_for(query, 5, None)
    assert plain.shape == (1, 1, 3, 5) and plain.dtype == torch.bool
    assert plain[0, 0].int().tolist() == [[1, 0, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    windowed = attention_mask_for(query, 5, None, window=2)  # the last 2 keys up to each query
    assert windowed[0, 0].int().tolist() == [[1, 0, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 1, 1]]
    padding = torch.tensor([False, False, True, True, True])  # two padded keys; a query always sees itself
    padded = attention_mask_for(query, 5, padding)
    assert padded[0, 0].int().tolist() == [[1, 0, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 1]]
    both = attention_mask_for(query, 5, padding, window=2)
    assert both[0, 0].int().tolist() == [[1, 0, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 1, 1]]
    everything = torch.arange(5)
    assert attention_mask_for(everything, 5, None) is None
    assert attention_mask_for(everything, 5, None, window=5) is None  # a window as long as the prompt cuts nothing
    assert attention_mask_for(everything, 5, None, window=4)[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [0, 1, 1, 1, 1]
    ]
    assert attention_mask_for(everything, 5, torch.ones(5, dtype=torch.bool))[0, 0].int().tolist() == torch.ones(5, 5).tril().int().tolist()
    backend = DenseMaskSDPA()
    assert torch.equal(backend.plan(query, 5, padding, 2), both)
    assert backend_for(torch.device("meta"), "flash_attention_2") is BACKENDS["dense-sdpa"] and backend.name == "dense-sdpa"


@pytest.mark.parametrize("scaling", [None, 0.5])
def test_dense_backend_attends_like_softmax_attention_with_grouped_heads(scaling):
    query, key, value = _qkv()
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    query_idx = torch.tensor([1, 3, 4])
    mask = attention_mask_for(query_idx, 5, None)
    out = DenseMaskSDPA().attend(None, query, key, value, mask, 0.0, scaling)
    assert out.shape == (1, 3, 4, 8) and out.is_contiguous()
    assert torch.allclose(out, _reference_attention(query, key, value, mask[0, 0], scale), atol=1e-5)
    # no plan: the whole prompt, causal
    query, key, value = _qkv(q_len=5)
    out = DenseMaskSDPA().attend(None, query, key, value, None, 0.0, scaling)
    assert torch.allclose(out, _reference_attention(query, key, value, torch.ones(5, 5, dtype=torch.bool).tril(), scale), atol=1e-5)
    query, key, value = _qkv(q_len=2, k_len=2)  # the shortest prompt that needs the causal flag
    out = DenseMaskSDPA().attend(None, query, key, value, None, 0.0, scaling)
    assert torch.allclose(out, _reference_attention(query, key, value, torch.ones(2, 2, dtype=torch.bool).tril(), scale), atol=1e-5)
    # one query and no plan: it sees every key (the last prompt token); through the registered function, as the
    # selective prefill calls it with its backend active
    query, key, value = _qkv(q_len=1)
    token = _active.set(DenseMaskSDPA())
    try:
        out, none = selective_attention(None, query, key, value, None, scaling=scaling)
    finally:
        _active.reset(token)
    assert none is None
    assert torch.allclose(out, _reference_attention(query, key, value, torch.ones(1, 5, dtype=torch.bool), scale), atol=1e-5)


def test_eager_models_keep_their_own_eager_kernel(models):
    model, _ = models("qwen2_5_vl")
    module = model.model.language_model.layers[0].self_attn
    text = model.config.text_config
    heads, kv_heads = text.num_attention_heads, text.num_key_value_heads
    query, key, value = _qkv(q_len=3, k_len=3, heads=heads, kv_heads=kv_heads, dim=text.hidden_size // heads)
    assert module.num_key_value_groups == heads // kv_heads > 1  # the model's own grouped-query layout
    causal = torch.ones(3, 3, dtype=torch.bool).tril()
    out, none = _eager_attention(module, query, key, value, None, 0.0, 0.25)
    assert none is None and torch.allclose(out, _reference_attention(query, key, value, causal, 0.25), atol=1e-5)
    mask = attention_mask_for(torch.tensor([0, 2]), 3, None)
    out2, _ = _eager_attention(module, query[:, :, :2], key, value, mask, 0.0, 0.25)
    assert torch.allclose(out2, _reference_attention(query[:, :, :2], key, value, mask[0, 0], 0.25), atol=1e-5)
    assert _eager_attention(torch.nn.Linear(2, 2), query, key, value, None, 0.0, 0.25) is None  # no eager kernel there

    # under a model loaded with eager attention, the registered function runs the family's own eager kernel and
    # returns its output as is (SDPA rounds differently in half precision)
    family = sys.modules[type(module).__module__]
    real_forward = family.eager_attention_forward
    returned = []

    def spy(*args, **kwargs):
        returned.append(real_forward(*args, **kwargs))
        return returned[-1]

    config = type("Config", (), {"_attn_implementation": "eager"})()
    try:
        family.eager_attention_forward = spy
        with selective_attention_enabled(config, BACKENDS["dense-sdpa"]):
            out3, _ = selective_attention(module, query[:, :, :2], key, value, mask, dropout=0.0, scaling=0.25)
        assert len(returned) == 1 and out3 is returned[0][0] and torch.allclose(out3, out2)
        selective_attention(module, query[:, :, :2], key, value, mask, dropout=0.0, scaling=0.25)  # outside: SDPA
        assert len(returned) == 1
    finally:
        family.eager_attention_forward = real_forward
    # the additive mask is in the query's dtype (bf16 here), as the model's own eager masks are
    q16, k16, v16 = query.bfloat16(), key.bfloat16(), value.bfloat16()
    additive = torch.zeros(1, 1, 3, 3, dtype=torch.bfloat16).masked_fill(~causal, torch.finfo(torch.bfloat16).min)
    expected16, _ = real_forward(module, q16, k16, v16, additive, scaling=0.25, dropout=0.0)
    got16, _ = _eager_attention(module, q16, k16, v16, None, 0.0, 0.25)
    assert got16.dtype == torch.bfloat16 and torch.equal(got16, expected16)
    # dropout reaches the kernel (a module in training mode with p = 1 drops every weight)
    module.train()
    try:
        dropped, _ = _eager_attention(module, query, key, value, None, 1.0, 0.25)
    finally:
        module.eval()
    assert dropped.abs().max() == 0


def test_the_attention_switch_nests_and_restores():
    config = type("Config", (), {"_attn_implementation": "sdpa"})()
    backend = DenseMaskSDPA()
    first = selective_attention_enabled(config, backend)
    second = selective_attention_enabled(config, backend)
    first.__enter__()
    assert config._attn_implementation == SELECTIVE_ATTENTION
    assert attention._replaced.get() == "sdpa" and attention._active.get() is backend
    second.__enter__()
    assert attention._replaced.get() == "sdpa"  # the model's own, not our switched name
    second.__exit__(None, None, None)
    assert config._attn_implementation == SELECTIVE_ATTENTION  # another prefill is still running on it
    assert attention._replaced.get() == "sdpa" and attention._active.get() is backend
    first.__exit__(None, None, None)
    assert config._attn_implementation == "sdpa" and id(config) not in attention._switched
    assert attention._replaced.get() is None and attention._active.get() is None
    with pytest.raises(RuntimeError), selective_attention_enabled(config, backend):
        raise RuntimeError("a layer failed")
    assert config._attn_implementation == "sdpa" and id(config) not in attention._switched

    seen = []

    def other_thread():
        seen.append((attention._replaced.get(), attention._active.get()))

    with selective_attention_enabled(config, backend):
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
    assert seen == [(None, None)]  # context-local: another thread's attention is its own


def test_register_backend():
    class Other(DenseMaskSDPA):
        name = "test-other"

    other = Other()
    try:
        assert register_backend(other) is other and BACKENDS["test-other"] is other
    finally:
        BACKENDS.pop("test-other", None)


def test_buffers_have_room_for_the_prompt_and_decoding():
    layout = KVLayout(num_layers=3, num_kv_heads=2, head_dim=4, dtype=torch.bfloat16)
    buffers = allocate_buffers(layout, 10, torch.device("cpu"))
    assert DECODE_HEADROOM == 256
    assert len(buffers) == 3
    for keys, values in buffers:
        for side in (keys, values):
            assert side.shape == (1, 2, 266, 4) and side.dtype == torch.bfloat16 and side.device.type == "cpu"
        assert keys.data_ptr() != values.data_ptr()
    assert len({keys.data_ptr() for keys, _ in buffers}) == 3  # every layer its own storage
    assert all(side.device.type == "meta" for pair in allocate_buffers(layout, 10, torch.device("meta")) for side in pair)


def _as_layers(block: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (keys, values) views of a [layers, 2, 1, kv_heads, rows, head_dim] block (writes reach the block)."""
    return [(block[layer, 0], block[layer, 1]) for layer in range(block.shape[0])]


def _kv(layers, tokens, start):
    """[layers, 2, kv_heads=1, tokens, head_dim=2] with row t of layer l, k/v s holding 1000·l + 100·s + start + t."""
    kv = torch.zeros(layers, 2, 1, tokens, 2)
    for layer in range(layers):
        for side in range(2):
            kv[layer, side, 0, :, :] = (1000 * layer + 100 * side + start + torch.arange(tokens, dtype=torch.float32))[:, None]
    return kv


def test_fill_prefix_copies_text_rows_and_image_parts():
    buffers = torch.full((2, 2, 1, 1, 12, 2), -1.0)
    text = KVEntry(_kv(2, 3, 500), torch.zeros(1, 3))  # text rows 0, 1, 5
    image = KVEntry(_kv(2, 6, 700), torch.zeros(1, 6))  # rows 2..4 are the image's rows 1..3
    fill_prefix(_as_layers(buffers), [PrefixChunk(torch.tensor([0, 1, 5]), text, ((2, 5, image, 1),))])
    got = buffers[:, :, 0, 0, :, 0]
    for layer in range(2):
        for side in range(2):
            base = 1000 * layer + 100 * side
            assert got[layer, side, :6].tolist() == [base + 500, base + 501, base + 701, base + 702, base + 703, base + 502]
            assert got[layer, side, 6:].eq(-1).all()
    # two chunks with a gap between them (rows 0..1 and 4..5, with 2..3 left for the selective prefill), the
    # second given first: each lands on its own rows and the gap is left as it was
    gapped = torch.full((2, 2, 1, 1, 7, 2), -1.0)
    later = KVEntry(_kv(2, 2, 900), torch.zeros(1, 2))
    fill_prefix(_as_layers(gapped), [PrefixChunk(torch.tensor([4, 5]), later, ()), PrefixChunk(torch.tensor([0, 1]), text, ())])
    assert gapped[1, 1, 0, 0, :, 0].tolist() == [1600, 1601, -1, -1, 2000, 2001, -1]
    # runs are grouped by their row count, not by any other size: a one-row run at 0 and a run at 2 (head_dim 2)
    # do not abut, so row 1 stays as it was
    apart = torch.full((2, 2, 1, 1, 5, 2), -1.0)
    fill_prefix(_as_layers(apart), [PrefixChunk(torch.tensor([0]), later, ()), PrefixChunk(torch.tensor([2, 3]), text, ())])
    assert apart[0, 0, 0, 0, :, 0].tolist() == [900, -1, 500, 501, -1]
    empty = torch.full((2, 2, 1, 1, 4, 2), -1.0)
    fill_prefix(_as_layers(empty), [PrefixChunk(torch.tensor([], dtype=torch.long), text, ((0, 2, image, 4),))])
    assert empty[0, 0, 0, 0, :, 0].tolist() == [704, 705, -1, -1]


def test_fill_moved_rerotates_keys_only_and_skips_the_entry_offset(models):
    model, _ = models("qwen2_5_vl")
    adapter = get_adapter(model)
    layers = model.config.text_config.num_hidden_layers
    kv_heads = model.config.text_config.num_key_value_heads
    head_dim = model.config.text_config.hidden_size // model.config.text_config.num_attention_heads
    g = torch.Generator().manual_seed(3)
    kv = torch.randn(layers, 2, kv_heads, 10, head_dim, generator=g)  # rows past the span, too
    stored = torch.arange(10, 20).expand(3, 10).clone()  # stored at 10..19 on all three axes
    entry = KVEntry(kv, stored)
    buffers = torch.zeros(layers, 2, 1, kv_heads, 8, head_dim)
    new = torch.arange(8).view(1, 1, 8).expand(3, 1, 8).clone()  # rows 3..6 now sit at 3..6
    fill_moved(adapter, _as_layers(buffers), entry, 2, 3, 7, new)  # entry rows 2..5 (stored at 12..15) into rows 3..6
    assert torch.equal(buffers[:, 1, 0, :, 3:7], kv[:, 1, :, 2:6])  # values are copied as they are
    assert buffers[:, :, :, :, :3].eq(0).all() and buffers[:, :, :, :, 7:].eq(0).all()
    # keys re-rotated by -9 on every axis: R(-9)·key equals what the model's rotary gives for positions 3..6
    # when applied to the key un-rotated from 12..15 (independent check via cos/sin of the model's rotary module)
    rotary = model.model.language_model.rotary_emb
    dummy = torch.zeros(1, 4, head_dim)

    def rotate(x, positions):
        cos, sin = rotary(dummy, positions[:, None, :])
        cos, sin = cos[0].unsqueeze(0), sin[0].unsqueeze(0)
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    unrotated = rotate(kv[:, 0, :, 2:6], -torch.arange(12, 16).expand(3, 4))
    expected = rotate(unrotated, torch.arange(3, 7).expand(3, 4))
    assert torch.allclose(buffers[:, 0, 0, :, 3:7], expected, atol=1e-4)
    same = torch.zeros_like(buffers)
    at_home = torch.arange(8).view(1, 1, 8).expand(3, 1, 8).clone() + 9  # rows 3..6 at 12..15: no rotation
    fill_moved(adapter, _as_layers(same), entry, 2, 3, 7, at_home)
    assert torch.equal(same[:, 0, 0, :, 3:7], kv[:, 0, :, 2:6]) and torch.equal(same[:, 1, 0, :, 3:7], kv[:, 1, :, 2:6])
    one_on = torch.zeros_like(buffers)
    fill_moved(adapter, _as_layers(one_on), entry, 2, 3, 7, at_home + 1)  # one position further on every axis: rotated
    expected = rotate(rotate(kv[:, 0, :, 2:6], -torch.arange(12, 16).expand(3, 4)), torch.arange(13, 17).expand(3, 4))
    assert torch.allclose(one_on[:, 0, 0, :, 3:7], expected, atol=1e-4) and not torch.allclose(expected, kv[:, 0, :, 2:6], atol=1e-2)


class _Adapter:
    def __init__(self, windows):
        self.windows = windows
        self.decoder_layers = [None] * len(windows)

    def attention_window(self, layer):
        return self.windows[layer]


class _CountingBackend(DenseMaskSDPA):
    name = "test-counting"

    def __init__(self):
        self.calls = []

    def plan(self, query_idx, num_keys, key_padding, window):
        self.calls.append((query_idx.tolist(), num_keys, window))
        return super().plan(query_idx, num_keys, key_padding, window)


def test_layer_plans_are_built_once_per_window_and_recompute_set():
    backend = _CountingBackend()
    plans = LayerPlans(_Adapter([None, 2, None, 2, 3]), 6, None, backend)
    plans.reset(torch.tensor([1, 4]))
    got = [plans.for_layer(i) for i in range(5)]
    assert backend.calls == [([1, 4], 6, None), ([1, 4], 6, 2), ([1, 4], 6, 3)]
    assert got[0] is got[2] and got[1] is got[3]
    assert got[1][0, 0].int().tolist() == [[1, 1, 0, 0, 0, 0], [0, 0, 0, 1, 1, 0]]
    plans.reset(torch.tensor([4]))
    plans.for_layer(3)
    assert backend.calls[-1] == ([4], 6, 2) and len(backend.calls) == 4


def test_a_shrinking_policy_runs_each_layer_on_its_nested_set(models, images):
    """CacheBlend recomputes every moved token on layers 0 and 1, then the 8 of 32 (ratio 0.25) whose values moved
    most: the per-layer counts by hand, the sets nested (each layer writes a subset of the previous one's rows)."""
    from helpers import greedy

    from vlcache_hf import CacheStore, VLCache
    from vlcache_hf.tools import toy

    model, processor = models("qwen2_5_vl")
    store = CacheStore()
    greedy(model, toy.chat_inputs(processor, [toy.message("user", "Look:", images[0], images[1], "?")]), VLCache(model, store=store))
    moved = toy.chat_inputs(processor, [toy.message("user", "A different, longer preamble:", images[1], images[0], "?")])
    cache = VLCache(model, store=store, policy="cacheblend", recompute_ratio=0.25)
    written = []
    for layer in cache.layers:
        original = layer.begin_write

        def begin_write(indices, capture_previous=False, _original=original):
            written.append((indices.clone(), capture_previous))
            return _original(indices, capture_previous)

        layer.begin_write = begin_write
    greedy(model, moved, cache, max_new_tokens=1)
    layers = model.config.text_config.num_hidden_layers
    total = cache.report.total_tokens  # the prompt; its last token runs after the selective prefill
    moved_counts = [32, 32] + [8] * (layers - 2)  # 2 images × 16 tokens moved
    assert cache.report.recomputed_per_layer == [total - 32 + m for m in moved_counts]
    assert [len(rows) for rows, _ in written] == [total - 1 - 32 + m for m in moved_counts]
    assert all(set(deep.tolist()) <= set(shallow.tolist()) for (shallow, _), (deep, _) in zip(written, written[1:], strict=False))
    assert [capture for _, capture in written] == [True] * layers  # cacheblend observes every layer's writes
    vlcache = VLCache(model, store=store, policy="vlcache", recompute_ratio=0.25)  # uniform budgets: 8 of 32 throughout
    greedy(model, moved, vlcache, max_new_tokens=1)
    assert vlcache.report.recomputed_per_layer == [total - 32 + 8] * layers


def test_left_padding_is_masked_in_the_selective_prefill(models, images):
    """Padded keys are never attended: a left-padded prompt whose moved tokens are all recomputed answers as plain
    `generate` does (attending the padding would change it)."""
    from helpers import greedy

    from vlcache_hf import CacheStore, VLCache
    from vlcache_hf.tools import toy

    model, processor = models("qwen2_5_vl")
    store = CacheStore()
    inputs = toy.chat_inputs(processor, [toy.message("user", "Three pads, then a question:", images[3], "Why?")])
    pad = processor.tokenizer.pad_token_id
    ids = torch.cat([torch.full((1, 3), pad), inputs["input_ids"]], dim=1)
    types = torch.cat([torch.zeros(1, 3, dtype=inputs["mm_token_type_ids"].dtype), inputs["mm_token_type_ids"]], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), inputs["attention_mask"]], 1)
    padded = {**inputs, "input_ids": ids, "attention_mask": mask, "mm_token_type_ids": types}
    greedy(model, toy.chat_inputs(processor, [toy.message("user", images[3], "?")]), VLCache(model, store=store))
    plain = greedy(model, padded)
    cache = VLCache(model, store=store, policy="first_k", recompute_ratio=1.0)
    ours = greedy(model, padded, cache)
    assert cache.report.kv_hits == 1 and cache.report.reused_tokens == 0
    assert torch.equal(plain.sequences, ours.sequences) and (plain.scores[0] - ours.scores[0]).abs().max() < 1e-4


class _Config:
    def __init__(self, implementation: str):
        self._attn_implementation = implementation


def test_own_implementation_is_what_the_switch_replaced_and_only_while_it_lasts():
    from vlcache_hf.attention import own_implementation

    config = _Config("eager")
    assert own_implementation(config) == "eager"
    with selective_attention_enabled(config, DenseMaskSDPA()):
        assert config._attn_implementation == SELECTIVE_ATTENTION
        assert own_implementation(config) == "eager"
        assert own_implementation(_Config("sdpa")) == "sdpa"  # another model's config: not switched
    assert own_implementation(config) == "eager" and config._attn_implementation == "eager"


def test_the_mask_for_a_switched_config_is_the_own_implementations_mask():
    """transformers calls the mask function with keywords; a config switched from sdpa gets sdpa's bool mask,
    one switched from eager eager's additive float mask, one with no mask function of its own None."""
    from transformers.masking_utils import causal_mask_function, eager_mask, sdpa_mask

    from vlcache_hf.attention import own_implementation_mask

    args = dict(batch_size=1, q_length=2, kv_length=5, q_offset=3, kv_offset=0, mask_function=causal_mask_function,
                attention_mask=None, allow_is_causal_skip=False, dtype=torch.float32, device="cpu")
    expected_bool = torch.tensor([[True, True, True, True, False], [True, True, True, True, True]])
    for implementation, own in (("sdpa", sdpa_mask), ("eager", eager_mask)):
        config = _Config(implementation)
        with selective_attention_enabled(config, DenseMaskSDPA()):
            got = own_implementation_mask(**args, config=config)
        want = own(**args, config=config)
        assert torch.equal(got, want)
        visible = got if got.dtype == torch.bool else got == 0
        assert torch.equal(visible[0, 0], expected_bool)  # row i sees keys 0..3+i (the cache holds 3 rows)
    config = _Config("flash-free-test")  # an implementation with no mask function
    with selective_attention_enabled(config, DenseMaskSDPA()):
        assert own_implementation_mask(**args, config=config) is None


def test_outside_a_selective_prefill_the_switched_config_runs_the_models_own_attention(models):
    """The eager path returns attention weights and SDPA's none: the call took the model's own implementation."""
    model, _ = models("qwen2_5_vl", "eager")
    module = model.model.language_model.layers[0].self_attn
    text = model.config.text_config
    heads, kv_heads, dim = text.num_attention_heads, text.num_key_value_heads, text.hidden_size // text.num_attention_heads
    query, key, value = _qkv(q_len=2, k_len=4, heads=heads, kv_heads=kv_heads, dim=dim)
    additive = torch.zeros(1, 1, 2, 4)
    additive[0, 0, 0, 3] = torch.finfo(torch.float32).min  # row 0 does not see key 3
    config = module.config
    with selective_attention_enabled(config, DenseMaskSDPA()):  # another thread's prefill switched it
        token = _active.set(None)  # this thread runs no selective prefill
        try:
            out, weights = selective_attention(module, query, key, value, additive, dropout=0.0, scaling=0.25)
        finally:
            _active.reset(token)
    assert weights is not None and weights.shape == (1, heads, 2, 4)  # eager's weights: its own kernel ran
    assert float(weights[0, :, 0, 3].abs().max()) == 0.0  # the mask it was given was applied
    assert torch.allclose(out, _reference_attention(query, key, value, additive[0, 0] == 0, 0.25), atol=1e-5)
