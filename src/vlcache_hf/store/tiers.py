"""Storage tiers behind one small protocol.

A tier stores `StoredEntry` objects under string keys within a byte budget and evicts by least-recent
use. It knows nothing of KV semantics: validation of what an entry *means* lives in `store.entry`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from .entry import StoredEntry


@dataclass
class TierStats:
    """Counters of one tier; `bytes_used` never exceeds `byte_budget`.

    `errors` counts the calls that failed (an unreachable Redis, a full disk, ...) and were answered as
    misses by `CacheStore`; `healthy` is False while the tier is skipped until its retry time.
    """

    name: str
    hits: int = 0
    misses: int = 0
    puts: int = 0
    evictions: int = 0
    entries: int = 0
    bytes_used: int = 0
    byte_budget: int = 0
    errors: int = 0
    healthy: bool = True


@runtime_checkable
class Tier(Protocol):
    """What `CacheStore` needs of a tier; `MemoryTier`, `DiskTier` and `RedisTier` implement it.

    A tier may raise from any call (a dead server, a full disk): `CacheStore` answers that call as a miss or
    a skipped write and backs the tier off, so a tier need not swallow its own faults. A tier whose messages
    can hold a secret also defines `redact(text) -> str` (optional; `RedisTier` does).
    """

    name: str
    #: True if entries survive this process (disk, Redis): `CacheStore.put` writes them through at once
    persistent: bool

    def get(self, key: str) -> StoredEntry | None: ...

    def put(self, key: str, entry: StoredEntry) -> list[tuple[str, StoredEntry]]:
        """Store `entry`; return the (key, entry) pairs evicted to make room, so a store can spill them down."""
        ...

    def contains(self, key: str) -> bool: ...

    def evict(self, key: str) -> bool:
        """Remove `key`; True if it was there."""
        ...

    def stats(self) -> TierStats: ...

    def check_health(self) -> None:
        """Return if the tier can serve now; raise (with the reason) if not: a server that does not answer, a
        directory that is gone, read-only or full."""
        ...

    def close(self) -> None:
        """Release connections or handles; `CacheStore.close()` calls it once per tier."""
        ...


def missing_members(tier: object) -> list[str]:
    """The members of `Tier` that `tier` lacks (empty when it implements the protocol)."""
    names = ("name", "persistent", "get", "put", "contains", "evict", "stats", "check_health", "close")
    return [n for n in names if not hasattr(tier, n)]


class MemoryTier:
    """Entries kept as tensors in GPU or CPU memory, LRU within a byte budget.

    `device=None` keeps tensors where they were put (the model's device), so a hit costs no copy.
    An entry larger than the whole budget is not stored (and returned as evicted at once).
    """

    persistent = False  # lost with the process: only spilled to the tier below when evicted

    def __init__(self, byte_budget: int, device: torch.device | str | None = None, name: str | None = None):
        if byte_budget <= 0:
            raise ValueError(f"byte_budget must be positive, got {byte_budget}")
        self.byte_budget = int(byte_budget)
        self.device = torch.device(device) if device is not None else None
        self.name = name or f"memory:{self.device or 'model'}"
        self._entries: OrderedDict[str, StoredEntry] = OrderedDict()
        self._bytes = 0
        self._stats = TierStats(self.name, byte_budget=self.byte_budget)
        self._lock = threading.RLock()

    def get(self, key: str) -> StoredEntry | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self._stats.misses += 1
                return None
            self._entries.move_to_end(key)
            self._stats.hits += 1
            return entry

    def put(self, key: str, entry: StoredEntry) -> list[tuple[str, StoredEntry]]:
        if self.device is not None:
            entry = entry.to(self.device)
        size = entry.nbytes
        with self._lock:
            self._stats.puts += 1
            if size > self.byte_budget:
                return [(key, entry)]
            if key in self._entries:
                self._bytes -= self._entries.pop(key).nbytes
            evicted: list[tuple[str, StoredEntry]] = []
            while self._bytes + size > self.byte_budget and self._entries:
                old_key, old = self._entries.popitem(last=False)
                self._bytes -= old.nbytes
                self._stats.evictions += 1
                evicted.append((old_key, old))
            self._entries[key] = entry
            self._bytes += size
            return evicted

    def contains(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def evict(self, key: str) -> bool:
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is None:
                return False
            self._bytes -= entry.nbytes
            self._stats.evictions += 1
            return True

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def stats(self) -> TierStats:
        with self._lock:
            self._stats.entries = len(self._entries)
            self._stats.bytes_used = self._bytes
            return TierStats(**vars(self._stats))

    def check_health(self) -> None:
        """Memory is always there."""

    def close(self) -> None:
        """Nothing to release (entries are freed with the tier)."""
