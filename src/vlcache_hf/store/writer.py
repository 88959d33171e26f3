"""`WriteBehind`: writes to persistent tiers (disk fsync, Redis round trips) off the request's critical path.

A request publishes its entries after its prefill, before its first token: writing them through to disk or
Redis there would put an fsync or a network round trip into the time to first token. So `CacheStore.put`
writes the memory tiers at once and hands the persistent writes to one daemon thread through a bounded
queue (a full queue makes `put` wait: memory held by entries in flight stays bounded).

Ordering: until an entry is written, it is *in flight* and `pending(key)` returns it, so the store's reads
see it — a later request in this process never misses an entry an earlier one published. `cancel(key)`
(the store's `discard`) removes it; a write that has not started is then skipped, and one that has started
finishes before `cancel` returns, so a discarded entry is never written after its discard. `flush()` waits
until everything queued is written (`CacheStore.flush`, `close`, and at interpreter exit). Other processes
see an entry once it is written.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
import weakref
from collections.abc import Callable

from .entry import StoredEntry

logger = logging.getLogger(__name__)

DEFAULT_MAX_PENDING = 256
#: how long interpreter exit waits for writes still in flight
EXIT_FLUSH_SECONDS = 30.0


class WriteBehind:
    """One writer thread calling `write(key, entry)` for each submitted entry, in submission order."""

    def __init__(self, write: Callable[[str, StoredEntry], None], max_pending: int = DEFAULT_MAX_PENDING):
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, got {max_pending}")
        self._write, self._max_pending = write, max_pending
        self._map_lock = threading.Lock()  # guards _in_flight (held briefly)
        self._write_lock = threading.Lock()  # one write at a time, and cancel waits for the one running
        self._start()
        _writers.add(self)

    def _start(self) -> None:
        """(Re)create the queue and thread: at construction, and in a forked child (threads do not survive fork)."""
        self._pid = os.getpid()
        self._queue: queue.Queue[tuple[str, StoredEntry] | None] = queue.Queue(self._max_pending)
        self._in_flight: dict[str, StoredEntry] = {}
        self._thread: threading.Thread | None = None

    def _ensure_thread(self) -> None:
        if self._pid != os.getpid():
            self._start()
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="vlcache-write-behind", daemon=True)
            self._thread.start()

    def submit(self, key: str, entry: StoredEntry) -> None:
        """Queue `entry` for writing under `key` (waits while `max_pending` writes are queued)."""
        with self._map_lock:
            self._ensure_thread()
            self._in_flight[key] = entry
        self._queue.put((key, entry))

    def pending(self, key: str) -> StoredEntry | None:
        """The entry queued under `key` and not written yet, if any."""
        if self._pid != os.getpid():
            return None
        with self._map_lock:
            return self._in_flight.get(key)

    def cancel(self, key: str) -> None:
        """Forget `key`'s queued write; when this returns, no write of it is running or will run."""
        with self._write_lock, self._map_lock:
            self._in_flight.pop(key, None)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every submitted entry is written (or `timeout` seconds pass); True when all are."""
        if self._pid != os.getpid() or self._thread is None:
            return True
        done = threading.Event()

        def wait() -> None:
            self._queue.join()
            done.set()

        threading.Thread(target=wait, daemon=True).start()
        return done.wait(timeout)

    def __len__(self) -> int:
        with self._map_lock:
            return len(self._in_flight)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                key, entry = item
                with self._write_lock:
                    with self._map_lock:
                        current = self._in_flight.get(key) is entry  # not cancelled, not replaced by a newer put
                    if current:
                        self._write(key, entry)
                        with self._map_lock:
                            if self._in_flight.get(key) is entry:
                                del self._in_flight[key]
            except Exception:  # the store's tier calls turn faults into misses; anything else must not kill us
                logger.exception("write-behind of a store entry failed")
            finally:
                self._queue.task_done()


_writers: weakref.WeakSet[WriteBehind] = weakref.WeakSet()


@atexit.register
def _flush_at_exit() -> None:
    for writer in list(_writers):
        if not writer.flush(EXIT_FLUSH_SECONDS):
            logger.warning("exiting with %d store writes still in flight (not written)", len(writer))
