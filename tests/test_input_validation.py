"""Bad `VLCache` arguments are refused at construction with a `VLCacheError` that names the fix."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from vlcache_hf import CacheStore, VLCache, VLCacheError
from vlcache_hf.fingerprint import fingerprint
from vlcache_hf.models import get_adapter
from vlcache_hf.selection import LayerProfile


def _profile(model, **changes) -> dict:
    layers = get_adapter(model).kv_layout.num_layers
    data = LayerProfile(
        fingerprint(model), layers, [1.0] * layers, [0.0] * (layers - 1) + [1.0], 1.0, 0, 1, "test"
    ).__dict__
    return {**data, **changes}


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("field", ["remaining_error", "sensitivity", "naive_kl", "per_sample_depth_kl"])
def test_profile_json_with_non_finite_values(models, tmp_path, field, bad):
    model = models()[0]
    layers = get_adapter(model).kv_layout.num_layers
    values = {"naive_kl": bad, "per_sample_depth_kl": [[0.5, bad]]}.get(field, [1.0] * (layers - 1) + [bad])
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(_profile(model, **{field: values})))  # json writes NaN / Infinity
    with pytest.raises(VLCacheError, match=f"{field} must hold finite numbers.*vlcache calibrate"):
        VLCache(model, policy="vlcache", recompute_ratio=0.05, profile=path)


def test_profile_object_with_non_finite_values(models):
    model = models()[0]
    with pytest.raises(VLCacheError, match="remaining_error must hold finite numbers"):
        LayerProfile(**_profile(model, remaining_error=[math.nan] * get_adapter(model).kv_layout.num_layers))


def test_well_formed_profile_round_trips(models, tmp_path):
    model = models()[0]
    path = LayerProfile(**_profile(model)).save(tmp_path / "profile.json")
    cache = VLCache(model, policy="vlcache", recompute_ratio=0.05, profile=str(path))
    assert cache.profile.remaining_error == _profile(model)["remaining_error"]


def test_profile_path_is_a_directory(models, tmp_path):
    with pytest.raises(VLCacheError, match="is a directory; pass the profile's JSON file"):
        VLCache(models()[0], policy="vlcache", recompute_ratio=0.05, profile=tmp_path)


def test_profile_file_is_not_text(models, tmp_path):
    path = tmp_path / "profile.json"
    path.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(VLCacheError, match="not valid JSON"):
        VLCache(models()[0], policy="vlcache", recompute_ratio=0.05, profile=path)


@pytest.mark.parametrize("as_type", [str, Path])
def test_store_given_as_a_path(models, tmp_path, as_type):
    with pytest.raises(VLCacheError, match=r"is a path; .*store = CacheStore\(disk="):
        VLCache(models()[0], store=as_type(tmp_path))


@pytest.mark.parametrize("store", [42, {"cpu": "1GiB"}, object()])
def test_store_of_another_type(models, store):
    with pytest.raises(VLCacheError, match="store must be a CacheStore"):
        VLCache(models()[0], store=store)


def test_store_none_is_the_shared_default(models):
    model = models()[0]
    first, second = VLCache(model), VLCache(model, store=None)
    assert isinstance(first.store, CacheStore) and first.store is second.store


def test_recompute_ratio_has_one_home(models):
    """The policy owns `recompute_ratio`: a policy instance's ratio is the cache's, a name takes the argument,
    and a different ratio beside an instance is refused instead of silently ignored."""
    from vlcache_hf.selection import VLCachePolicy

    model, _ = models()
    by_instance = VLCache(model, policy=VLCachePolicy(0.05), store=CacheStore())
    assert by_instance.recompute_ratio == 0.05 and "recompute_ratio=0.05" in repr(by_instance)
    assert VLCache(model, policy=VLCachePolicy(0.05), recompute_ratio=0.05, store=CacheStore()).recompute_ratio == 0.05
    assert VLCache(model, policy="first_k", recompute_ratio=0.1, store=CacheStore()).policy.recompute_ratio == 0.1
    assert VLCache(model, policy="first_k", store=CacheStore()).recompute_ratio == 0.0
    with pytest.raises(VLCacheError, match="conflicts with"):
        VLCache(model, policy=VLCachePolicy(0.05), recompute_ratio=0.2, store=CacheStore())
    with pytest.raises(AttributeError):
        by_instance.settings.publish = False  # frozen: settings are fixed when the cache is made
