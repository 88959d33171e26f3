"""Write-behind: persistent tiers are written off the request's critical path (issue 18), and reads in this
process still see every entry published — in flight or written. A real third-party tier whose writes wait on
an event stands for a slow disk (an fsync) or a far Redis."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time

import pytest
import torch
from helpers import assert_same_as_plain, greedy

from vlcache_hf import CacheStore, VLCache
from vlcache_hf.store.entry import StoredEntry
from vlcache_hf.store.tiers import MemoryTier, TierStats
from vlcache_hf.store.writer import WriteBehind
from vlcache_hf.tools import toy

KEY = "kv-" + "c" * 64


def entry(value: float = 1.0) -> StoredEntry:
    return StoredEntry({"kv": torch.full((16,), value)}, {"kind": "kv"})


class SlowTier:
    """A persistent dict tier whose `put` waits until `release` is set."""

    persistent = True

    def __init__(self, name: str = "slow"):
        self.name, self.data, self.release, self.writing = name, {}, threading.Event(), threading.Event()

    def get(self, key):
        return self.data.get(key)

    def put(self, key, value):
        self.writing.set()
        assert self.release.wait(30), "test tier never released"
        self.data[key] = value
        return []

    def contains(self, key):
        return key in self.data

    def evict(self, key):
        return self.data.pop(key, None) is not None

    def stats(self):
        return TierStats(self.name, entries=len(self.data))

    def check_health(self):
        pass

    def close(self):
        pass


def test_put_returns_before_the_persistent_write_and_reads_see_it_in_flight():
    slow = SlowTier()
    store = CacheStore([MemoryTier(1), slow])  # a memory tier that keeps nothing: only the in-flight map can answer
    started = time.perf_counter()
    store.put(KEY, entry(3.0))
    assert time.perf_counter() - started < 5 and slow.writing.wait(5) and KEY not in slow.data
    got = store.get(KEY)
    assert got is not None and torch.equal(got.tensors["kv"], entry(3.0).tensors["kv"]) and store.contains(KEY)
    slow.release.set()
    assert store.flush(10) and KEY in slow.data


def test_discard_drops_a_write_in_flight_for_good():
    slow = SlowTier()
    store = CacheStore([MemoryTier(10**6), slow])
    store.put("kv-" + "d" * 64, entry(1.0))  # occupies the writer (blocked in the tier)
    assert slow.writing.wait(5)
    store.put(KEY, entry(2.0))  # queued behind it
    discarding = threading.Thread(target=store.discard, args=(KEY,))
    discarding.start()  # waits for the write running now, then drops KEY's: whichever comes first, KEY ends gone
    time.sleep(0.2)
    slow.release.set()
    discarding.join(10)
    assert not discarding.is_alive() and store.flush(10)
    assert KEY not in slow.data and store.get(KEY) is None and "kv-" + "d" * 64 in slow.data


def test_queue_is_bounded():
    slow = SlowTier()
    store = CacheStore([MemoryTier(10**6), slow], max_pending_writes=1)
    store.put("kv-" + "1" * 64, entry())  # taken by the writer, blocked in the tier
    assert slow.writing.wait(5)
    store.put("kv-" + "2" * 64, entry())  # fills the queue of one
    third = threading.Thread(target=store.put, args=("kv-" + "3" * 64, entry()))
    third.start()
    third.join(0.5)
    assert third.is_alive()  # waits for room: memory held by writes in flight stays bounded
    slow.release.set()
    third.join(10)
    assert not third.is_alive() and store.flush(10) and len(slow.data) == 3


def test_without_write_behind_put_writes_before_returning():
    slow = SlowTier()
    slow.release.set()
    store = CacheStore([MemoryTier(10**6), slow], write_behind=False)
    store.put(KEY, entry())
    assert KEY in slow.data


def test_requests_through_a_disk_store_equal_plain_while_writes_are_in_flight(models, images, tmp_path):
    """A later request finds what an earlier one published before the disk write is done (a chat turn), and
    its answer is plain generate's."""
    model, processor = models()
    store = CacheStore([MemoryTier(1), f"disk://{tmp_path}"])  # nothing kept in memory: hits come from disk or in flight
    first = toy.chat_inputs(processor, [toy.message("user", images[0], images[1], "What is shown?")])
    greedy(model, first, VLCache(model, store=store, prefix_chunk_size=16))
    repeat = assert_same_as_plain(model, first, lambda: VLCache(model, store=store, prefix_chunk_size=16))
    assert repeat.report.encoder_hits == 2 and repeat.report.reused_tokens > 0
    assert store.flush(30)
    other = CacheStore(f"disk://{tmp_path}")  # another process's view, once written
    again = assert_same_as_plain(model, first, lambda: VLCache(model, store=other, prefix_chunk_size=16))
    assert again.report.encoder_hits == 2


def test_interpreter_exit_writes_what_is_in_flight(tmp_path):
    script = (
        "import torch\n"
        "from vlcache_hf import CacheStore\n"
        "from vlcache_hf.store.entry import StoredEntry\n"
        f"store = CacheStore('disk://{tmp_path}')\n"
        f"store.put('{KEY}', StoredEntry({{'kv': torch.ones(1 << 16)}}, {{'kind': 'kv'}}))\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    got = CacheStore(f"disk://{tmp_path}").get(KEY)
    assert got is not None and got.tensors["kv"].numel() == 1 << 16


# -- WriteBehind on its own (eval/mutate.py writer) -------------------------------------------------------------


def _blocked_writer() -> tuple[WriteBehind, threading.Event, list]:
    """A writer whose writes wait for `release`; `written` records (key, thread) per write."""
    release, written = threading.Event(), []

    def write(key, value):
        assert release.wait(30), "test writer never released"
        written.append((key, threading.current_thread()))

    return WriteBehind(write), release, written


def test_max_pending_must_be_positive():
    with pytest.raises(ValueError, match="max_pending must be at least 1, got 0"):
        WriteBehind(lambda key, value: None, max_pending=0)


def test_writes_run_on_one_named_daemon_thread_and_leave_nothing_in_flight():
    writer, release, written = _blocked_writer()
    assert writer.flush(0) is True  # nothing submitted yet: flushed at once
    first, second = entry(1.0), entry(2.0)
    writer.submit(KEY, first)
    writer.submit("kv-" + "e" * 64, second)
    assert writer.pending(KEY) is first and len(writer) == 2
    release.set()
    assert writer.flush(10)
    assert [key for key, _ in written] == [KEY, "kv-" + "e" * 64]
    threads = {thread for _, thread in written}
    assert len(threads) == 1
    (thread,) = threads
    # a daemon: a writer waiting for work must never keep the interpreter from exiting
    assert thread.name == "vlcache-write-behind" and thread.daemon and thread is not threading.current_thread()
    assert writer.pending(KEY) is None and len(writer) == 0


def test_cancel_forgets_a_queued_write():
    """Once `cancel` returns, no write of the key runs or will run (one already done may have happened
    before: the store's `discard` then evicts it from the tiers)."""
    writer, release, written = _blocked_writer()
    writer.submit("kv-" + "d" * 64, entry(1.0))  # the writer takes it and waits inside the write
    writer.submit(KEY, entry(2.0))

    def cancel() -> None:
        writer.cancel(KEY)  # waits for a write in progress
        written.append(("cancel returned", threading.current_thread()))

    cancelling = threading.Thread(target=cancel)
    cancelling.start()
    time.sleep(0.1)
    release.set()
    cancelling.join(10)
    assert not cancelling.is_alive() and writer.pending(KEY) is None
    assert writer.flush(10)
    order = [key for key, _ in written]
    assert "kv-" + "d" * 64 in order and KEY not in order[order.index("cancel returned") :]


def test_flush_times_out_and_leaves_no_thread_that_holds_up_exit():
    writer, release, _ = _blocked_writer()
    writer.submit(KEY, entry())
    before = {t for t in threading.enumerate() if not t.daemon}
    result: list[bool] = []
    caller = threading.Thread(target=lambda: result.append(writer.flush(0.2)), daemon=True)
    caller.start()
    caller.join(10)
    assert result == [False]  # the write is still blocked: not flushed, and flush returned after its timeout
    assert {t for t in threading.enumerate() if not t.daemon} == before
    release.set()
    assert writer.flush(10) and len(writer) == 0


def test_a_failing_write_is_logged_and_the_writer_goes_on(caplog):
    written = []

    def write(key, value):
        if key == KEY:
            raise RuntimeError("tier on fire")
        written.append(key)

    writer = WriteBehind(write)
    with caplog.at_level(logging.ERROR, logger="vlcache_hf.store.writer"):
        writer.submit(KEY, entry())
        writer.submit("kv-" + "e" * 64, entry())
        assert writer.flush(10)
    assert written == ["kv-" + "e" * 64]
    assert [r.getMessage() for r in caplog.records] == ["write-behind of a store entry failed"]
    assert caplog.records[0].exc_info[1].args == ("tier on fire",)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_has_nothing_to_flush():
    """Threads do not survive fork: the child's writer owns none of the parent's queued writes."""
    writer, release, _ = _blocked_writer()
    writer.submit(KEY, entry())
    pid = os.fork()
    if pid == 0:  # child: must not wait for the parent's blocked write
        os._exit(0 if writer.flush(0.5) is True and writer.pending(KEY) is None else 1)
    _, status = os.waitpid(pid, 0)
    release.set()
    assert os.waitstatus_to_exitcode(status) == 0
    assert writer.flush(10)
