"""`CacheStore`: an ordered list of tiers shared by many requests.

Lookups walk the tiers top-down and promote a hit to the tiers above it; writes go to the top tier and
whatever it evicts spills to the next one down. Tiers marked `persistent` (disk, Redis) are also written
through at once, so a restart or a crash loses nothing that was published. One store serves many `VLCache`
objects (one per request).

A store is a cache, so a tier that fails is a miss, never a crash: every tier call goes through
`CacheStore._call`, which answers a failing call (unreachable Redis, full or read-only disk, permission
error, ...) with what the store would answer without that tier, counts it in `stats()` (`errors`), marks
the tier unhealthy with one warning, skips it until its retry time (exponential backoff) and logs when it
recovers. Secrets in a tier's messages are redacted by the tier (`redact`).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

import torch

from ..errors import VLCacheError
from .entry import StoredEntry
from .tiers import MemoryTier, Tier, TierStats

T = TypeVar("T")
_KEY = re.compile(r"^[a-z]+-[0-9a-f]{64}$")  # as keys.entry_key makes them: safe as file and Redis names

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(size: int | str) -> int:
    """Bytes from an int or a human string such as "512MB", "2GiB", "1.5 gb"."""
    if isinstance(size, bool):
        raise VLCacheError(f"invalid size {size!r}")
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(size))
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise VLCacheError(f"invalid size {size!r}; use bytes or a string like '512MB' or '2GiB'")
        value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise VLCacheError(f"size must be positive, got {size!r}")
    return value

logger = logging.getLogger(__name__)

DEFAULT_MEMORY_BUDGET = 4 * 1024**3


@dataclass
class Backoff:
    """One direction (reads or writes) of one tier: usable now, or skipped until `retry_at`."""

    healthy: bool = True
    delay: float = 0.0
    retry_at: float = 0.0


@dataclass
class TierHealth:
    """A tier's failures, with reads and writes backed off apart: a full disk still serves its hits."""

    errors: int = 0
    read: Backoff = field(default_factory=Backoff)
    write: Backoff = field(default_factory=Backoff)
    last_stats: TierStats | None = None

    @property
    def healthy(self) -> bool:
        return self.read.healthy and self.write.healthy


class CacheStore:
    """Encoder and KV entries of many requests, across tiers.

    `CacheStore()` is one in-memory tier that keeps tensors on the model's device, within 4 GiB.
    """

    def __init__(
        self,
        tiers: Sequence[Tier] | None = None,
        *,
        gpu: int | str | None = None,
        cpu: int | str | None = None,
        disk: str | None = None,
        disk_budget: int | str = "50GiB",
        disk_mode: int | None = None,
        redis: str | None = None,
        redis_budget: int | str | None = None,
        retry_after: float = 1.0,
        max_retry_after: float = 60.0,
    ):
        """`CacheStore()`, `CacheStore([tier, ...])`, or
        `CacheStore(gpu="2GiB", cpu="8GiB", disk="~/.cache/vlcache", redis="redis://127.0.0.1:6379/0")`.

        `disk_mode=0o660` (or 0o664) creates the disk tier's files, lock and directory group-accessible, so
        several Unix users can share it; default private (0o600). `redis_budget` caps the bytes all processes
        sharing the Redis server keep there (LRU eviction, enforced atomically; set it below `maxmemory`). A failing tier is skipped for `retry_after`
        seconds, doubling per consecutive failure up to `max_retry_after`.
        """
        if retry_after < 0 or max_retry_after < retry_after:
            raise VLCacheError(f"need 0 <= retry_after <= max_retry_after, got {retry_after}, {max_retry_after}")
        built: list[Tier] = list(tiers or [])
        if gpu is not None:
            if not torch.cuda.is_available():
                raise VLCacheError("CacheStore(gpu=...) needs CUDA; use cpu=... on this machine")
            built.append(MemoryTier(parse_bytes(gpu), device="cuda"))
        if cpu is not None:
            built.append(MemoryTier(parse_bytes(cpu), device="cpu"))
        if disk is not None:
            from .disk import DiskTier

            built.append(DiskTier(disk, parse_bytes(disk_budget), mode=disk_mode))
        elif disk_mode is not None:
            raise VLCacheError("disk_mode is a setting of the disk tier: give disk=... too")
        if redis is not None:
            from .redis_tier import RedisTier

            built.append(RedisTier(redis, budget_bytes=None if redis_budget is None else parse_bytes(redis_budget)))
        elif redis_budget is not None:
            raise VLCacheError("redis_budget is a setting of the Redis tier: give redis=... too")
        self.tiers = built or [MemoryTier(DEFAULT_MEMORY_BUDGET)]
        self.retry_after, self.max_retry_after = float(retry_after), float(max_retry_after)
        self._health = [TierHealth() for _ in self.tiers]
        self._health_lock = threading.Lock()

    @classmethod
    def from_config(cls, config: dict) -> CacheStore:
        """A store from a dict such as `{"cpu": "8GiB", "disk": "/data/vlcache", "redis": "redis://..."}`."""
        allowed = {"gpu", "cpu", "disk", "disk_budget", "disk_mode", "redis", "redis_budget", "retry_after", "max_retry_after"}
        unknown = set(config) - allowed
        if unknown:
            raise VLCacheError(f"unknown CacheStore settings {sorted(unknown)}; use {sorted(allowed)}")
        return cls(**config)

    # -- the one place where tier faults become misses ------------------------------------------------------

    def _call(self, level: int, call: Callable[[], T], default: T, write: bool = False) -> T:
        """`call()` on tier `level`, or `default` if that direction of the tier is backing off or the call fails."""
        health = self._health[level]
        direction = health.write if write else health.read
        if not direction.healthy and time.monotonic() < direction.retry_at:
            return default
        try:
            result = call()
        except Exception as err:  # any fault of a cache tier is a miss; the request goes on without it
            self._failed(level, direction, err)
            return default
        if not direction.healthy:
            with self._health_lock:
                direction.healthy, direction.delay = True, 0.0
                recovered = health.healthy
            if recovered:
                logger.warning("store tier %s is healthy again", self.tiers[level].name)
        return result

    def _failed(self, level: int, direction: Backoff, err: Exception) -> None:
        tier, health = self.tiers[level], self._health[level]
        redact = getattr(tier, "redact", None)
        message = f"{type(err).__name__}: {err}"
        message = redact(message) if callable(redact) else message
        with self._health_lock:
            health.errors += 1
            first = health.healthy  # one warning when the tier turns unhealthy, not one per failing call
            direction.delay = self.retry_after if direction.healthy else min(self.max_retry_after, direction.delay * 2)
            direction.healthy = False
            direction.retry_at = time.monotonic() + direction.delay
        if first:
            logger.warning(
                "store tier %s is unhealthy (%s); it is skipped (lookups are misses) and retried in %.1f s",
                tier.name,
                message,
                direction.delay,
            )
        else:
            logger.debug("store tier %s still failing (%s); next try in %.1f s", tier.name, message, direction.delay)

    @staticmethod
    def _check_key(key: str) -> None:
        if not _KEY.match(key):
            raise ValueError(f"invalid store key {key!r}")

    # -- the store's operations -------------------------------------------------------------------------------

    def get(self, key: str) -> StoredEntry | None:
        """The entry under `key` from the highest tier that has it (promoted upward), or None."""
        self._check_key(key)
        for level, tier in enumerate(self.tiers):
            entry = self._call(level, lambda tier=tier: tier.get(key), None)
            if entry is not None:
                for upper in reversed(range(level)):
                    self._put_into(upper, key, entry)
                return entry
        return None

    def put(self, key: str, entry: StoredEntry) -> None:
        """Store `entry` in the top tier (evicted entries spill down) and in every persistent tier below it."""
        self._check_key(key)
        self._put_into(0, key, entry)
        for level, tier in enumerate(self.tiers[1:], start=1):
            if getattr(tier, "persistent", False):
                self._put_into(level, key, entry)

    def _put_into(self, level: int, key: str, entry: StoredEntry) -> None:
        tier = self.tiers[level]
        spilled = self._call(level, lambda: tier.put(key, entry), [], write=True)
        below = level + 1
        for lower_key, lower_entry in spilled:
            if below < len(self.tiers):
                lower = self.tiers[below]
                if not self._call(below, lambda lower=lower, k=lower_key: lower.contains(k), True):
                    self._put_into(below, lower_key, lower_entry)

    def contains(self, key: str) -> bool:
        self._check_key(key)
        return any(self._call(level, lambda t=tier: t.contains(key), False) for level, tier in enumerate(self.tiers))

    def discard(self, key: str) -> None:
        """Remove `key` from every tier (used when an entry turns out not to fit this model)."""
        self._check_key(key)
        for level, tier in enumerate(self.tiers):
            self._call(level, lambda t=tier: t.evict(key), False, write=True)

    def stats(self) -> list[TierStats]:
        """Counters per tier; a failing tier reports its last known counters, `errors` and `healthy=False`."""
        result = []
        for level, tier in enumerate(self.tiers):
            health = self._health[level]
            stats = self._call(level, tier.stats, None)
            if stats is not None:
                health.last_stats = stats
            base = stats or health.last_stats or TierStats(tier.name, byte_budget=getattr(tier, "byte_budget", 0))
            result.append(replace(base, errors=health.errors, healthy=health.healthy))
        return result

    def __repr__(self) -> str:
        return f"CacheStore(tiers={[t.name for t in self.tiers]})"
