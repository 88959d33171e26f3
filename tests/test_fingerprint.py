"""Model fingerprints: any weight change, wherever it is and however it is made, is a new model to the store.

Each case warms a store with one set of weights, changes them, and checks that a `VLCache` with policy
"full" (which trusts stored encoder outputs) answers exactly as plain `generate` of the changed model.
"""

from __future__ import annotations

import copy

import torch
from helpers import greedy

import vlcache_hf.fingerprint as fingerprint_module
from vlcache_hf import CacheStore, VLCache
from vlcache_hf.fingerprint import fingerprint
from vlcache_hf.models import get_adapter
from vlcache_hf.tools import toy


def _inputs(processor, images):
    return toy.chat_inputs(processor, [toy.message("user", "Look:", images[0], images[1], "Which?")])


def _assert_full_equals_plain(model, store, inputs) -> None:
    plain = greedy(model, inputs)
    ours = greedy(model, inputs, VLCache(model, store=store, policy="full"))
    assert torch.equal(plain.sequences, ours.sequences)
    assert (plain.scores[0] - ours.scores[0]).abs().max() < 1e-4


def _vision_weight(model) -> torch.nn.Parameter:
    """The largest weight of the vision tower: a change there changes every encoder output."""
    return max(get_adapter(model).vision_tower.parameters(), key=lambda p: p.numel())


def _perturb_between_samples(weight: torch.Tensor) -> None:
    """Change every value except those at a 1024-sample stride (where a sampling digest would look)."""
    flat = weight.detach().view(-1)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[:: max(1, flat.numel() // 1024)] = True
    with torch.no_grad():
        flat[~keep] += 0.5


def test_fine_tune_outside_sampled_positions_is_another_model(images):
    base = toy.build_model("qwen2_5_vl")
    processor = toy.build_processor("qwen2_5_vl")
    tuned = copy.deepcopy(base)
    _perturb_between_samples(_vision_weight(tuned))
    assert fingerprint(tuned) != fingerprint(base)

    store = CacheStore()
    inputs = _inputs(processor, images)
    greedy(base, inputs, VLCache(base, store=store))
    _assert_full_equals_plain(tuned, store, inputs)


def test_load_state_dict_on_the_same_object_is_another_model(images):
    model = toy.build_model("qwen2_5_vl", seed=0)
    other = toy.build_model("qwen2_5_vl", seed=1)
    processor = toy.build_processor("qwen2_5_vl")
    store = CacheStore()
    inputs = _inputs(processor, images)
    before = fingerprint(model)
    greedy(model, inputs, VLCache(model, store=store))

    model.load_state_dict(other.state_dict())
    assert fingerprint(model) == fingerprint(other) != before
    _assert_full_equals_plain(model, store, inputs)


def test_in_place_edit_of_one_value_changes_the_fingerprint():
    model = toy.build_model("qwen2_5_vl")
    before = fingerprint(model)
    memo = fingerprint_module._memo[model]
    assert fingerprint(model) == before and fingerprint_module._memo[model] is memo  # unchanged: no re-hash
    weight = _vision_weight(model)
    original = weight.detach().view(-1)[1].clone()
    with torch.no_grad():
        weight.view(-1)[1] += 1.0
    assert fingerprint(model) != before
    with torch.no_grad():
        weight.view(-1)[1] = original
    assert fingerprint(model) == before  # the same bytes again: the same model


def test_replaced_parameter_changes_the_fingerprint():
    model = toy.build_model("qwen2_5_vl")
    before = fingerprint(model)
    weight = _vision_weight(model)
    weight.data = weight.data.clone()  # a new tensor: same values, so the same model
    assert fingerprint(model) == before
    weight.data = weight.data + 1.0  # new values in a new tensor
    assert fingerprint(model) != before


def test_fingerprint_depends_on_every_weight_and_nothing_else():
    first, second = toy.build_model("qwen2_5_vl", seed=0), toy.build_model("qwen2_5_vl", seed=0)
    assert fingerprint(first) == fingerprint(second)  # identical checkpoints share entries
    assert fingerprint(first) != fingerprint(toy.build_model("qwen2_5_vl", seed=1))
    second.config.text_config.rms_norm_eps = 1e-3  # a config change is another model too
    assert fingerprint(first) != fingerprint(second)
