"""The calibration pass and LayerProfile: measured, deterministic, round-trips, refuses other models, and
drives vlcache's per-layer budgets (nested, shrinking where the profile says)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import greedy

from vlcache_hf import CacheStore, VLCache, VLCacheError, calibrate
from vlcache_hf.selection import LayerProfile
from vlcache_hf.tools import toy
from vlcache_hf.tools.cli import main as cli_main


@pytest.fixture(scope="module")
def profile(models, images):
    model, processor = models("qwen2_5_vl")
    return calibrate(model, processor, [images[:3], images[3:6]], seed=0, progress=False)


def test_profile_is_measured_and_deterministic(models, images, profile):
    model, processor = models("qwen2_5_vl")
    again = calibrate(model, processor, [images[:3], images[3:6]], seed=0, progress=False)
    assert again.to_json() == profile.to_json()
    layers = model.config.text_config.num_hidden_layers
    assert profile.num_layers == layers and len(profile.per_sample_depth_kl) == 2
    for curve in profile.per_sample_depth_kl:
        assert len(curve) == layers + 1 and curve[0] > 0  # naive reuse has an error ...
        assert curve[-1] < 1e-6 * max(curve[0], 1e-30) + 1e-9  # ... recomputing every layer has none
        assert abs(curve[0] - curve[1]) <= 1e-2 * curve[0]  # layer-0 K/V of a moved token is exact (float noise)
    assert profile.remaining_error == sorted(profile.remaining_error, reverse=True)
    assert abs(sum(profile.sensitivity) - profile.remaining_error[0]) < 1e-12
    other_seed = calibrate(model, processor, [images[:3], images[3:6]], seed=1, progress=False)
    assert other_seed.per_sample_depth_kl != profile.per_sample_depth_kl  # the seed picks the contexts


def test_profile_round_trips_and_refuses_another_model(tmp_path, models, profile):
    path = profile.save(tmp_path / "profile.json")
    loaded = LayerProfile.load(path)
    assert loaded == profile
    model, _ = models("qwen2_5_vl")
    VLCache(model, policy="vlcache", recompute_ratio=0.05, profile=str(path))  # accepted by its own model
    other = toy.build_model("qwen2_5_vl", seed=1)
    with pytest.raises(VLCacheError, match="calibrated for model"):
        VLCache(other, policy="vlcache", recompute_ratio=0.05, profile=loaded)
    (tmp_path / "bad.json").write_text(json.dumps({"format": 99}))
    with pytest.raises(VLCacheError, match="not a vlcache LayerProfile"):
        LayerProfile.load(tmp_path / "bad.json")
    with pytest.raises(VLCacheError, match="no LayerProfile"):
        LayerProfile.load(tmp_path / "missing.json")


def test_profile_budgets_shrink_nested_and_are_reported(models, images):
    model, processor = models("qwen2_5_vl")
    from vlcache_hf.fingerprint import fingerprint

    layers = model.config.text_config.num_hidden_layers
    steep = LayerProfile(fingerprint(model), layers, [4.0, 4.0, 2.0, 1.0], [0.0, 2.0, 1.0, 1.0], 4.0, 0, 1, "test")
    store = CacheStore()
    first = toy.chat_inputs(processor, [toy.message("user", "Look:", images[0], images[1], "?")])
    moved = toy.chat_inputs(processor, [toy.message("user", "Another preamble:", images[1], images[0], "?")])
    greedy(model, first, VLCache(model, store=store))
    cache = VLCache(model, store=store, policy="vlcache", recompute_ratio=0.25, profile=steep)
    greedy(model, moved, cache)
    report = cache.report
    fresh = VLCache(model, store=store, policy="none")
    greedy(model, moved, fresh)
    base = fresh.report.recomputed_per_layer[0]
    # by hand: mean 0.25 × 32 = 8 over 4 layers → c · (4 + 4 + 2 + 1) = 32, c = 32/11 → round(c · w)
    assert [c - base for c in report.recomputed_per_layer] == [12, 12, 6, 3]
    assert report.recomputed_per_layer[0] > report.recomputed_per_layer[-1]
    assert "profile" in report.allocation
    default = VLCache(model, store=store, policy="vlcache", recompute_ratio=0.25)
    greedy(model, moved, default)
    assert "default" in default.report.allocation


def test_calibrate_cli_writes_a_profile(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for seed in range(4):
        toy.make_image(seed).save(images / f"{seed}.png")
    out = tmp_path / "profile.json"
    assert cli_main(["calibrate", "--model", "default", "--data", str(images), "--samples", "2", "--out", str(out)]) == 0
    profile = LayerProfile.load(out)
    assert profile.num_samples == 2 and len(profile.remaining_error) == profile.num_layers
    assert "wrote" in capsys.readouterr().out


def test_calibrate_rejects_empty_samples(models):
    model, processor = models("qwen2_5_vl")
    with pytest.raises(VLCacheError):
        calibrate(model, processor, [], progress=False)
    assert torch.is_grad_enabled()
