"""DiskTier: round trips, budgets, corruption, concurrent processes, killed writers, restarts."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import pytest
import torch
from helpers import greedy

from vlcache_hf import CacheStore, VLCache, VLCacheError
from vlcache_hf.store.disk import DiskTier
from vlcache_hf.store.entry import StoredEntry
from vlcache_hf.store.tiers import MemoryTier
from vlcache_hf.tools import toy

KEY = "kv-" + "a" * 64


def key(i: int) -> str:
    return f"kv-{i:064x}"


def entry(seed: int, numel: int = 256) -> StoredEntry:
    g = torch.Generator().manual_seed(seed)
    return StoredEntry({"kv": torch.randn(numel, generator=g), "positions": torch.arange(4)}, {"kind": "kv", "n": str(seed)})


def test_round_trip_bitwise(tmp_path):
    tier = DiskTier(tmp_path, 10_000_000)
    tier.put(KEY, entry(1))
    got = tier.get(KEY)
    assert torch.equal(got.tensors["kv"], entry(1).tensors["kv"]) and got.metadata == {"kind": "kv", "n": "1"}
    assert tier.contains(KEY) and tier.keys() == [KEY]


def test_budget_held_under_churn_with_lru(tmp_path):
    """LRU by file time: a hit touches its file, so the entry read last is evicted last. The files' times are
    set explicitly (1 s apart, long ago), so the order never rests on the filesystem's timestamp resolution."""
    tier = DiskTier(tmp_path, 6_000)
    for i in range(4):  # four files of 1312 bytes fit in 6000, a fifth does not
        tier.put(key(i), entry(i))
        os.utime(tmp_path / f"{key(i)}.safetensors", (1_000_000 + i, 1_000_000 + i))
    assert tier.stats().bytes_used == 4 * 1312
    assert tier.get(key(0)) is not None  # key 0 was the oldest: the hit makes it the most recent
    tier.put(key(4), entry(4))
    assert sorted(tier.keys()) == [key(0), key(2), key(3), key(4)]  # key 1 was the least recently used
    for i in range(5, 20):
        tier.put(key(i), entry(i))
        assert tier.stats().bytes_used <= 6_000
    assert tier.contains(key(19)) and not tier.contains(key(0))


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_corrupt_files_are_misses_and_removed(tmp_path, damage):
    tier = DiskTier(tmp_path, 10_000_000)
    tier.put(KEY, entry(2))
    file = tmp_path / f"{KEY}.safetensors"
    data = bytearray(file.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[-5] ^= 0xFF
    else:
        data = bytearray(b"not a safetensors file at all")
    file.write_bytes(bytes(data))
    assert tier.get(KEY) is None
    assert not file.exists()


def test_bad_keys_and_paths(tmp_path):
    tier = DiskTier(tmp_path, 1000)
    with pytest.raises(ValueError, match="invalid store key"):
        tier.get("../../etc/passwd")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(VLCacheError, match="cannot use"):
        DiskTier(blocker / "sub", 1000)


def _writer(path: str, seconds: float) -> None:
    tier = DiskTier(path, 50_000_000)
    end = time.time() + seconds
    i = 0
    while time.time() < end:
        tier.put(key(i % 5), entry(i % 5, numel=20_000))
        i += 1


def _reader(path: str, seconds: float, queue) -> None:
    tier = DiskTier(path, 50_000_000)
    end, bad, hits = time.time() + seconds, 0, 0
    while time.time() < end:
        for i in range(5):
            got = tier.get(key(i))
            if got is not None:
                hits += 1
                bad += not torch.equal(got.tensors["kv"], entry(i, numel=20_000).tensors["kv"])
    queue.put((hits, bad))


def test_two_processes_share_a_directory(tmp_path):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), 2.0)), ctx.Process(target=_writer, args=(str(tmp_path), 2.0)),
             ctx.Process(target=_reader, args=(str(tmp_path), 2.0, queue))]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)  # generous: spawning a process that imports torch is slow on a loaded 2-core machine
        assert p.exitcode == 0
    hits, bad = queue.get(timeout=10)
    print(f"concurrent reads: {hits} hits, {bad} wrong")
    assert hits > 0 and bad == 0


def _endless_writer(path: str, started) -> None:
    tier = DiskTier(path, 500_000_000)
    i = 0
    while True:
        tier.put(KEY, entry(i % 3, numel=2_000_000))
        started.set()
        i += 1


def test_writer_killed_mid_write_leaves_no_partial_entry(tmp_path):
    """A whole entry is on disk before each writer starts, so after the kill the key must read back as one of
    the whole entries, whatever the writer was doing (a file written in place would be truncated or gone)."""
    ctx = mp.get_context("spawn")
    whole = [entry(i, numel=2_000_000).tensors["kv"] for i in range(3)]
    DiskTier(tmp_path, 500_000_000).put(KEY, entry(0, numel=2_000_000))
    for pause in (0.05, 0.2, 0.5):
        started = ctx.Event()
        proc = ctx.Process(target=_endless_writer, args=(str(tmp_path), started))
        proc.start()
        assert started.wait(300), "the writer never finished a write"  # slow: a spawned process imports torch
        time.sleep(pause)  # the writer spends its time writing: the kill lands mid-write or between writes
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        tier = DiskTier(tmp_path, 500_000_000)
        got = tier.get(KEY)
        assert got is not None, "a killed writer left no readable entry"
        assert any(torch.equal(got.tensors["kv"], kv) for kv in whole)
        assert tier.keys() == [KEY]
    tier.remove_stale_temp_files(older_than=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", ".usage", f"{KEY}.safetensors"]  # no temp file left


def test_a_put_never_writes_into_a_file_a_reader_has_open(tmp_path):
    """Atomic replace, deterministically: a reader halfway through an entry when another put lands still
    reads the whole old entry, and the next read gets the whole new one."""
    tier = DiskTier(tmp_path, 10**8)
    tier.put(KEY, entry(1, numel=50_000))
    file = tmp_path / f"{KEY}.safetensors"
    before = file.read_bytes()
    with open(file, "rb") as reader:
        head = reader.read(len(before) // 2)
        tier.put(KEY, entry(2, numel=50_000))
        assert head + reader.read() == before
    assert torch.equal(tier.get(KEY).tensors["kv"], entry(2, numel=50_000).tensors["kv"])


def _serve_once(path: str, queue) -> None:
    from helpers import greedy as run

    model, processor = toy.build_model(), toy.build_processor()
    images = [toy.make_image(seed) for seed in range(2)]
    inputs = toy.chat_inputs(processor, [toy.message("user", "Look:", *images, "?")])
    store = CacheStore([MemoryTier(10**8), DiskTier(path, 10**9)])
    cache = VLCache(model, store=store)
    out = run(model, inputs, cache)
    queue.put((out.sequences.tolist(), cache.report.encoder_hits, cache.report.kv_hits))


def test_a_restarted_process_gets_disk_hits_and_equal_answers(tmp_path):
    ctx = mp.get_context("spawn")
    results = []
    for _ in range(2):
        queue = ctx.Queue()
        proc = ctx.Process(target=_serve_once, args=(str(tmp_path), queue))
        proc.start()
        results.append(queue.get(timeout=120))
        proc.join(60)
    (first, enc0, kv0), (second, enc1, kv1) = results
    assert (enc0, kv0) == (0, 0) and (enc1, kv1) == (2, 2)
    assert first == second
    model, processor = toy.build_model(), toy.build_processor()
    inputs = toy.chat_inputs(processor, [toy.message("user", "Look:", *[toy.make_image(s) for s in range(2)], "?")])
    assert greedy(model, inputs).sequences.tolist() == second


def test_one_line_constructor_and_sizes(tmp_path):
    from vlcache_hf.store.store import parse_bytes

    store = CacheStore(cpu="1MiB", disk=str(tmp_path), disk_budget="2MB")
    assert [type(t).__name__ for t in store.tiers] == ["MemoryTier", "DiskTier"]
    assert store.tiers[0].byte_budget == 2**20 and store.tiers[1].byte_budget == 2 * 10**6
    assert parse_bytes("1.5 gb") == 1_500_000_000 and parse_bytes(7) == 7
    for bad in ("lots", "-1GB", "0", "12 parsecs"):
        with pytest.raises(VLCacheError, match="size"):
            parse_bytes(bad)
    store.put(KEY, entry(4))
    assert store.flush()  # persistent tiers are written in the background; another store sees what is written
    assert CacheStore(disk=str(tmp_path)).get(KEY) is not None  # written through to disk


def test_store_cli(tmp_path, capsys):
    from vlcache_hf.tools.cli import main

    tier = DiskTier(tmp_path, 10**8)
    for i in range(4):
        tier.put(key(i), entry(i, numel=1000))
    bad = tmp_path / f"{key(2)}.safetensors"
    bad.write_bytes(bad.read_bytes()[:-10])
    assert main(["store", "ls", "--path", str(tmp_path)]) == 0
    assert capsys.readouterr().out.count("kv ") == 4
    assert main(["store", "verify", "--path", str(tmp_path)]) == 0
    assert "3 good, 1 removed" in capsys.readouterr().out
    assert main(["store", "gc", "--path", str(tmp_path), "--budget", "5KB"]) == 0
    assert tier.stats().bytes_used <= 5000 and tier.stats().entries >= 1
    assert main(["store", "stats", "--path", str(tmp_path)]) == 0
    assert "entries" in capsys.readouterr().out


def test_memory_tier_lru_budget_and_store_promotion_and_spill(tmp_path):
    top = MemoryTier(3 * entry(0).nbytes)
    store = CacheStore([top, DiskTier(tmp_path, 10**8)])
    for i in range(6):
        store.put(key(i), entry(i))
        assert top.stats().bytes_used <= top.byte_budget
        if i == 3:
            store.get(key(1))  # key 1 becomes most recent; key 2 is now the oldest in memory
    assert top.keys() == [key(1), key(4), key(5)]
    store.flush()
    assert top.stats().evictions == 3 and all(store.tiers[1].contains(key(i)) for i in range(6))
    got = store.get(key(0))  # a disk hit is promoted into memory
    assert torch.equal(got.tensors["kv"], entry(0).tensors["kv"]) and top.contains(key(0))
    assert CacheStore.from_config({"cpu": "1MiB"}).tiers[0].byte_budget == 2**20
    with pytest.raises(VLCacheError, match="unknown CacheStore settings"):
        CacheStore.from_config({"ssd": "x"})


def test_put_keeps_a_shared_account_instead_of_listing_the_directory(tmp_path):
    """The bytes in the directory are an account under the lock (a put is O(1)); a second process's tier sees
    the same account, and files removed behind its back are caught at the next eviction or re-check."""
    from vlcache_hf.store.disk import USAGE_FILE

    sizes = {}
    first, second = DiskTier(tmp_path, 10**6), DiskTier(tmp_path, 10**6)
    for i in range(3):
        (first if i % 2 else second).put(key(i), entry(i, numel=1000))
        sizes[key(i)] = (tmp_path / f"{key(i)}.safetensors").stat().st_size
    assert int((tmp_path / USAGE_FILE).read_text()) == sum(sizes.values())  # both tiers added to one account
    first.put(key(1), entry(1, numel=2000))  # a rewrite replaces its bytes
    sizes[key(1)] = (tmp_path / f"{key(1)}.safetensors").stat().st_size
    assert int((tmp_path / USAGE_FILE).read_text()) == sum(sizes.values())
    assert second.evict(key(0)) and int((tmp_path / USAGE_FILE).read_text()) == sizes[key(1)] + sizes[key(2)]
    (tmp_path / USAGE_FILE).write_text(str(10**9))  # an account far off (files removed behind its back)
    first.put(key(3), entry(3, numel=1000))  # passes the budget on paper: the directory is listed, nothing evicted
    assert all((tmp_path / f"{key(i)}.safetensors").exists() for i in (1, 2, 3))
    listed = sum(f.stat().st_size for f in tmp_path.glob("*.safetensors"))
    assert int((tmp_path / USAGE_FILE).read_text()) == listed
