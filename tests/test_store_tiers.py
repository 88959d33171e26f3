"""The store's seams: the entry codec, the `Tier` protocol (persistent, health, close), tier URLs and the
package's exports. Expected values are written out from the URL text, not computed by the code under test."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys

import pytest
import torch

from vlcache_hf import VLCacheError
from vlcache_hf.store import CacheStore, DiskTier, MemoryTier, StoredEntry, Tier, TierStats
from vlcache_hf.store.codec import KEY_PATTERN, check_key, checksum, decode, encode, header_metadata
from vlcache_hf.store.factory import parse_tier_url, tier_from_url

KEY = "kv-" + "a" * 64
GiB, MiB = 2**30, 2**20


def entry(seed: int = 0) -> StoredEntry:
    g = torch.Generator().manual_seed(seed)
    return StoredEntry(
        {
            "k": torch.randn(2, 3, 5, generator=g).to(torch.bfloat16),
            "v": torch.randn(7, generator=g).half(),
            "positions": torch.arange(11),
        },
        {"kind": "kv", "note": "é ünïcode"},
    )


def same(a: StoredEntry, b: StoredEntry) -> bool:
    return a.metadata == b.metadata and a.tensors.keys() == b.tensors.keys() and all(
        a.tensors[n].dtype == b.tensors[n].dtype and torch.equal(a.tensors[n], b.tensors[n]) for n in a.tensors
    )


# -- codec ----------------------------------------------------------------------------------------------------


def test_codec_round_trip_is_bitwise_and_self_checking():
    original = entry()
    data, digest = encode(original)
    assert len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)
    assert header_metadata(data)["__checksum__"] == digest  # the blob carries its own checksum
    decoded, reason = decode(data)
    assert reason == "" and same(decoded, original)  # the checksum field is not handed back as metadata

    bare, bare_digest = encode(original, embed_checksum=False)  # Redis: checksum kept in the manifest
    assert bare_digest == digest and "__checksum__" not in header_metadata(bare)
    assert decode(bare) == (None, "checksum mismatch")  # nothing to check against: refused
    decoded, _ = decode(bare, expected=digest)
    assert same(decoded, original)
    assert decode(bare, expected="0" * 64) == (None, "checksum mismatch")


@pytest.mark.parametrize("offset", [-1, -20, -60])
def test_codec_detects_a_corrupted_byte(offset):
    data, _ = encode(entry())
    damaged = bytearray(data)
    damaged[offset] ^= 0x01  # one bit of the tensor bytes (they sit after the header)
    assert decode(bytes(damaged)) == (None, "checksum mismatch")


def test_codec_refuses_truncated_and_garbage_bytes():
    data, _ = encode(entry())
    for bad in (data[: len(data) // 2], data[:5], b"", b"\x00" * 64, b"not safetensors at all"):
        got, reason = decode(bad)
        assert got is None and reason.startswith("unreadable")


def test_checksum_covers_names_dtypes_and_shapes():
    t = torch.arange(6, dtype=torch.int32)
    base = checksum({"a": t})
    assert checksum({"b": t}) != base
    assert checksum({"a": t.view(2, 3)}) != base
    assert checksum({"a": t.view(torch.float32)}) != base
    assert checksum({"a": t.clone()}) == base


@pytest.mark.parametrize("key", ["kv-" + "0" * 64, "enc-" + "f" * 64, "pfx-" + "0123456789abcdef" * 4, "alias-" + "9" * 64])
def test_store_keys_accepted(key):
    assert check_key(key) == key and KEY_PATTERN.match(key)


@pytest.mark.parametrize(
    "key", ["kv-" + "a" * 63, "kv-" + "a" * 65, "KV-" + "a" * 64, "kv-" + "A" * 64, "kv-" + "g" * 64, "../" + "a" * 64,
            "kv_" + "a" * 64, "kv-" + "a" * 64 + "\n", "", "kv-*"],
)
def test_store_keys_refused_everywhere(tmp_path, key):
    with pytest.raises(ValueError, match="invalid store key"):
        check_key(key)
    for target in (CacheStore(), DiskTier(tmp_path, 10**6)):
        with pytest.raises(ValueError, match="invalid store key"):
            target.get(key)


def test_disk_files_are_codec_blobs(tmp_path):
    tier = DiskTier(tmp_path, 10**7)
    tier.put(KEY, entry())
    data = (tmp_path / f"{KEY}.safetensors").read_bytes()
    decoded, reason = decode(data)
    assert reason == "" and same(decoded, entry())
    assert header_metadata(data)["kind"] == "kv"


# -- the Tier protocol ----------------------------------------------------------------------------------------


def _conforms(tier, persistent: bool) -> None:
    assert isinstance(tier, Tier)
    assert tier.persistent is persistent
    assert isinstance(tier.name, str) and tier.name
    assert tier.get(KEY) is None and not tier.contains(KEY)
    assert tier.put(KEY, entry()) == []
    assert tier.contains(KEY) and same(tier.get(KEY), entry())
    stats = tier.stats()
    assert isinstance(stats, TierStats) and stats.entries == 1 and stats.hits == 1 and stats.misses == 1
    assert tier.evict(KEY) and not tier.evict(KEY) and tier.get(KEY) is None
    assert tier.check_health() is None
    tier.close()


def test_memory_tier_conforms():
    _conforms(MemoryTier(10**6), persistent=False)


def test_disk_tier_conforms(tmp_path):
    _conforms(DiskTier(tmp_path, 10**7), persistent=True)


def test_redis_tier_conforms(redis_url):
    from vlcache_hf.store import RedisTier

    tier = RedisTier(redis_url, prefix="conform:")
    _conforms(tier, persistent=True)
    tier.put(KEY, entry())  # redis-py reconnects after close
    assert same(tier.get(KEY), entry())
    tier.evict(KEY)


class Recorder:
    """A minimal third-party tier: a dict, recording what the store does with it."""

    def __init__(self, name: str, persistent: bool, fail_close: bool = False):
        self.name, self.persistent, self.fail_close = name, persistent, fail_close
        self.data: dict[str, StoredEntry] = {}
        self.closed = 0

    def get(self, key):
        return self.data.get(key)

    def put(self, key, value):
        self.data[key] = value
        return []

    def contains(self, key):
        return key in self.data

    def evict(self, key):
        return self.data.pop(key, None) is not None

    def stats(self):
        return TierStats(self.name, entries=len(self.data))

    def check_health(self):
        if self.fail_close:
            raise ConnectionError("no route to recorder")

    def close(self):
        self.closed += 1
        if self.fail_close:
            raise ConnectionError("already gone")


def test_persistent_is_read_through_the_protocol():
    durable, volatile = Recorder("durable", True), Recorder("volatile", False)
    store = CacheStore([MemoryTier(10**6), volatile, durable])
    store.put(KEY, entry())
    store.flush()
    assert KEY in durable.data  # written through
    assert KEY not in volatile.data  # only gets what the tier above spills


def test_an_object_that_is_not_a_tier_is_refused():
    class Half:
        name = "half"

        def get(self, key):
            return None

    with pytest.raises(VLCacheError, match=r"Half is not a store tier: it lacks \['persistent', 'put'"):
        CacheStore([Half()])
    with pytest.raises(VLCacheError, match="int is not a store tier"):
        CacheStore([42])


def test_close_and_context_manager_close_every_tier(caplog):
    first, broken, last = Recorder("first", False), Recorder("broken", True, fail_close=True), Recorder("last", True)
    with caplog.at_level(logging.WARNING), CacheStore([first, broken, last]) as store:
        assert isinstance(store, CacheStore)
        store.put(KEY, entry())
    assert (first.closed, broken.closed, last.closed) == (1, 1, 1)  # a failing close does not stop the others
    assert "closing store tier broken failed: ConnectionError: already gone" in caplog.text


def test_health_reports_each_tier(tmp_path):
    path = tmp_path / "cache"
    store = CacheStore([MemoryTier(10**6), DiskTier(path, 10**6), Recorder("flaky", True, fail_close=True)])
    first = store.health()
    assert [(r.name, r.healthy) for r in first] == [("memory:model", True), (f"disk:{path}", True), ("flaky", False)]
    assert first[2].detail == "ConnectionError: no route to recorder"
    shutil.rmtree(path)
    report = store.health()[1]
    assert not report.healthy and "FileNotFoundError" in report.detail and "missing" in report.detail


def test_redis_store_closes_its_connections(redis_url):
    with CacheStore.from_url(redis_url + "?budget=1MiB&prefix=ctx:") as store:
        tier = store.tiers[0]
        calls = []
        close = tier.client.close
        tier.client.close = lambda: (calls.append(1), close())[1]
        store.put(KEY, entry())
        assert tier.budget_bytes == MiB and tier.prefix == "ctx:"
        assert [r.healthy for r in store.health()] == [True]
    assert calls == [1]


# -- tier URLs ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, kind, location, budget, options",
    [
        ("memory://", "memory", None, None, {}),
        ("memory://?budget=8GiB", "memory", None, 8 * GiB, {}),
        ("memory://cpu?budget=512MB", "memory", "cpu", 512_000_000, {}),
        ("memory://cuda:1?budget=1GiB", "memory", "cuda:1", GiB, {}),
        ("cpu://8GiB", "memory", "cpu", 8_589_934_592, {}),
        ("CPU://8gib", "memory", "cpu", 8_589_934_592, {}),
        ("cpu://?budget=100", "memory", "cpu", 100, {}),
        ("gpu://2GiB", "memory", "cuda", 2_147_483_648, {}),
        ("cuda://1.5GiB", "memory", "cuda", 1_610_612_736, {}),
        ("disk:///data/vlcache?budget=50GiB&mode=0660", "disk", "/data/vlcache", 53_687_091_200, {"mode": 0o660}),
        ("disk:///data/vlcache?mode=0o664", "disk", "/data/vlcache", None, {"mode": 0o664}),
        ("disk:///data/vlcache", "disk", "/data/vlcache", None, {"mode": None}),
        ("disk://~/cache?budget=1MB", "disk", "~/cache", 1_000_000, {"mode": None}),
        ("disk://relative/dir", "disk", "relative/dir", None, {"mode": None}),
        ("disk:///tmp/a%20b%23c", "disk", "/tmp/a b#c", None, {"mode": None}),
        ("redis://host:6379/0?budget=1GiB", "redis", "redis://host:6379/0", GiB, {}),
        ("redis://host", "redis", "redis://host", None, {}),
        (
            "redis://:s3cret@host:6379/2?budget=1GiB&prefix=app:&ttl=3600&socket_timeout=5",
            "redis",
            "redis://:s3cret@host:6379/2?socket_timeout=5",
            GiB,
            {"prefix": "app:", "ttl": 3600},
        ),
        ("redis://host/0?password=p%40ss&budget=2MiB", "redis", "redis://host/0?password=p%40ss", 2 * MiB, {}),
        ("rediss://host:6380/1?ssl_cert_reqs=none", "redis", "rediss://host:6380/1?ssl_cert_reqs=none", None, {}),
        ("unix:///run/redis.sock?db=3&budget=2MiB", "redis", "unix:///run/redis.sock?db=3", 2 * MiB, {}),
    ],
)
def test_tier_urls(url, kind, location, budget, options):
    spec = parse_tier_url(url)
    assert (spec.kind, spec.location, spec.budget, spec.options) == (kind, location, budget, options)


@pytest.mark.parametrize(
    "url, message",
    [
        ("ftp://host/x", r"unknown tier URL scheme ftp://; use one of memory://"),
        ("/data/vlcache", r"unknown tier URL scheme \(none\).*disk:///data/vlcache"),
        ("s3://bucket/key?budget=1GiB", "unknown tier URL scheme s3://"),
        ("cpu://lots", "budget: invalid size 'lots'"),
        ("memory://?budget=0", "budget: size must be positive"),
        ("memory://?budget=", "budget: invalid size ''"),
        ("disk:///d?budget=-5GB", "budget: invalid size '-5GB'"),
        ("redis://host/0?budget=1XB", "budget: invalid size '1XB'"),
        ("cpu://8GiB?budget=1GiB", "budget given twice"),
        ("disk:///d?budget=1GB&budget=2GB", "query parameter 'budget' given twice"),
        ("disk:///d?size=5GB", "unknown query parameter 'size'; a disk tier takes budget, mode"),
        ("memory://?mode=0660", "unknown query parameter 'mode'; a memory tier takes budget"),
        ("cpu://1GiB?device=cuda", "unknown query parameter 'device'"),
        ("redis://host/0?budgett=1GiB", "unknown query parameter 'budgett'; a redis tier takes budget, prefix, ttl"),
        ("disk:///d?mode=rw", "mode must be octal permission bits"),
        ("disk:///d?mode=0680", "mode must be octal permission bits"),
        ("disk://", "no directory"),
        ("disk:///d#frag", "unexpected '#frag'"),
        ("memory://nodevice", "unknown device 'nodevice'"),
        ("memory://cpu/extra", "a memory tier has no path"),
        ("cpu://1GiB/extra", "a memory tier has no path"),
        ("redis://host/0?ttl=-1", "ttl must be a positive number of seconds"),
        ("redis://host/0?ttl=soon", "ttl must be a positive number of seconds"),
        ("redis://host/0?prefix=", "prefix must not be empty"),
    ],
)
def test_bad_tier_urls_are_clear_errors(url, message):
    with pytest.raises(VLCacheError, match=message):
        parse_tier_url(url)
    with pytest.raises(VLCacheError, match=message):
        CacheStore([url])  # refused before anything is opened or connected


def test_url_errors_never_show_the_password():
    for url in ("redis://:hunter2@host/0?bogus=1", "redis://user:hunter2@host/0?budget=huge",
                "redis://host/0?password=hunter2&ttl=x"):
        with pytest.raises(VLCacheError) as info:
            CacheStore([url])
        assert "hunter2" not in str(info.value) and "***" in str(info.value)


def test_disk_mode_from_a_url_is_checked_by_the_tier(tmp_path):
    with pytest.raises(VLCacheError, match="invalid disk_mode"):
        tier_from_url(f"disk://{tmp_path}/x?mode=0777")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_gpu_urls_need_cuda():
    with pytest.raises(VLCacheError, match="gpu://2GiB needs CUDA"):
        CacheStore.from_url("gpu://2GiB")
    with pytest.raises(VLCacheError, match=r"CacheStore\(gpu=...\) needs CUDA"):
        CacheStore(gpu="2GiB")


def test_urls_keywords_and_config_build_the_same_store(tmp_path):
    path = tmp_path / "shared"
    urls = ["cpu://1MiB", f"disk://{path}?budget=2MB&mode=0660"]
    stores = [
        CacheStore(tiers=urls),
        CacheStore.from_url(*urls),
        CacheStore.from_config({"tiers": urls}),
        CacheStore(cpu="1MiB", disk=str(path), disk_budget="2MB", disk_mode=0o660),
        CacheStore.from_config({"cpu": "1MiB", "disk": str(path), "disk_budget": 2_000_000, "disk_mode": 0o660}),
    ]
    for store in stores:
        assert [type(t).__name__ for t in store.tiers] == ["MemoryTier", "DiskTier"]
        assert [t.name for t in store.tiers] == ["memory:cpu", f"disk:{path}"]
        assert [t.byte_budget for t in store.tiers] == [1_048_576, 2_000_000]
        assert store.tiers[1].mode == 0o660 and store.tiers[1].path == path
    assert (path.stat().st_mode & 0o7777) == 0o2770  # group-shared directory, as disk_mode=0o660 makes it


def test_url_defaults_and_mixing_objects_with_urls(tmp_path):
    top = MemoryTier(10**6, name="mine")
    store = CacheStore([top, "memory://", f"disk://{tmp_path}"])
    assert store.tiers[0] is top
    assert store.tiers[1].byte_budget == 4 * GiB and store.tiers[1].device is None  # the model's device
    assert store.tiers[2].byte_budget == 50 * GiB and store.tiers[2].mode == 0o600
    assert [t.name for t in CacheStore("cpu://1MiB").tiers] == ["memory:cpu"]  # one URL as a plain string
    store.put(KEY, entry())
    store.flush()
    assert same(CacheStore(f"disk://{tmp_path}").get(KEY), entry())  # written through to disk


def test_redis_keyword_goes_through_the_url_parser():
    with pytest.raises(VLCacheError, match="budget given twice"):
        CacheStore(redis="redis://127.0.0.1:1/0?budget=1GiB", redis_budget="1GiB")
    with pytest.raises(VLCacheError, match="unknown query parameter 'nope'"):
        CacheStore(redis="redis://127.0.0.1:1/0?nope=1")
    with pytest.raises(VLCacheError, match="is not a Redis URL"):
        CacheStore(redis="disk:///tmp/x")
    with pytest.raises(VLCacheError, match="unknown CacheStore settings"):
        CacheStore.from_config({"tier": ["cpu://1MiB"]})


def test_redis_url_parameters_reach_the_tier(redis_url):
    store = CacheStore(tiers=[f"{redis_url}?budget=3MiB&prefix=url:&ttl=60&socket_timeout=3"])
    tier = store.tiers[0]
    assert (tier.budget_bytes, tier.prefix, tier.ttl) == (3 * MiB, "url:", 60)
    assert tier.name == f"redis:{redis_url}?socket_timeout=3"
    keyword = CacheStore(redis=redis_url + "?prefix=kw:", redis_budget="1MiB").tiers[0]
    assert (keyword.budget_bytes, keyword.prefix) == (MiB, "kw:")
    store.close()


# -- the package ------------------------------------------------------------------------------------------------


def test_package_exports_and_old_paths():
    import vlcache_hf.store as package
    import vlcache_hf.store.disk as disk
    import vlcache_hf.store.store as module
    from vlcache_hf import CacheStore as top_level

    assert package.CacheStore is module.CacheStore is top_level
    assert package.DiskTier is disk.DiskTier
    assert disk.KEY_PATTERN is KEY_PATTERN and disk.decode is decode and disk.checksum is checksum
    assert module.parse_bytes("2GiB") == 2_147_483_648
    assert set(package.__all__) <= set(dir(package))
    with pytest.raises(AttributeError):
        package.NoSuchThing  # noqa: B018


def test_importing_the_store_does_not_import_redis():
    code = (
        "import sys, vlcache_hf.store as s; s.CacheStore; s.DiskTier; s.MemoryTier; "
        "print('redis' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip() == "False"
