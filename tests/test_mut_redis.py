"""RedisTier details that mutation testing (issue 17) found unchecked: URL redaction, the tier's defaults and
messages, the chunk layout, TTLs, misses and drops, eviction of entries outside the account, counters.
Expected values are written out by hand (URLs, messages, chunk counts) or read from Redis itself with
redis-py's own commands, never taken from the tier."""

from __future__ import annotations

import json
import logging
import socket

import pytest
import torch

from vlcache_hf import VLCacheError
from vlcache_hf.store.entry import StoredEntry

pytest.importorskip("redis")


def key(i: int) -> str:
    return f"kv-{i:064x}"


def entry(i: int, numel: int = 1000) -> StoredEntry:
    return StoredEntry({"kv": torch.full((numel,), float(i))}, {"kind": "kv", "i": str(i)})


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://user:pw@host:1/0", "redis://user:***@host:1/0"),
        ("redis://:pw@host:1/0", "redis://:***@host:1/0"),
        ("redis://tok@host:1/0", "redis://***@host:1/0"),
        ("redis://a:b@c@host/0", "redis://a:***@host/0"),
        ("redis://u:p:q@host/0", "redis://u:***@host/0"),
        ("redis://@host/0", "redis://***@host/0"),
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("redis://host/0?password=pw&db=2", "redis://host/0?password=***&db=2"),
        ("redis://host/0?PASS=a&token=b&secret=c&pwd=d&keep=e", "redis://host/0?PASS=***&token=***&secret=***&pwd=***&keep=e"),
        ("redis://host/0?password=&x=", "redis://host/0?password=***&x="),
        ("rediss://host:6380/1?ssl_cert_reqs=none", "rediss://host:6380/1?ssl_cert_reqs=none"),
        ("unix:///run/redis.sock?db=3&password=pw", "unix:///run/redis.sock?db=3&password=***"),
        ("redis://host/0#part", "redis://host/0#part"),
        ("http://[::1", "<unparseable url>"),
    ],
)
def test_redact_url_by_hand(url, shown):
    from vlcache_hf.store.redis_tier import redact_url

    assert redact_url(url) == shown


@pytest.mark.parametrize(
    ("url", "secrets"),
    [
        ("redis://:p%40ss@host/0", ["p%2540ss", "p%40ss", "p@ss"]),
        ("redis://user:pw@host/0", ["pw"]),
        ("redis://tok@host/0", ["tok"]),
        ("redis://tok@x@host/0", ["tok%40x", "tok@x"]),
        ("redis://host/0?password=a/b", ["a%2Fb", "a/b"]),
        ("redis://host/0?password=a%20b&db=1", ["a%20b", "a b"]),
        ("redis://host/0?Token=xyz", ["xyz"]),
        ("redis://host/0?password=", []),
        ("redis://:@host/0", []),
        ("redis://host/0", []),
        ("http://[::1", ["http://[::1"]),
    ],
)
def test_url_secrets_by_hand(url, secrets):
    from vlcache_hf.store.redis_tier import url_secrets

    assert url_secrets(url) == secrets


def test_unreachable_and_bad_budget_messages(redis_url):
    from vlcache_hf.store.redis_tier import RedisTier

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(VLCacheError) as raised:
        RedisTier(f"redis://:hunter2@127.0.0.1:{port}/0", socket_timeout=0.5)
    message = str(raised.value)
    assert message.startswith(f"cannot reach Redis at redis://:***@127.0.0.1:{port}/0: ") and "hunter2" not in message
    assert "Connection refused" in message  # redis-py's reason is shown
    for bad in (0, -1):
        with pytest.raises(VLCacheError) as raised:
            RedisTier(redis_url, budget_bytes=bad)
        assert str(raised.value) == f"RedisTier budget_bytes must be positive, got {bad}"
    assert RedisTier(redis_url, budget_bytes=1).stats().byte_budget == 1


def test_without_redis_py_the_tier_says_what_to_install(monkeypatch):
    import sys

    from vlcache_hf.store.redis_tier import RedisTier

    monkeypatch.setitem(sys.modules, "redis", None)  # `import redis` now raises ImportError
    with pytest.raises(VLCacheError) as raised:
        RedisTier("redis://127.0.0.1:1/0")
    assert str(raised.value) == "RedisTier needs redis-py: pip install 'vlcache-hf[redis]'"


def _safetensors_metadata(blob: bytes) -> dict:
    """The `__metadata__` of a safetensors blob, by the format: an 8-byte little-endian header size, then JSON."""
    size = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + size]).get("__metadata__", {})


def test_defaults_names_and_layout(redis_url):
    from redis.backoff import NoBackoff

    from vlcache_hf.store.redis_tier import RedisTier

    tier = RedisTier(redis_url)
    assert tier.name == f"redis:{redis_url}" and tier.stats().name == f"redis:{redis_url}"
    retry = tier.client.get_retry()
    assert retry.get_retries() == 1 and type(retry._backoff) is NoBackoff  # one immediate retry, no sleeping
    assert tier.stats().bytes_used == 0 and tier.stats().entries == 0
    assert repr(tier) == f"RedisTier({redis_url!r}, prefix='vlcache:', ttl=None, budget_bytes=None)"
    kwargs = tier.client.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == 2.0 and kwargs["socket_connect_timeout"] == 2.0
    assert tier.stats().byte_budget == 0 and tier.peak_bytes() == 0
    tier.put(key(1), entry(1))
    names = sorted(k.decode() for k in tier.client.keys("vlcache:*"))  # this prefix only: other tests share the server
    assert names == [f"vlcache:__{part}" for part in ("bytes", "clock", "lru", "peak", "sizes")] + [
        f"vlcache:{key(1)}", f"vlcache:{key(1)}:0"
    ]
    manifest = json.loads(tier.client.get(f"vlcache:{key(1)}"))
    size = len(tier.client.get(f"vlcache:{key(1)}:0"))
    assert manifest["chunks"] == 1 and manifest["bytes"] == size and len(manifest["checksum"]) == 64
    # the checksum lives in the manifest: the blob's own header holds the entry's metadata only
    assert _safetensors_metadata(tier.client.get(f"vlcache:{key(1)}:0")) == {"kind": "kv", "i": "1"}
    assert tier.client.ttl(f"vlcache:{key(1)}") == -1  # no TTL unless asked
    assert tier.peak_bytes() == size and tier.stats().bytes_used == size
    other = RedisTier(redis_url, prefix="p2:", ttl=50, budget_bytes=10**6)
    assert repr(other) == f"RedisTier({redis_url!r}, prefix='p2:', ttl=50, budget_bytes=1000000)"
    tier.check_health()
    tier.close()
    assert tier.get(key(1)).metadata["i"] == "1"  # reconnects after close


def test_chunks_split_at_chunk_bytes_and_carry_the_ttl(redis_url):
    from vlcache_hf.store.redis_tier import RedisTier

    tier = RedisTier(redis_url, prefix="ch:", chunk_bytes=1000, ttl=100)
    tier.put(key(1), entry(1))
    manifest = json.loads(tier.client.get(f"ch:{key(1)}"))
    total = manifest["bytes"]
    count = -(-total // 1000)  # ceil
    assert manifest["chunks"] == count and count > 2
    sizes = [len(tier.client.get(f"ch:{key(1)}:{i}")) for i in range(count)]
    assert sizes == [1000] * (count - 1) + [total - 1000 * (count - 1)]
    assert tier.client.get(f"ch:{key(1)}:{count}") is None
    for name in [f"ch:{key(1)}"] + [f"ch:{key(1)}:{i}" for i in range(count)]:
        assert 0 < tier.client.ttl(name) <= 100
    assert torch.equal(tier.get(key(1)).tensors["kv"], entry(1).tensors["kv"])


def test_misses_drops_and_counters(redis_url, caplog):
    from vlcache_hf.store.redis_tier import RedisTier

    tier = RedisTier(redis_url, prefix="m:", chunk_bytes=1000)
    for i in range(4):
        tier.put(key(i), entry(i))
    assert tier.get(key(0)) is not None and tier.get(key(0)) is not None
    tier.client.delete(f"m:{key(1)}:1")  # a chunk expired or evicted by Redis: a miss, the manifest stays
    assert tier.get(key(1)) is None and tier.client.exists(f"m:{key(1)}")
    tier.client.set(f"m:{key(2)}", b"{not json")  # an unreadable manifest: dropped, with its chunks
    with caplog.at_level(logging.WARNING, logger="vlcache_hf"):
        assert tier.get(key(2)) is None
    assert [r.getMessage() for r in caplog.records] == [f"dropping unreadable Redis entry {key(2)[:20]}…: unreadable manifest"]
    assert not tier.client.exists(f"m:{key(2)}") and not tier.client.exists(f"m:{key(2)}:0")
    caplog.clear()
    tier.client.set(f"m:{key(3)}:2", b"garbage")  # a corrupt chunk under an unchanged manifest: dropped
    with caplog.at_level(logging.WARNING, logger="vlcache_hf"):
        assert tier.get(key(3)) is None
    (message,) = [r.getMessage() for r in caplog.records]
    prefix = f"dropping unreadable Redis entry {key(3)[:20]}…: "
    assert message.startswith(prefix) and message[len(prefix) :].startswith("unreadable (")  # the codec's reason
    assert not tier.client.exists(f"m:{key(3)}")
    assert tier.get(key(9)) is None  # never stored
    assert tier.get(key(1)) is None  # the chunk is still missing: another miss, counted on top
    stats = tier.stats()
    assert (stats.hits, stats.misses, stats.puts, stats.evictions, stats.entries) == (2, 5, 4, 2, 2)


def test_chunks_replaced_between_two_reads_are_a_miss_not_a_drop(redis_url):
    """A writer replaces the entry between the reader's manifest and chunk reads: the reader sees bytes that do
    not match its manifest, finds a new manifest, and leaves the new entry alone."""
    from vlcache_hf.store.redis_tier import RedisTier

    tier = RedisTier(redis_url, prefix="r:", chunk_bytes=1000)
    writer = RedisTier(redis_url, prefix="r:", chunk_bytes=1000)
    tier.put(key(1), entry(1))
    real_mget = tier.client.mget
    versions = iter(range(2, 10))

    def racing_mget(names):
        chunks = real_mget(names)
        writer.put(key(1), entry(next(versions)))  # a new version lands after our manifest read
        return [b"x" * len(c) for c in chunks]  # what we read is not the entry our manifest names

    tier.client.mget = racing_mget
    assert tier.get(key(1)) is None
    assert tier.get(key(1)) is None  # the second read races again: still a miss, never a drop
    del tier.client.mget
    assert tier.get(key(1)).metadata["i"] == "3"
    assert (tier.stats().misses, tier.stats().hits, tier.stats().evictions) == (2, 1, 0)


def test_evictions_by_put_add_up(redis_url):
    from vlcache_hf.store.redis_tier import RedisTier

    probe = RedisTier(redis_url, prefix="probe:")
    probe.put(key(0), entry(0))
    size = json.loads(probe.client.get(f"probe:{key(0)}"))["bytes"]
    tier = RedisTier(redis_url, prefix="e:", budget_bytes=2 * size)
    for i in range(4):
        tier.put(key(i), entry(i))  # two fit: the third and fourth each evict one
    assert tier.stats().evictions == 2 and tier.stats().puts == 4
    assert sorted(k.decode() for k in tier.client.zrange("e:__lru", 0, -1)) == [key(2), key(3)]


def test_an_entry_over_the_budget_is_not_stored_and_says_so(redis_url, caplog):
    from vlcache_hf.store.redis_tier import RedisTier

    probe = RedisTier(redis_url, prefix="probe2:")
    probe.put(key(1), entry(1))
    size = json.loads(probe.client.get(f"probe2:{key(1)}"))["bytes"]
    tier = RedisTier(redis_url, prefix="b:", budget_bytes=100)
    with caplog.at_level(logging.INFO, logger="vlcache_hf"):
        assert tier.put(key(1), entry(1)) == []
    assert tier.client.get("b:__bytes") is None and not tier.contains(key(1))  # nothing stored, nothing counted
    assert [r.getMessage() for r in caplog.records] == [
        f"entry {key(1)[:20]}… ({size} bytes) exceeds the Redis budget of 100 bytes: not stored"
    ]
    assert tier.stats().puts == 0 and tier.stats().evictions == 0


def test_entries_outside_the_account_are_evicted_by_their_manifest(redis_url):
    """An entry written before the account existed (or whose account Redis evicted) is removed through its
    manifest: the manifest and every chunk it names."""
    from vlcache_hf.store.redis_tier import RedisTier

    tier = RedisTier(redis_url, prefix="o:", chunk_bytes=1000)
    tier.put(key(1), entry(1))
    count = json.loads(tier.client.get(f"o:{key(1)}"))["chunks"]
    tier.client.delete("o:__lru", "o:__sizes", "o:__bytes")  # the account is gone
    assert tier.evict(key(1)) is True
    assert tier.client.keys(f"o:{key(1)}*") == [] and count > 1
    # a manifest that names no chunks (unreadable, or without a count) removes itself only: go by the manifest
    for i, manifest in ((2, b"not json"), (3, b"{}")):
        tier.client.set(f"o:{key(i)}", manifest)
        tier.client.set(f"o:{key(i)}:0", b"x")
        assert tier.evict(key(i)) is True and not tier.client.exists(f"o:{key(i)}")
        assert tier.client.get(f"o:{key(i)}:0") == b"x"
    assert tier.evict(key(4)) is False
    assert tier.stats().evictions == 3

