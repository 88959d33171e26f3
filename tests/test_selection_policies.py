"""Selection policies (vlcache, first_k, random, cacheblend): exact at ratio 1, nested sets of the asked
size containing every fresh token, and cost that follows the sets (rows counted at the decoder layers)."""

from __future__ import annotations

import pytest
import torch
from helpers import greedy

from vlcache_hf import CacheStore, VLCache, VLCacheError
from vlcache_hf.compat import with_cache
from vlcache_hf.models import get_adapter
from vlcache_hf.selection import (
    POLICIES,
    CacheBlendPolicy,
    CoveragePolicy,
    FirstTokensPolicy,
    LayerObservation,
    LayerProfile,
    RandomPolicy,
    ReusedSpan,
    SelectionContext,
    SelectionPolicy,
    StratifiedPolicy,
    VLCachePolicy,
    allocate_budgets,
    make_policy,
    register_policy,
)
from vlcache_hf.selection.baselines import budget_tokens, split_over_spans
from vlcache_hf.selection.coverage import k_center_picks
from vlcache_hf.tools import toy

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


def _expected_moved_counts(policy: str, layers: int, ratio: float) -> list[int]:
    """Moved tokens per layer for the 2 × 16 moved image tokens, by hand: round(0.05 × 32) = 2, 0.25 × 32 = 8
    (vlcache's default allocation is uniform); cacheblend recomputes all 32 at layers 0 and 1."""
    per_layer = {0.05: 2, 0.25: 8}[ratio]
    if policy == "cacheblend":
        return [32, 32] + [per_layer] * (layers - 2)
    return [per_layer] * layers


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
    # prompt token went through every layer (1 row each): with moved images the selective prefill runs anyway,
    # so the text after them rides along in it rather than in the model's forward
    assert computed[:layers] == [c - 1 for c in report.recomputed_per_layer] and computed[layers:] == [1] * layers
    assert [len(s) for s in sets] == computed[:layers]
    moved_tokens = 2 * toy.image_tokens(112)
    assert moved_tokens == 32
    num_tokens = report.total_tokens - 1
    image_rows = {i for i, t in enumerate(moved["input_ids"][0, :num_tokens].tolist()) if t == model.config.image_token_id}
    fresh = set(range(num_tokens)) - image_rows
    for shallow, deep in zip(sets, sets[1:], strict=False):
        assert set(deep.tolist()) <= set(shallow.tolist())  # nested
    for layer_set in sets:
        assert fresh <= set(layer_set.tolist())  # fresh tokens at every layer
    got = [len(s) - len(fresh) for s in sets]
    assert got == _expected_moved_counts(policy, layers, ratio)
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


def test_allocation_hand_computed_cases():
    """k_l = min(moved, c · w_l) with mean k_l = ratio · moved, worked out by hand."""
    assert allocate_budgets([4, 4, 2, 2], 12, 0.25) == [4, 4, 2, 2]  # target 12 = c · 12 → c = 1
    assert allocate_budgets([10, 1, 1, 0], 10, 0.5) == [10, 5, 5, 0]  # target 20: 10 (capped) + 2c → c = 5
    assert allocate_budgets([1, 3, 2, 2], 8, 0.25) == [2, 2, 2, 2]  # made non-increasing: [1, 1, 1, 1]
    assert allocate_budgets([1, 1, 1, 1], 100, 0.001) == [1, 0, 0, 0]  # round(0.1) = 0, but layer 0 gets ≥ 1


# A hand-built layout for the policies' own choices: 20 tokens, moved spans [4, 12) and [14, 18), the rest fresh.
FRESH = [0, 1, 2, 3, 12, 13, 18, 19]
MOVED = [*range(4, 12), *range(14, 18)]


def _context(num_layers: int = 4, reused_keys=None) -> SelectionContext:
    fresh = torch.zeros(20, dtype=torch.bool)
    fresh[FRESH] = True
    return SelectionContext(20, num_layers, fresh, (ReusedSpan(4, 12), ReusedSpan(14, 18)), reused_keys=reused_keys)


def _observation(layer_idx: int, current: torch.Tensor, key_diff: dict[int, float], value_diff: dict[int, float]):
    """New vs old K/V of `current` differing by one element per token: token t's deviation is exactly
    sqrt(key_diff[t]² + value_diff[t]²). Fresh tokens get a huge deviation: a policy must never rank them."""
    shape = (1, 2, current.numel(), 8)
    old_keys, old_values = torch.randn(shape), torch.randn(shape)
    new_keys, new_values = old_keys.clone(), old_values.clone()
    for row, token in enumerate(current.tolist()):
        new_keys[0, 1, row, 3] += 100.0 if token in FRESH else key_diff.get(token, 0.0)
        new_values[0, 0, row, 5] += 100.0 if token in FRESH else value_diff.get(token, 0.0)
    return LayerObservation(layer_idx, current, new_keys, new_values, old_keys, old_values)


def _sorted(indices: torch.Tensor) -> list[int]:
    return sorted(indices.tolist())


def test_first_k_picks_the_first_tokens_of_each_span_in_proportion():
    # 0.25 × 12 moved = 3 tokens, split 8 : 4 → 2 from the first span, 1 from the second
    chosen = FirstTokensPolicy(0.25).initial_set(_context())
    assert _sorted(chosen) == sorted(FRESH + [4, 5, 14])


def test_random_is_seeded_sized_and_within_the_moved_tokens():
    ctx = _context()
    a, b = RandomPolicy(0.25, seed=0).initial_set(ctx), RandomPolicy(0.25, seed=0).initial_set(ctx)
    other = RandomPolicy(0.25, seed=1).initial_set(ctx)
    assert torch.equal(a, b)  # deterministic for a seed
    for chosen in (a, other):
        picked = set(chosen.tolist()) - set(FRESH)
        assert set(FRESH) <= set(chosen.tolist()) and len(chosen) == len(set(chosen.tolist()))
        assert len(picked) == 3 and picked <= set(MOVED)
    assert set(a.tolist()) != set(other.tolist())  # the seed matters (seeds 0 and 1 draw different tokens)


def test_cacheblend_keeps_the_largest_value_deviations_from_layer_two():
    ctx = _context()
    policy = CacheBlendPolicy(0.25)
    current = torch.tensor(sorted(policy.initial_set(ctx).tolist()))
    assert current.tolist() == list(range(20))  # every moved token at layers 0 and 1
    assert policy.after_layer(0, ctx, current, _observation(0, current, {}, {5: 9.0})) is current
    # values decide (keys are ignored: token 7's key moved most); budget 3 → tokens 5, 14, 6
    values = {4: 0.1, 5: 3.0, 6: 1.0, 8: 0.05, 14: 2.0, 15: 0.5}
    kept = policy.after_layer(1, ctx, current, _observation(1, current, {7: 50.0}, values))
    assert _sorted(kept) == sorted(FRESH + [5, 6, 14])


def _profiled_vlcache(ratio: float) -> VLCachePolicy:
    # remaining error [4, 4, 2, 2] over 12 moved tokens at 0.25 → budgets [4, 4, 2, 2] (see the allocation test)
    profile = LayerProfile("fp", 4, [4.0, 4.0, 2.0, 2.0], [0.0, 2.0, 0.0, 2.0], 4.0, 0, 1, "test")
    return VLCachePolicy(ratio, profile=profile)


def test_vlcache_starts_with_the_earliest_tokens_of_every_span():
    policy = _profiled_vlcache(0.25)
    chosen = policy.initial_set(_context())
    assert policy.last_budgets == [4, 4, 2, 2]
    # relative offsets: 4 → 0, 14 → 0, 5 → 1/8, then 6 and 15 tie at 1/4 and the earlier token wins
    assert _sorted(chosen) == sorted(FRESH + [4, 5, 6, 14])


def test_stratified_starts_from_the_centres_of_equal_strata_of_every_span():
    profile = LayerProfile("fp", 4, [4.0, 4.0, 2.0, 2.0], [0.0, 2.0, 0.0, 2.0], 4.0, 0, 1, "test")
    policy = StratifiedPolicy(0.25, profile=profile)
    chosen = policy.initial_set(_context())
    assert policy.last_budgets == [4, 4, 2, 2]
    # 4 tokens over spans of 8 and 4: 8·4/12 = 2.67 and 1.33 → 2 + 1, the larger remainder (span 1) gets the 4th.
    # Span [4, 12), 3 strata of 8/3: centres at 4/3, 4, 20/3 → offsets 1, 4, 6 → tokens 5, 8, 10.
    # Span [14, 18), 1 stratum of 4: centre at 2 → token 16.
    assert _sorted(chosen) == sorted(FRESH + [5, 8, 10, 16])
    assert POLICIES["stratified"] is StratifiedPolicy


def test_vlcache_keeps_the_largest_deviation_weighted_by_what_follows():
    ctx = _context()
    policy = _profiled_vlcache(0.25)
    current = torch.tensor(sorted(policy.initial_set(ctx).tolist()))
    assert policy.after_layer(0, ctx, current, _observation(0, current, {}, {})) is current  # budget 4 → 4
    # score = sqrt(|Δk|² + |Δv|²) × (20 − t) / 20:  4 → 0.1·16/20 = 0.08,  5 → 3·15/20 = 2.25,
    # 6 → sqrt(0.6² + 0.8²)·14/20 = 0.7,  14 → 2·6/20 = 0.6; budget 2 keeps 5 and 6
    # (largest raw deviation would keep 5 and 14; keys only: 5 and 14; smallest first: 4 and 14)
    observation = _observation(1, current, {5: 3.0, 6: 0.6, 14: 2.0}, {4: 0.1, 6: 0.8})
    kept = policy.after_layer(1, ctx, current, observation)
    assert _sorted(kept) == sorted(FRESH + [5, 6])
    current = torch.tensor(_sorted(kept))
    assert policy.after_layer(2, ctx, current, _observation(2, current, {}, {})) is current  # budget 2 → 2


# -- small cases worked out by hand (eval/mutate.py selection) ---------------------------------------------------


def test_split_over_spans_by_hand():
    """Largest remainder, capped at each span's length, earlier spans first on ties."""
    assert split_over_spans([8, 4], 1) == [1, 0]  # exact 2/3 : 1/3
    assert split_over_spans([2, 2], 1) == [1, 0]  # a tie: the earlier span
    assert split_over_spans([5, 2], 3) == [2, 1]  # exact 15/7, 6/7: the later span has the larger remainder
    assert split_over_spans([5, 2], 4) == [3, 1]  # exact 20/7, 8/7: floors 2 and 1, remainder 6/7 to the first
    assert split_over_spans([1, 1], 5) == [1, 1]  # never more than a span holds
    assert split_over_spans([3, 2], 0) == [0, 0] and split_over_spans([2], -1) == [0] and split_over_spans([], 3) == []


def test_budget_tokens_by_hand():
    assert budget_tokens(12, 0.25) == 3 and budget_tokens(12, 0.01) == 1 and budget_tokens(12, 2.0) == 12
    assert budget_tokens(0, 0.5) == 0 and budget_tokens(12, 0.0) == 0


def test_random_policy_defaults():
    policy = RandomPolicy()
    assert policy.recompute_ratio == 0.0 and policy.seed == 0
    assert torch.equal(RandomPolicy(0.25).initial_set(_context()), RandomPolicy(0.25, seed=0).initial_set(_context()))


@pytest.mark.parametrize(("num_layers", "select_at"), [(2, 0), (3, 1), (4, 1)])
def test_cacheblend_selects_at_layer_one_or_the_last_but_one(num_layers, select_at):
    """min(1, L − 2): a 2-layer model selects after layer 0, deeper ones after layer 1; other layers keep the set."""
    ctx = _context(num_layers)
    policy = CacheBlendPolicy(0.25)
    current = torch.arange(20)
    values = {5: 3.0, 6: 1.0, 14: 2.0, 15: 0.5}
    for layer in range(num_layers - 1):
        kept = policy.after_layer(layer, ctx, current, _observation(layer, current, {}, values))
        if layer == select_at:
            assert _sorted(kept) == sorted(FRESH + [5, 6, 14])
        else:
            assert kept is current


def test_cacheblend_ranks_by_squared_deviation_whatever_its_sign():
    ctx = _context()
    current = torch.arange(20)
    # squared: 5 → 9, 14 → 4, 6 → 1, 15 → 0.25: budget 3 keeps 5, 14, 6 (a signed cube would drop 14)
    values = {5: 3.0, 6: 1.0, 14: -2.0, 15: 0.5}
    kept = CacheBlendPolicy(0.25).after_layer(1, ctx, current, _observation(1, current, {}, values))
    assert _sorted(kept) == sorted(FRESH + [5, 6, 14])


def _shrinking_vlcache(refine: bool = True) -> VLCachePolicy:
    # remaining error [2, 1, 1, 0], 12 moved tokens at 0.25: target 12 = c · (2 + 1 + 1 + 0) → c = 3 → [6, 3, 3, 0]
    profile = LayerProfile("0123456789abcdef0123", 4, [2.0, 1.0, 1.0, 0.0], [1.0, 0.0, 1.0, 0.0], 2.0, 0, 1, "test")
    return VLCachePolicy(0.25, profile=profile, refine=refine)


def test_vlcache_shrinks_by_position_before_any_deviation_counts():
    """Layer 0's deviation says nothing (a moved token's layer-0 K/V is exact after re-rotation): the first
    shrink ranks by the positional prior (1 − offset in span) × (20 − t) / 20."""
    ctx = _context()
    policy = _shrinking_vlcache()
    current = policy.initial_set(ctx)
    assert policy.last_budgets == [6, 3, 3, 0]
    # offsets: 4 → 0, 14 → 0, 5 → 1/8, 6 → 1/4, 15 → 1/4, 7 → 3/8 (ties: the earlier token)
    assert _sorted(current) == sorted(FRESH + [4, 5, 6, 7, 14, 15])
    current = torch.tensor(_sorted(current))
    # prior: 4 → 16/20 = 0.8, 5 → 7/8 · 15/20 = 0.656, 6 → 3/4 · 14/20 = 0.525, 7 → 5/8 · 13/20 = 0.406,
    # 14 → 6/20 = 0.3, 15 → 3/4 · 5/20 = 0.1875; budget 3 keeps 4, 5, 6 whatever layer 0's deviation says
    kept = policy.after_layer(0, ctx, current, _observation(0, current, {7: 5.0, 14: 5.0, 15: 5.0}, {}))
    assert _sorted(kept) == sorted(FRESH + [4, 5, 6])


def test_vlcache_without_refinement_keeps_ranking_by_position():
    ctx = _context()
    policy = _profiled_vlcache(0.25)
    policy.refine = False
    current = torch.tensor(_sorted(policy.initial_set(ctx)))  # FRESH + [4, 5, 6, 14], budgets [4, 4, 2, 2]
    # priors 4 → 0.8, 5 → 0.656, 6 → 0.525, 14 → 0.3: keeps 4 and 5 (the deviation would keep 6 and 14)
    kept = policy.after_layer(1, ctx, current, _observation(1, current, {6: 5.0, 14: 9.0}, {}))
    assert _sorted(kept) == sorted(FRESH + [4, 5])


def test_vlcache_deviation_is_a_norm_whatever_the_sign():
    ctx = _context()
    policy = _profiled_vlcache(0.25)
    current = torch.tensor(_sorted(policy.initial_set(ctx)))
    # as in the test above with value Δ of token 14 = −2: |Δ| = 2, score 0.6 < token 6's 0.7 → keeps 5 and 6
    observation = _observation(1, current, {5: 3.0, 6: 0.6}, {4: 0.1, 6: 0.8, 14: -2.0})
    assert _sorted(policy.after_layer(1, ctx, current, observation)) == sorted(FRESH + [5, 6])


def test_profile_budgets_describe_and_model_check():
    profile = _shrinking_vlcache().profile
    assert profile.budgets(12, 0.25) == [6, 3, 3, 0]
    assert profile.describe() == "profile 0123456789ab (seed 0, 1 samples)"
    profile.check_model("0123456789abcdef0123", 4)
    with pytest.raises(VLCacheError, match=r"for model 0123456789abcdef… with 4 layers, not for this model "
                                            r"\(fedcba9876543210…, 4 layers\)"):
        profile.check_model("fedcba9876543210fedc", 4)
    with pytest.raises(VLCacheError, match=r"\(0123456789abcdef…, 5 layers\)"):
        profile.check_model("0123456789abcdef0123", 5)


def test_register_policy_makes_a_policy_available_by_name():
    class EveryOther(SelectionPolicy):
        name = "every_other_test_only"

        def initial_set(self, ctx: SelectionContext) -> torch.Tensor:
            return ctx.fresh_indices

    try:
        assert register_policy(EveryOther) is EveryOther
        policy = make_policy("every_other_test_only", 0.5)
        assert type(policy) is EveryOther and policy.recompute_ratio == 0.5
    finally:
        POLICIES.pop("every_other_test_only", None)


def _coverage_keys() -> torch.Tensor:
    """[1, 1 head, 20 tokens, 2 dims]. Span [4, 12): background (0, 0) everywhere but an object at token 6,
    (6, 0), and another at token 9, (0, 3). Span [14, 18): (1, 1) but token 16, (5, 5). Fresh rows hold noise
    a policy must never read."""
    keys = torch.full((1, 1, 20, 2), 99.0)
    keys[0, 0, 4:12] = 0.0
    keys[0, 0, 6] = torch.tensor([6.0, 0.0])
    keys[0, 0, 9] = torch.tensor([0.0, 3.0])
    keys[0, 0, 14:18] = 1.0
    keys[0, 0, 16] = 5.0
    return keys


def _coverage_context(keys: torch.Tensor | None) -> SelectionContext:
    """The hand-built layout with `keys` as its reused layer-0 keys (deeper layers' keys are NaN: never read)."""
    reused = None if keys is None else (lambda layer: keys if layer == 0 else torch.full_like(keys, float("nan")))
    return _context(reused_keys=reused)


def test_coverage_picks_the_most_distinct_token_then_the_farthest_from_all_picks():
    # span [4, 12): mean (0.75, 0.375); squared distance to it: token 6 → 27.70, token 9 → 7.45, background 0.70
    #   pick 6; distance to {6}: token 9 → min(7.45, 45) = 7.45, background → min(0.70, 36) = 0.70: pick 9;
    #   then every background token ties at 0.70: the earliest, token 4
    # span [14, 18): mean (2, 2): token 16 → 18, the others → 2: pick 16
    # ratio 0.25 of 12 moved = 3 tokens → 8·3/12 = 2 and 4·3/12 = 1; ratio 0.34 → 4 tokens → 2.67, 1.33 → 3 + 1
    assert sorted(CoveragePolicy(0.25).initial_set(_coverage_context(_coverage_keys())).tolist()) == sorted(FRESH + [6, 9, 16])
    assert sorted(CoveragePolicy(0.34).initial_set(_coverage_context(_coverage_keys())).tolist()) == sorted(FRESH + [4, 6, 9, 16])
    assert POLICIES["coverage"] is CoveragePolicy


def test_coverage_keeps_its_set_at_every_layer_and_spends_nothing_without_a_budget():
    ctx = _coverage_context(_coverage_keys())
    current = torch.tensor(sorted(CoveragePolicy(0.25).initial_set(ctx).tolist()))
    assert CoveragePolicy(0.25).after_layer(0, ctx, current, None) is current
    assert sorted(CoveragePolicy(0.0).initial_set(_coverage_context(None)).tolist()) == FRESH  # no keys needed for nothing


def test_coverage_without_reused_keys_is_a_clear_error():
    with pytest.raises(VLCacheError, match="needs the reused keys"):
        CoveragePolicy(0.25).initial_set(_coverage_context(None))


def test_k_center_picks_by_hand_and_never_twice():
    features = torch.tensor([[0.0, 0.0], [0.0, 0.0], [4.0, 0.0], [0.0, 1.0]])
    # mean (1, 0.25): distances 1.06, 1.06, 9.06, 1.56 → 2; then min(., to row 2): 1.06, 1.06, –, 1.56 → 3;
    # then rows 0 and 1 tie at min(1.06, 16, 1) = 1 → 0; then row 1 (0 from row 0, but not yet picked)
    assert k_center_picks(features, 4) == [2, 3, 0, 1]
    assert k_center_picks(torch.zeros(3, 2), 5) == [0, 1, 2]  # all equal: each row once, capped at the rows
    assert k_center_picks(features, 0) == []
