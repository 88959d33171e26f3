"""Selection policies (vlcache, first_k, random, cacheblend): exact at ratio 1, nested sets of the asked
size containing every fresh token, and cost that follows the sets (rows counted at the decoder layers)."""

from __future__ import annotations

import pytest
import torch
from helpers import greedy

from vlcache_hf import CacheStore, VLCache, toy
from vlcache_hf.compat import with_cache
from vlcache_hf.models import get_adapter
from vlcache_hf.selection import allocate_budgets
from vlcache_hf.selection.baselines import budget_tokens
from vlcache_hf.selection.profile import default_weights

SELECTIVE = ["vlcache", "first_k", "random", "cacheblend"]


def _moved(processor, images):
    first = toy.chat_inputs(processor, [toy.message("user", "Look:", images[0], images[1], "?")])
    moved = toy.chat_inputs(processor, [toy.message("user", "A different, longer preamble:", images[1], images[0], "?")])
    return first, moved


@pytest.mark.parametrize("policy", SELECTIVE)
def test_ratio_one_equals_full_and_plain(models, images, policy):
    model, processor = models("qwen2_5_vl")
    store = CacheStore()
    first, moved = _moved(processor, images)
    greedy(model, first, VLCache(model, store=store))
    plain = greedy(model, moved)
    full = greedy(model, moved, VLCache(model, store=store, policy="full", publish=False))
    cache = VLCache(model, store=store, policy=policy, recompute_ratio=1.0)
    ours = greedy(model, moved, cache)
    assert cache.report.kv_hits == 2 and cache.report.reused_tokens == 0
    assert torch.equal(plain.sequences, ours.sequences) and torch.equal(full.sequences, ours.sequences)
    assert (plain.scores[0] - ours.scores[0]).abs().max() < 1e-4


def _record_sets(cache: VLCache) -> list[torch.Tensor]:
    """The index sets each layer is told to write (wrapping the real method: nothing is replaced)."""
    sets: list[torch.Tensor] = []
    for layer in cache.layers:
        original = layer.begin_write

        def begin_write(indices, capture_previous=False, _original=original):
            sets.append(indices.clone())
            return _original(indices, capture_previous)

        layer.begin_write = begin_write
    return sets


def _expected_moved_counts(policy: str, moved: int, layers: int, ratio: float) -> list[int]:
    if policy == "vlcache":
        return allocate_budgets(default_weights(layers), moved, ratio)
    if policy == "cacheblend":
        return [moved, moved] + [budget_tokens(moved, ratio)] * (layers - 2)
    return [budget_tokens(moved, ratio)] * layers


@pytest.mark.parametrize("ratio", [0.05, 0.25])
@pytest.mark.parametrize("policy", SELECTIVE)
def test_sets_are_nested_sized_and_cost_follows_them(models, images, policy, ratio):
    model, processor = models("qwen2_5_vl")
    store = CacheStore()
    first, moved = _moved(processor, images)
    greedy(model, first, VLCache(model, store=store))
    computed: list[int] = []
    handles = [
        layer.register_forward_pre_hook(lambda m, args, kwargs: computed.append(args[0].shape[1]) if args else None, with_kwargs=True)
        for layer in get_adapter(model).decoder_layers
    ]
    cache = VLCache(model, store=store, policy=policy, recompute_ratio=ratio)
    sets = _record_sets(cache)
    model.generate(**moved, **with_cache(model, cache), max_new_tokens=1, do_sample=False)
    for handle in handles:
        handle.remove()
    report = cache.report
    layers = len(report.recomputed_per_layer)
    # FLOP accounting: the selective loop's layer calls ran exactly the reported rows, then the final
    # prompt token went through every layer (1 row each)
    assert computed[:layers] == [c - 1 for c in report.recomputed_per_layer] and computed[layers:] == [1] * layers
    assert [len(s) for s in sets] == computed[:layers]
    moved_tokens = 2 * toy.image_tokens(112)
    num_tokens = report.total_tokens - 1
    image_rows = {i for i, t in enumerate(moved["input_ids"][0, :num_tokens].tolist()) if t == model.config.image_token_id}
    fresh = set(range(num_tokens)) - image_rows
    for shallow, deep in zip(sets, sets[1:], strict=False):
        assert set(deep.tolist()) <= set(shallow.tolist())  # nested
    for layer_set in sets:
        assert fresh <= set(layer_set.tolist())  # fresh tokens at every layer
    got = [len(s) - len(fresh) for s in sets]
    assert got == _expected_moved_counts(policy, moved_tokens, layers, ratio)
    if policy in ("vlcache", "first_k", "random"):  # the budget is the mean over layers, within rounding
        assert abs(sum(got) / (layers * moved_tokens) - ratio) <= 1.0 / moved_tokens


def test_allocation_is_capped_monotone_and_averages_the_ratio():
    for weights in ([1, 1, 1, 1], [5, 5, 3, 1], [0.1, 9, 2, 0], [2, 3, 1, 4]):
        for moved in (7, 64, 1000):
            for ratio in (0.01, 0.05, 0.2, 0.7):
                counts = allocate_budgets(weights, moved, ratio)
                assert counts == sorted(counts, reverse=True) and max(counts) <= moved and counts[0] >= 1
                assert abs(sum(counts) / len(counts) - ratio * moved) <= 1.0 + 1e-9 or counts[0] == moved
    assert allocate_budgets([3, 2, 1], 10, 1.0) == [10, 10, 10]
    assert allocate_budgets([3, 2, 1], 10, 0.0) == [0, 0, 0]
