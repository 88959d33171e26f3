"""Store faults are misses, never crashes: killed Redis, full or vanished disk, racing processes, secrets, sharing.

Every fault here is real (a killed redis-server, a kernel file-size limit, a removed directory, other
processes evicting files); the answers are compared with plain `generate` of the same model.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import torch
from helpers import greedy

from vlcache_hf import CacheStore, VLCache, VLCacheError
from vlcache_hf.store.disk import DiskTier
from vlcache_hf.store.entry import StoredEntry
from vlcache_hf.tools import toy

PASSWORD = "s3cret-pw-0xdeadbeef"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_redis(port: int, workdir: Path, password: str | None = None) -> subprocess.Popen:
    """A real redis-server on 127.0.0.1:`port`, ready when this returns."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is required (apt-get install redis-server; .ci/run installs it)")
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)]
    if password:
        args += ["--requirepass", password]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.02)
    proc.kill()
    pytest.fail("redis-server did not start")


@pytest.fixture(scope="module")
def qwen():
    model, processor = toy.build_model(), toy.build_processor()
    inputs = toy.chat_inputs(processor, [toy.message("user", "Look:", toy.make_image(0), toy.make_image(1), "?")])
    return model, inputs, greedy(model, inputs).sequences


def _answer(model, inputs, store: CacheStore, policy: str = "full") -> VLCache:
    cache = VLCache(model, store=store, policy=policy)
    cache.answer = greedy(model, inputs, cache).sequences  # type: ignore[attr-defined]
    return cache


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("vlcache_hf")]


def test_killed_and_restarted_redis_is_a_miss_then_recovers(tmp_path, qwen, caplog):
    model, inputs, plain = qwen
    port = _free_port()
    server = start_redis(port, tmp_path)
    try:
        store = CacheStore(redis=f"redis://127.0.0.1:{port}/0", retry_after=0.2, max_retry_after=0.2)
        assert torch.equal(_answer(model, inputs, store).answer, plain)
        server.kill()
        server.wait(10)
        caplog.set_level(logging.WARNING)
        for policy in ("full", "none", "full"):  # several requests while Redis is down: answers stay right
            cache = _answer(model, inputs, store, policy)
            assert torch.equal(cache.answer, plain) and cache.report.kv_hits == 0
        stats = store.stats()[0]
        assert not stats.healthy and stats.errors >= 1
        assert len([m for m in _warnings(caplog) if "unhealthy" in m]) == 1  # one warning, not one per call
        server = start_redis(port, tmp_path)  # restarted, empty
        time.sleep(0.5)  # past the backoff: the tier is tried again
        assert torch.equal(_answer(model, inputs, store).answer, plain)
        assert store.stats()[0].healthy and store.stats()[0].entries > 0
        cache = _answer(model, inputs, store, "none")
        assert torch.equal(cache.answer, plain) and cache.report.kv_hits == 2
    finally:
        server.kill()
        server.wait(10)


def _serve_under_file_size_limit(path: str, limit: int, queue) -> None:
    """A process whose files cannot grow past `limit` bytes (the kernel answers EFBIG, as a full disk does)."""
    import resource
    import signal

    from helpers import greedy as run

    model, processor = toy.build_model(), toy.build_processor()
    inputs = toy.chat_inputs(processor, [toy.message("user", "Look:", toy.make_image(0), toy.make_image(1), "?")])
    plain = run(model, inputs).sequences
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    try:
        store = CacheStore(disk=path, retry_after=0.0)
        answers = [torch.equal(run(model, inputs, VLCache(model, store=store, policy=p)).sequences, plain)
                   for p in ("full", "none")]
        stats = store.stats()[0]
        queue.put((answers, stats.errors, stats.healthy, None))
    except BaseException as err:  # reported to the test, which fails on it
        queue.put((None, 0, True, repr(err)))


def test_full_disk_is_a_miss(tmp_path):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_serve_under_file_size_limit, args=(str(tmp_path), 2048, queue))
    proc.start()
    answers, errors, healthy, crash = queue.get(timeout=120)
    proc.join(30)
    assert crash is None
    assert answers == [True, True] and errors >= 1 and not healthy
    assert not list(tmp_path.glob(".tmp-*"))  # no partial file left behind


def test_vanished_directory_is_a_miss_and_comes_back(tmp_path, qwen, caplog):
    model, inputs, plain = qwen
    path = tmp_path / "cache"
    store = CacheStore(disk=str(path), retry_after=0.0)
    assert torch.equal(_answer(model, inputs, store).answer, plain)
    assert store.flush()  # written: now the directory (not a write in flight) is what vanishes
    shutil.rmtree(path)
    cache = _answer(model, inputs, store, "none")
    assert torch.equal(cache.answer, plain) and cache.report.kv_hits == 0
    assert store.stats()[0].errors >= 1
    path.mkdir()  # an operator recreates it: the tier is used again
    _answer(model, inputs, store)
    assert store.flush()  # written behind the first token: wait for it
    assert store.stats()[0].healthy and store.stats()[0].entries > 0


def test_a_truncated_file_is_dropped_but_a_replaced_one_is_kept(tmp_path):
    """Only the version that was read and found corrupt may be removed, never a newer one in its place."""
    tier = DiskTier(tmp_path, 10**7)
    key = "kv-" + "c" * 64
    good = StoredEntry({"kv": torch.arange(1000.0)}, {"kind": "kv"})
    tier.put(key, good)
    file = tmp_path / f"{key}.safetensors"
    bad = file.read_bytes()[:-40]
    file.write_bytes(bad)
    read = tier.read_version(key)  # what a reader saw: corrupt bytes of one inode
    assert read is not None and read.entry is None
    tier.put(key, good)  # another process replaces the entry meanwhile
    assert not tier.drop_if_unchanged(read)  # the newer, valid file is kept
    assert torch.equal(tier.get(key).tensors["kv"], good.tensors["kv"])
    file.write_bytes(bad)
    assert tier.get(key) is None and not file.exists()  # a corrupt file nobody replaced is removed


def _hammer(path: str, seconds: float, seed: int, queue, barrier) -> None:
    """put / get / stats / keys against a small shared budget; counts exceptions, wrong entries, drops."""
    drops: list[str] = []

    class Count(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            drops.append(record.getMessage())

    logging.getLogger("vlcache_hf").addHandler(Count(logging.WARNING))
    tier = DiskTier(path, 6 * 4200)
    barrier.wait(120)  # all processes race from the same moment, whatever their start-up time
    end, errors, wrong, hits, i = time.time() + seconds, [], 0, 0, seed
    while time.time() < end:
        i += 1
        try:
            tier.put(f"kv-{i % 12:064x}", StoredEntry({"kv": torch.full((1000,), float(i % 12))}, {"kind": "kv"}))
            for j in range(12):
                got = tier.get(f"kv-{j:064x}")
                if got is not None:
                    hits += 1
                    wrong += not torch.equal(got.tensors["kv"], torch.full((1000,), float(j)))
            tier.stats()
            tier.keys()
        except Exception as err:  # the test asserts there are none
            errors.append(repr(err))
    queue.put((errors[:3], len(errors), wrong, hits, drops[:3]))


def test_processes_sharing_a_small_disk_budget_see_no_exceptions(tmp_path):
    ctx = mp.get_context("spawn")
    queue, barrier = ctx.Queue(), ctx.Barrier(3)
    procs = [ctx.Process(target=_hammer, args=(str(tmp_path), 2.0, seed, queue, barrier)) for seed in range(3)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=90) for _ in procs]
    for p in procs:
        p.join(30)
    print("concurrent small-budget disk:", results)
    assert sum(r[1] for r in results) == 0, results
    assert sum(r[2] for r in results) == 0 and sum(r[3] for r in results) > 0
    assert all(not r[4] for r in results), results  # nothing valid was treated as corrupt


def test_secrets_are_redacted_everywhere(tmp_path, qwen, caplog):
    from vlcache_hf.store.redis_tier import redact_url

    model, inputs, plain = qwen
    assert redact_url(f"redis://user:{PASSWORD}@host:1/0") == "redis://user:***@host:1/0"
    assert PASSWORD not in redact_url(f"redis://host:1/0?password={PASSWORD}")
    port = _free_port()
    with pytest.raises(VLCacheError, match="cannot reach Redis") as err:
        CacheStore(redis=f"redis://:{PASSWORD}@127.0.0.1:{port}/0")
    assert PASSWORD not in str(err.value) and PASSWORD not in repr(err.value.__cause__)
    server = start_redis(port, tmp_path, password=PASSWORD)
    try:
        store = CacheStore(redis=f"redis://:{PASSWORD}@127.0.0.1:{port}/0")
        cache = _answer(model, inputs, store)
        assert torch.equal(cache.answer, plain)
        shown = " ".join([repr(cache), repr(store), str(store.stats()), repr(store.tiers[0])])
        assert "***" in shown and PASSWORD not in shown
        server.kill()
        server.wait(10)
        caplog.set_level(logging.DEBUG)
        assert torch.equal(_answer(model, inputs, store).answer, plain)
        logged = caplog.text + " ".join(_warnings(caplog))
        assert "unhealthy" in logged and PASSWORD not in logged
    finally:
        server.kill()
        server.wait(10)


def test_shared_disk_mode_makes_files_group_accessible(tmp_path, qwen):
    model, inputs, plain = qwen
    path = tmp_path / "shared"
    store = CacheStore(disk=str(path), disk_mode=0o660)
    assert torch.equal(_answer(model, inputs, store).answer, plain)
    assert store.flush(timeout=60)  # the disk tier writes behind: a file still in flight is a temporary, renamed away
    files = list(path.glob("*.safetensors"))
    assert files and all(stat.S_IMODE(f.stat().st_mode) == 0o660 for f in files)
    assert stat.S_IMODE((path / ".lock").stat().st_mode) == 0o660
    dir_mode = path.stat().st_mode
    assert stat.S_IMODE(dir_mode) & 0o070 == 0o070 and dir_mode & stat.S_ISGID  # new files keep the group
    CacheStore(disk=str(path))  # a private tier opening the shared directory does not narrow it
    assert stat.S_IMODE((path / ".lock").stat().st_mode) == 0o660 and path.stat().st_mode & stat.S_ISGID
    private = CacheStore(disk=str(tmp_path / "private"))
    _answer(model, inputs, private)
    assert private.flush(timeout=60)
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in (tmp_path / "private").glob("*.safetensors"))
    with pytest.raises(VLCacheError, match="disk_mode"):
        CacheStore(disk=str(tmp_path / "x"), disk_mode=0o777 + 1)


def _open_as_other_user(path: str, queue) -> None:
    """Become another user (root can) and open a directory this user may not write."""
    try:
        if os.getuid() == 0:
            os.setgid(65534)
            os.setuid(65534)
        DiskTier(path, 10**6)
        queue.put("opened")
    except VLCacheError as err:
        queue.put(f"VLCacheError: {err}")
    except BaseException as err:
        queue.put(f"other: {err!r}")


def test_a_directory_another_user_owns_is_a_clear_error(tmp_path):
    path = tmp_path / "theirs"
    DiskTier(path, 10**6)  # created private, by "them"
    os.chmod(tmp_path, 0o755)
    if os.getuid() != 0:
        os.chmod(path, 0o555)  # not root: a read-only directory stands for another user's
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_open_as_other_user, args=(str(path), queue))
    proc.start()
    message = queue.get(timeout=60)
    proc.join(30)
    os.chmod(path, 0o755)
    assert message.startswith("VLCacheError") and "not writable" in message and "disk_mode=0o660" in message


def _use_as_group_member(path: str, key: str, queue) -> None:
    """Another user of the directory's group (root becomes uid 65534 in that group) reads and writes it."""
    try:
        if os.getuid() == 0:
            gid = os.stat(path).st_gid
            os.setgroups([gid])
            os.setgid(gid)
            os.setuid(65534)
        tier = DiskTier(path, 10**7, mode=0o660)
        got = tier.get(key)
        tier.put("kv-" + "e" * 64, StoredEntry({"kv": torch.ones(10)}, {"kind": "kv"}))
        queue.put((os.getuid(), None if got is None else got.tensors["kv"].tolist()))
    except BaseException as err:
        queue.put((os.getuid(), repr(err)))


def test_two_users_share_a_directory_created_with_disk_mode(tmp_path):
    base = Path(tempfile.mkdtemp(prefix="vlcache-shared-"))  # outside pytest's private (0700) tmp tree
    try:
        os.chmod(base, 0o755)  # the parent must be searchable by the other user
        path = base / "store"
        path.mkdir()
        if os.getuid() == 0:
            os.chown(path, -1, 65534)  # the group the two users share (as a group member's directory has)
        tier = DiskTier(path, 10**7, mode=0o660)
        key = "kv-" + "d" * 64
        tier.put(key, StoredEntry({"kv": torch.arange(5.0)}, {"kind": "kv"}))
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        proc = ctx.Process(target=_use_as_group_member, args=(str(path), key, queue))
        proc.start()
        uid, seen = queue.get(timeout=120)
        proc.join(30)
        assert seen == [0.0, 1.0, 2.0, 3.0, 4.0], seen  # the other user hits our entry
        assert torch.equal(tier.get("kv-" + "e" * 64).tensors["kv"], torch.ones(10))  # and we hit theirs
        assert stat.S_IMODE((path / f"kv-{'e' * 64}.safetensors").stat().st_mode) == 0o660
    finally:
        shutil.rmtree(base, ignore_errors=True)
