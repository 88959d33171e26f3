"""RedisTier against a real redis-server started on 127.0.0.1 at a free port."""

from __future__ import annotations

import socket

import pytest
import torch
from helpers import greedy

from vlcache_hf import CacheStore, VLCache, VLCacheError
from vlcache_hf.store.entry import StoredEntry
from vlcache_hf.tools import toy


def test_round_trip_chunked_and_corruption(redis_url):
    from vlcache_hf.store.redis_tier import RedisTier

    tier = RedisTier(redis_url, chunk_bytes=1000, prefix="t1:")
    key = "kv-" + "b" * 64
    entry = StoredEntry({"kv": torch.randn(3000), "positions": torch.arange(5)}, {"kind": "kv"})
    tier.put(key, entry)
    got = tier.get(key)
    assert torch.equal(got.tensors["kv"], entry.tensors["kv"]) and got.metadata == {"kind": "kv"}
    assert tier.stats().entries == 1
    tier.client.set(f"t1:{key}:3", b"garbage")  # corrupt one chunk
    assert tier.get(key) is None and not tier.contains(key)
    with pytest.raises(ValueError, match="invalid store key"):
        tier.get("nope")


def test_unreachable_redis_is_a_clear_error():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(VLCacheError, match="cannot reach Redis"):
        CacheStore(redis=f"redis://127.0.0.1:{port}/0")


def test_two_stores_share_entries_through_redis(redis_url, images):
    model, processor = toy.build_model(), toy.build_processor()
    inputs = toy.chat_inputs(processor, [toy.message("user", images[0], images[1], "?")])
    first = CacheStore(cpu="64MiB", redis=redis_url)
    greedy(model, inputs, VLCache(model, store=first))
    assert first.flush()  # Redis is written in the background; another worker sees entries once written
    plain = greedy(model, inputs)
    other = CacheStore(cpu="64MiB", redis=redis_url)  # another worker: empty memory, same Redis
    cache = VLCache(model, store=other)
    ours = greedy(model, inputs, cache)
    assert cache.report.encoder_hits == 2 and cache.report.kv_hits == 2
    assert torch.equal(plain.sequences, ours.sequences)


def _entry(nbytes: int, seed: int) -> StoredEntry:
    """An entry of about `nbytes` (float32 payload), distinct per seed."""
    return StoredEntry({"kv": torch.full((nbytes // 4,), float(seed))}, {"kind": "kv", "seed": str(seed)})


def _manifest_bytes(tier) -> dict[str, int]:
    """Bytes per stored entry, read from the manifests themselves (independent of the tier's account)."""
    import json

    names = [k for k in tier.client.scan_iter(f"{tier.prefix}*") if b":" not in k[len(tier.prefix) :] and b"__" not in k]
    return {n.decode()[len(tier.prefix) :]: int(json.loads(raw)["bytes"]) for n, raw in zip(names, tier.client.mget(names), strict=True) if raw}


def test_budget_evicts_least_recently_used(redis_url):
    from vlcache_hf.store.redis_tier import RedisTier

    tier = RedisTier(redis_url, prefix="lru:", budget_bytes=3 * 4300)  # room for three ~4.1 kB entries, not four
    keys = [f"kv-{i:064x}" for i in range(5)]
    for i in range(3):
        tier.put(keys[i], _entry(4000, i))
    assert tier.get(keys[0]) is not None  # 0 is now the most recently used; 1 is the oldest
    tier.put(keys[3], _entry(4000, 3))
    assert set(_manifest_bytes(tier)) == {keys[0], keys[2], keys[3]}
    assert tier.get(keys[1]) is None and tier.get(keys[0]).metadata["seed"] == "0"
    stats = tier.stats()
    assert stats.entries == 3 and stats.bytes_used == sum(_manifest_bytes(tier).values()) <= 3 * 4300
    assert stats.evictions == 1 and stats.byte_budget == 3 * 4300
    tier.put(keys[3], _entry(4000, 33))  # a rewrite replaces, it is not counted twice
    assert tier.stats().bytes_used == sum(_manifest_bytes(tier).values()) and tier.stats().entries == 3
    assert tier.get(keys[3]).metadata["seed"] == "33"
    tier.put(keys[4], _entry(20_000, 4))  # larger than the whole budget: not stored, nothing evicted for it
    assert tier.get(keys[4]) is None and set(_manifest_bytes(tier)) == {keys[0], keys[2], keys[3]}
    assert tier.evict(keys[0]) and not tier.evict(keys[0])
    assert tier.stats().bytes_used == sum(_manifest_bytes(tier).values()) and tier.stats().entries == 2


def _writer(url: str, worker: int, budget: int) -> None:
    import random

    from vlcache_hf.store.redis_tier import RedisTier

    tier = RedisTier(url, prefix="shared:", budget_bytes=budget, chunk_bytes=3000)
    rng = random.Random(worker)
    for _ in range(60):
        key = f"kv-{rng.randrange(40):064x}"
        if rng.random() < 0.3:
            got = tier.get(key)
            assert got is None or got.tensors["kv"].numel() == int(got.metadata["size"]) // 4  # whole, not mixed
        else:
            size = rng.randrange(1000, 12_000)
            tier.put(key, StoredEntry({"kv": torch.zeros(size // 4)}, {"kind": "kv", "size": str(size)}))


def test_budget_holds_across_processes(redis_url):
    import multiprocessing

    from vlcache_hf.store.redis_tier import RedisTier

    budget = 40_000
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_writer, args=(redis_url, w, budget)) for w in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert [w.exitcode for w in workers] == [0, 0, 0, 0]
    tier = RedisTier(redis_url, prefix="shared:", budget_bytes=budget)
    actual = _manifest_bytes(tier)
    assert 0 < sum(actual.values()) <= budget
    assert tier.stats().bytes_used == sum(actual.values()) and tier.stats().entries == len(actual)
    assert budget - 12_500 < tier.peak_bytes() <= budget  # it filled up, and never held more than the budget
    for key in actual:
        assert tier.get(key) is not None


def test_redis_budget_needs_redis():
    with pytest.raises(VLCacheError, match="redis_budget"):
        CacheStore(redis_budget="1MiB")
