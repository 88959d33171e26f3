"""Selection: budgets, profiles and the vlcache policy's inputs on small cases worked out by hand
(eval/mutate.py selection; the policies' choices on a hand-built layout are in test_selection_policies.py)."""

from __future__ import annotations

import math
import re

import pytest
import torch

from vlcache_hf import VLCacheError
from vlcache_hf.selection import (
    FullRecompute,
    LayerProfile,
    NoRecompute,
    RandomPolicy,
    ReusedSpan,
    SelectionContext,
    VLCachePolicy,
    allocate_budgets,
    make_policy,
)
from vlcache_hf.selection.baselines import budget_tokens
from vlcache_hf.selection.vlcache import span_offsets

FRESH = [0, 1, 2, 3, 12, 13, 18, 19]
SPANS = (ReusedSpan(4, 12), ReusedSpan(14, 18))


def _context(num_layers: int = 4, spans=SPANS) -> SelectionContext:
    fresh = torch.zeros(20, dtype=torch.bool)
    fresh[FRESH] = True
    return SelectionContext(20, num_layers, fresh, tuple(spans))


def _profile(**changes) -> dict:
    data = dict(model_fingerprint="fp", num_layers=2, remaining_error=[2.0, 1.0], sensitivity=[1.0, 1.0], naive_kl=2.0,
                seed=0, num_samples=1, library_version="test")
    return {**data, **changes}


def test_allocation_edge_cases_by_hand():
    assert allocate_budgets([1.0, 1.0], 1, 0.5) == [1, 0]  # target 1 = 2c → c = 0.5 → round to 0, layer 0 gets 1
    assert allocate_budgets([1.0], 10, 0.3) == [3]  # one layer takes the whole mean
    assert allocate_budgets([3.0, 2.0, 0.0], 10, 1.0) == [10, 10, 10]  # ratio 1: everything, whatever the weights
    assert allocate_budgets([0.0, 0.0], 10, 0.5) == [5, 5]  # no signal: uniform
    assert allocate_budgets([-1.0, 2.0], 10, 0.5) == [5, 5]  # negative weights count as 0 (then uniform)
    assert allocate_budgets([0.5, 0.25], 8, 0.5) == [5, 3]  # small weights still proportional: c = 32/3
    assert allocate_budgets([], 8, 0.5) == [] and allocate_budgets([1.0, 1.0], 0, 0.5) == [0, 0]


def test_vlcache_policy_defaults():
    policy = VLCachePolicy()
    assert policy.recompute_ratio == 0.0 and policy.refine is True and policy.profile is None
    assert policy.last_budgets == []  # nothing chosen yet


def test_vlcache_initial_set_takes_layer_zeros_budget():
    ctx = _context()
    assert sorted(VLCachePolicy(0.0).initial_set(ctx).tolist()) == FRESH
    profile = LayerProfile(**_profile(num_layers=4, remaining_error=[2.0, 1.0, 1.0, 0.0], sensitivity=[1.0, 0.0, 1.0, 0.0]))
    policy = VLCachePolicy(0.25, profile=profile)  # budgets [6, 3, 3, 0]: layer 0 takes 6, not layer 1's 3
    assert len(policy.initial_set(ctx)) == len(FRESH) + 6
    none = SelectionContext(20, 0, ctx.fresh_mask, ctx.moved_spans)  # no layers: no budget, fresh tokens only
    assert sorted(VLCachePolicy(0.25).initial_set(none).tolist()) == FRESH


def test_span_offsets_and_positional_prior_by_hand():
    moved, offsets = span_offsets(_context(spans=(ReusedSpan(4, 8), ReusedSpan(14, 16))))
    assert moved.tolist() == [4, 5, 6, 7, 14, 15] and moved.dtype == torch.long
    assert offsets.tolist() == [0.0, 0.25, 0.5, 0.75, 0.0, 0.5] and offsets.dtype == torch.float32
    moved, offsets = span_offsets(_context(spans=()))
    assert moved.shape == (0,) and offsets.shape == (0,) and moved.dtype == torch.long
    # prior = (1 − offset in span) × (20 − t) / 20 for the layout [4, 12) + [14, 18)
    prior = VLCachePolicy(0.25)._positional_prior(_context())
    expected = {4: 0.8, 5: 7 / 8 * 0.75, 11: 1 / 8 * 0.45, 14: 0.3, 15: 0.75 * 0.25, 17: 0.25 * 0.15}
    for token, value in expected.items():
        assert math.isclose(prior[token].item(), value, rel_tol=1e-6)
    assert prior[FRESH].abs().sum().item() == 0.0


def test_profile_validation_messages():
    LayerProfile(**_profile(num_layers=1, remaining_error=[1.0], sensitivity=[1.0]))  # one layer is a model
    for bad in (0, -1, True, 2.0):
        with pytest.raises(VLCacheError, match=re.escape(f"malformed LayerProfile: num_layers must be a positive int, got {bad!r}")):
            LayerProfile(**_profile(num_layers=bad))
    for bad in ((2.0, 1.0), [2.0]):
        with pytest.raises(VLCacheError, match="^malformed LayerProfile: remaining_error must have one value per layer$"):
            LayerProfile(**_profile(remaining_error=bad))
    values = [math.nan] + [1.0] * 40
    message = (f"malformed LayerProfile: sensitivity must hold finite numbers, got {str(values)[:80]}; "
               "re-create the profile with `vlcache calibrate`")
    assert len(str(values)) > 80
    with pytest.raises(VLCacheError) as err:
        LayerProfile(**_profile(sensitivity=values))
    assert str(err.value) == message


def test_profile_files_and_their_errors(tmp_path):
    profile = LayerProfile(**_profile())
    path = profile.save(tmp_path / "a" / "b" / "profile.json")  # parents created
    assert LayerProfile.load(path) == profile
    with pytest.raises(VLCacheError, match=re.escape(f"(e.g. {tmp_path / 'profile.json'})")):
        LayerProfile.load(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(VLCacheError, match=re.escape(f"cannot read the LayerProfile at {tmp_path / 'file' / 'p.json'}: ")):
        LayerProfile.load(tmp_path / "file" / "p.json")
    data = {"format": 2, "x": "a" * 100}
    with pytest.raises(VLCacheError) as err:
        LayerProfile.from_dict(data)
    assert str(err.value) == "not a vlcache LayerProfile (format 1): " + repr("{'format': 2, 'x': '" + "a" * 60)
    with pytest.raises(VLCacheError, match="^malformed LayerProfile: .*'bogus'"):
        LayerProfile.from_dict({**_profile(), "format": 1, "bogus": 1})


def test_context_and_policy_defaults():
    empty = _context(spans=())
    assert empty.moved_indices().shape == (0,) and empty.moved_indices().dtype == torch.long and empty.num_moved == 0
    assert _context().moved_indices().tolist() == [*range(4, 12), *range(14, 18)]
    assert NoRecompute().recompute_ratio == 0.0
    assert FullRecompute().initial_set(_context()).tolist() == list(range(20))
    assert budget_tokens(1, 0.5) == 1  # one moved token and any ratio: that token


def test_make_policy_checks_ratio_and_name():
    assert make_policy("random", 0.5).recompute_ratio == 0.5 and make_policy("none").recompute_ratio == 0.0
    given = RandomPolicy(0.25)
    assert make_policy(given) is given and make_policy(given, 0.25) is given
    for bad in (True, "0.5", [0.5]):
        with pytest.raises(VLCacheError, match=re.escape(f"recompute_ratio must be a number in [0, 1], got {bad!r}")):
            make_policy("none", bad)
    for bad in (1.5, -0.1):
        with pytest.raises(VLCacheError, match=re.escape(f"recompute_ratio must be in [0, 1], got {bad}")):
            make_policy("none", bad)
    with pytest.raises(VLCacheError, match=re.escape("recompute_ratio must be in [0, 1], got 1.5")):
        make_policy(RandomPolicy(1.5))  # an instance's own ratio is checked too
    names = "['cacheblend', 'coverage', 'coverage-shift', 'first_k', 'full', 'none', 'random', 'stratified', 'vlcache']"
    for bad in ("nope", 123):
        with pytest.raises(VLCacheError, match=re.escape(f"unknown policy {bad!r}; choose one of {names}")):
            make_policy(bad)
