"""RedisTier against a real redis-server started on 127.0.0.1 at a free port."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import pytest
import torch
from helpers import greedy

from vlcache_hf import CacheStore, VLCache, VLCacheError, toy
from vlcache_hf.store.entry import StoredEntry


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server must be installed in CI (.ci/run installs the Debian package)")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path_factory.mktemp("redis"))],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


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
    greedy(model, inputs, VLCache(model, store=CacheStore(cpu="64MiB", redis=redis_url)))
    plain = greedy(model, inputs)
    other = CacheStore(cpu="64MiB", redis=redis_url)  # another worker: empty memory, same Redis
    cache = VLCache(model, store=other)
    ours = greedy(model, inputs, cache)
    assert cache.report.encoder_hits == 2 and cache.report.kv_hits == 2
    assert torch.equal(plain.sequences, ours.sequences)
