"""`coverage-shift`: after each layer, the moved tokens that layer did not recompute get the mean K/V deviation
measured on their image's recomputed tokens. Expected values are built by hand (values) or from the model's own
rotary module (keys), and the policy must never touch a fresh row, a recomputed row or another image's rows."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_same_as_plain, greedy

from vlcache_hf import CacheStore, VLCache, VLCacheError
from vlcache_hf.models import get_adapter
from vlcache_hf.selection import POLICIES, CoverageShiftPolicy, make_policy
from vlcache_hf.selection.base import LayerObservation, ReusedSpan, SelectionContext
from vlcache_hf.selection.shift import shift_unrecomputed_rows
from vlcache_hf.tools import toy


def _ctx(num_tokens, spans, fresh, positions=None):
    mask = torch.zeros(num_tokens, dtype=torch.bool)
    mask[fresh] = True
    return SelectionContext(num_tokens, 2, mask, tuple(ReusedSpan(a, b) for a, b in spans), positions=positions)


def test_values_shift_by_the_mean_deviation_of_their_own_image_only():
    heads, dim = 2, 3
    values = torch.zeros(1, heads, 12, dim)
    keys = torch.zeros(1, heads, 12, dim)
    ctx = _ctx(12, [(2, 6), (7, 11)], fresh=[0, 1, 6, 11])
    index = torch.tensor([0, 3, 4, 6, 11])  # recomputed: fresh 0, 6, 11 and image one's 3 and 4; image two: none
    old = torch.full((1, heads, 5, dim), 7.0)  # what was stored (the same for the two image tokens)
    new = old.clone()
    new[0, :, 0] = 100.0  # a fresh token's "deviation" (its old row held nothing): must be ignored
    new[0, :, 1] += 1.0  # token 3 moved by 1, token 4 by 3: image one's mean deviation is 2
    new[0, :, 2] += 3.0
    observation = LayerObservation(0, index, new.clone(), new, old.clone(), old)
    shifted = shift_unrecomputed_rows(None, keys, values, ctx, observation, {"values": 0.5})
    assert shifted == 2  # rows 2 and 5
    expected = torch.zeros(12)
    expected[[2, 5]] = 0.5 * 2.0
    assert torch.equal(values[0, 0, :, 0], expected) and torch.equal(values[0, 1, :, 2], expected)
    assert keys.eq(0).all()  # keys not asked for
    assert shift_unrecomputed_rows(None, keys, values, ctx, observation, {"values": 0.0}) == 0  # scale 0: nothing
    with pytest.raises(ValueError, match="unknown shift parts"):
        shift_unrecomputed_rows(None, keys, values, ctx, observation, {"queries": 1.0})
    with pytest.raises(ValueError, match="positions"):
        shift_unrecomputed_rows(None, keys, values, ctx, observation, {"keys": 1.0})


def test_keys_shift_is_rotated_back_from_each_measured_token_and_forward_to_each_corrected_one(models):
    model, _ = models("qwen2_5_vl")
    adapter = get_adapter(model)
    text = model.config.text_config
    heads, dim = text.num_key_value_heads, text.hidden_size // text.num_attention_heads
    rotary = model.model.language_model.rotary_emb

    def rotate(x, positions):  # the model's own rotary at M-RoPE positions [3, n] (independent of the library)
        cos, sin = rotary(torch.zeros(1, 1, dim), positions[:, None, :])
        cos, sin = cos[0], sin[0]
        half = dim // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    positions = torch.stack([torch.full((10,), 4), torch.arange(10) // 3 + 4, torch.arange(10) % 3 + 4])  # an image's grid
    positions[:, 0] = torch.tensor([0, 0, 0])
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(heads, 2, dim, generator=g)  # un-rotated deviations of the two recomputed tokens
    index = torch.tensor([0, 2, 5])  # 0 fresh; 2 and 5 of the image [1, 10)
    old = torch.randn(1, heads, 3, dim, generator=g)  # what was stored
    new = old.clone()
    new[0, :, 1:] += torch.stack([rotate(raw[:, i : i + 1], positions[:, [p]])[:, 0] for i, p in enumerate((2, 5))], dim=1)
    keys, values = torch.zeros(1, heads, 10, dim), torch.zeros(1, heads, 10, dim)
    ctx = _ctx(10, [(1, 10)], fresh=[0], positions=positions)
    shift_unrecomputed_rows(adapter, keys, values, ctx, LayerObservation(0, index, new, new.clone(), old, old.clone()), {"keys": 0.5})
    rows = torch.tensor([1, 3, 4, 6, 7, 8, 9])
    expected = rotate((0.5 * raw.mean(dim=1, keepdim=True)).expand(-1, len(rows), -1), positions[:, rows])
    assert torch.allclose(keys[0][:, rows], expected, atol=1e-5)
    assert keys[0][:, [0, 2, 5]].eq(0).all() and values.eq(0).all()


def test_policy_settings_are_checked_and_registered():
    assert POLICIES["coverage-shift"] is CoverageShiftPolicy
    policy = make_policy("coverage-shift", 0.05)
    assert policy.needs_observation and policy.shift_scales == {"keys": 0.5, "values": 1.0}
    assert make_policy("coverage", 0.05).shift_scales == {}  # other policies shift nothing
    for bad in (-0.1, 1.5, True, "half"):
        with pytest.raises(VLCacheError, match="scale"):
            CoverageShiftPolicy(0.05, key_scale=bad)


def test_exact_requests_are_untouched_and_a_moved_request_changes_only_unrecomputed_image_rows(models, images):
    model, processor = models("qwen2_5_vl")
    first = toy.chat_inputs(processor, [toy.message("user", images[0], images[1], "What is shown?")])
    store = CacheStore()
    greedy(model, first, VLCache(model, store=store))
    assert_same_as_plain(model, first, lambda: VLCache(model, store=store, policy="coverage-shift", recompute_ratio=0.1))
    moved = toy.chat_inputs(processor, [toy.message("user", "Now:", images[1], images[0], "What is shown?")])
    caches = {}
    for name in ("coverage", "coverage-shift"):
        cache = VLCache(model, store=store, policy=name, recompute_ratio=0.1)
        greedy(model, moved, cache, max_new_tokens=1)
        caches[name] = cache
    assert caches["coverage-shift"].report.moved_tokens > 0
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    ids = moved["input_ids"][0]
    prompt = len(ids) - 1  # the last prompt token is the model's own forward's (it attends to shifted K/V)
    is_image = (ids[:prompt] == image_id)
    changed_rows = set()
    for a, b in zip(caches["coverage"].layers, caches["coverage-shift"].layers, strict=True):
        for x, y in ((a.keys, b.keys), (a.values, b.values)):
            differs = (x[0, :, :prompt] != y[0, :, :prompt]).any(dim=(0, 2))
            assert not differs[~is_image].any()  # text rows: never shifted (and computed alike)
            changed_rows |= set(differs.nonzero().flatten().tolist())
    assert changed_rows and all(bool(is_image[r]) for r in changed_rows)


def test_every_family_keeps_exact_requests_exact_and_shifts_moved_images(family, models, images):
    """LLaVA's 1-D RoPE, Qwen's M-RoPE and Qwen3-VL's deepstack: an exact repeat equals plain `generate`, and a
    moved request shifts image rows only (the shift's rotation comes from each family's own rotary)."""
    model, processor = models(family)
    first = toy.chat_inputs(processor, [toy.message("user", images[0], images[1], "What is shown?")])
    store = CacheStore()
    greedy(model, first, VLCache(model, store=store))
    assert_same_as_plain(model, first, lambda: VLCache(model, store=store, policy="coverage-shift", recompute_ratio=0.1))
    moved = toy.chat_inputs(processor, [toy.message("user", "Now:", images[1], images[0], "What is shown?")])
    plain_cache = VLCache(model, store=store, policy="coverage", recompute_ratio=0.1)
    shifted_cache = VLCache(model, store=store, policy="coverage-shift", recompute_ratio=0.1)
    greedy(model, moved, plain_cache, max_new_tokens=1)
    out = greedy(model, moved, shifted_cache, max_new_tokens=1)
    assert shifted_cache.report.moved_tokens > 0 and torch.isfinite(out.scores[0]).all()
    prompt = moved["input_ids"].shape[1] - 1
    changed = sum(int((a.values[0, :, :prompt] != b.values[0, :, :prompt]).any(dim=(0, 2)).sum())
                  for a, b in zip(plain_cache.layers, shifted_cache.layers, strict=True))
    assert 0 < changed  # some moved rows were corrected


def test_shifted_rows_never_reach_the_store(models, images):
    """A moved request publishes what it computed exactly; the rows `coverage-shift` corrected are approximate,
    so the store must hold byte for byte what `coverage` (no correction) leaves there, and an exact repeat of the
    first request still equals plain `generate` afterwards."""
    model, processor = models("qwen2_5_vl")
    first = toy.chat_inputs(processor, [toy.message("user", images[0], images[1], "What is shown?")])
    moved = toy.chat_inputs(processor, [toy.message("user", "Now:", images[1], images[0], images[2], "What is shown?")])
    contents = {}
    for name in ("coverage", "coverage-shift"):
        store = CacheStore()
        greedy(model, first, VLCache(model, store=store))
        cache = VLCache(model, store=store, policy=name, recompute_ratio=0.1)
        greedy(model, moved, cache, max_new_tokens=1)
        assert cache.report.moved_tokens > 0
        tier = store.tiers[0]
        contents[name] = {key: tier.get(key).tensors for key in tier.keys()}
        assert_same_as_plain(model, first, lambda store=store: VLCache(model, store=store))
    assert contents["coverage"].keys() == contents["coverage-shift"].keys() and len(contents["coverage"]) > 0
    for key, tensors in contents["coverage"].items():
        other = contents["coverage-shift"][key]
        assert tensors.keys() == other.keys() and all(torch.equal(tensors[n], other[n]) for n in tensors), key
