"""`CacheStore`: an ordered list of tiers shared by many requests.

Lookups walk the tiers top-down and promote a hit to the tiers above it; writes go to the top tier and
whatever it evicts spills to the next one down. Tiers marked `persistent` (disk, Redis) are also written
through, so a restart loses nothing that was published — in the background by default (`write_behind`,
`store.writer`): an fsync or a Redis round trip never sits in a request's time to first token, reads in this
process see entries still in flight, `flush()` waits for them, and other processes see an entry once it is
written. One store serves many `VLCache` objects (one per request).

A store is a cache, so a tier that fails is a miss, never a crash: every tier call goes through
`CacheStore._call`, which answers a failing call (unreachable Redis, full or read-only disk, permission
error, ...) with what the store would answer without that tier, counts it in `stats()` (`errors`), marks
the tier unhealthy with one warning, skips it until its retry time (exponential backoff) and logs when it
recovers. Secrets in a tier's messages are redacted by the tier (`redact`).

Tiers come as objects (anything implementing `tiers.Tier`), as URLs (`"cpu://8GiB"`,
`"disk:///data/vlcache?budget=50GiB"`, `"redis://host:6379/0?budget=1GiB"`: `store.factory`) or as keywords
(`cpu="8GiB"`, `disk=...`); URLs and keywords are built by the same `factory.build_tier`. `close()` (or
`with CacheStore(...) as store:`) closes every tier.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

from ..errors import VLCacheError
from .codec import check_key
from .entry import StoredEntry
from .factory import DEFAULT_MEMORY_BUDGET, build_tier, keyword_specs, parse_bytes, tier_from_url
from .tiers import MemoryTier, Tier, TierStats, missing_members
from .writer import DEFAULT_MAX_PENDING, WriteBehind

__all__ = ["DEFAULT_MEMORY_BUDGET", "CacheStore", "TierHealthReport", "parse_bytes"]

T = TypeVar("T")

logger = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class TierHealthReport:
    """One tier's answer to `CacheStore.health()`: whether it can serve now, and why not."""

    name: str
    healthy: bool
    detail: str = ""


class CacheStore:
    """Encoder and KV entries of many requests, across tiers.

    `CacheStore()` is one in-memory tier that keeps tensors on the model's device, within 4 GiB.
    """

    def __init__(
        self,
        tiers: Sequence[Tier | str] | str | None = None,
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
        write_behind: bool = True,
        max_pending_writes: int = DEFAULT_MAX_PENDING,
    ):
        """`CacheStore()`, `CacheStore([tier, ...])`, `CacheStore(["cpu://8GiB", "disk:///data?budget=50GiB"])`,
        or `CacheStore(gpu="2GiB", cpu="8GiB", disk="~/.cache/vlcache", redis="redis://127.0.0.1:6379/0")`.

        Tiers are stacked top-down: those given in `tiers` (objects or tier URLs, see `store.factory`), then
        the keyword ones in the order gpu, cpu, disk, redis.
        `disk_mode=0o660` (or 0o664) creates the disk tier's files, lock and directory group-accessible, so
        several Unix users can share it; default private (0o600). `redis_budget` caps the bytes all processes
        sharing the Redis server keep there (LRU eviction, enforced atomically; set it below `maxmemory`). A failing tier is skipped for `retry_after`
        seconds, doubling per consecutive failure up to `max_retry_after`. `write_behind=True` writes persistent
        tiers on a background thread (at most `max_pending_writes` entries queued); False writes them before
        `put` returns.
        """
        if retry_after < 0 or max_retry_after < retry_after:
            raise VLCacheError(f"need 0 <= retry_after <= max_retry_after, got {retry_after}, {max_retry_after}")
        given = [tiers] if isinstance(tiers, str) else list(tiers or [])
        specs = keyword_specs(
            gpu=gpu, cpu=cpu, disk=disk, disk_budget=disk_budget, disk_mode=disk_mode, redis=redis, redis_budget=redis_budget
        )
        for tier in given:
            if not isinstance(tier, str) and missing_members(tier):
                raise VLCacheError(
                    f"{type(tier).__name__} is not a store tier: it lacks {missing_members(tier)} "
                    "(see vlcache_hf.store.tiers.Tier), and is not a tier URL such as 'cpu://8GiB'"
                )
        built: list[Tier] = []
        try:
            built += [tier_from_url(tier) if isinstance(tier, str) else tier for tier in given]
            built += [build_tier(spec) for spec in specs]
        except BaseException:
            for tier in built:  # do not leak the connections of tiers built before the one that failed
                if not any(tier is g for g in given):
                    _close_quietly(tier)
            raise
        self.tiers: list[Tier] = built or [MemoryTier(DEFAULT_MEMORY_BUDGET)]
        self.retry_after, self.max_retry_after = float(retry_after), float(max_retry_after)
        self._health = [TierHealth() for _ in self.tiers]
        self._health_lock = threading.Lock()
        self._persistent_levels = [level for level, tier in enumerate(self.tiers) if tier.persistent]
        self._writer = (
            WriteBehind(self._write_persistent, max_pending_writes) if write_behind and self._persistent_levels else None
        )

    @classmethod
    def from_url(cls, url: str, *more: str, retry_after: float = 1.0, max_retry_after: float = 60.0) -> CacheStore:
        """A store of the tiers these URLs describe, top-down, e.g.
        `CacheStore.from_url("cpu://8GiB", "disk:///data/vlcache?budget=50GiB&mode=0660")`."""
        return cls([url, *more], retry_after=retry_after, max_retry_after=max_retry_after)

    @classmethod
    def from_config(cls, config: dict) -> CacheStore:
        """A store from a dict such as `{"cpu": "8GiB", "disk": "/data/vlcache", "redis": "redis://..."}` or
        `{"tiers": ["cpu://8GiB", "disk:///data/vlcache?budget=50GiB"]}`."""
        allowed = {"tiers", "gpu", "cpu", "disk", "disk_budget", "disk_mode", "redis", "redis_budget", "retry_after",
                   "max_retry_after", "write_behind", "max_pending_writes"}
        unknown = set(config) - allowed
        if unknown:
            raise VLCacheError(f"unknown CacheStore settings {sorted(unknown)}; use {sorted(allowed)}")
        return cls(**config)

    # -- lifetime ---------------------------------------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every entry put so far is written to the persistent tiers; True unless `timeout` passed."""
        return True if self._writer is None else self._writer.flush(timeout)

    def close(self) -> None:
        """Write what is in flight, then close every tier (Redis connections, ...). A tier that fails to close is
        logged, not raised."""
        self.flush()
        for tier in self.tiers:
            _close_quietly(tier)

    def __enter__(self) -> CacheStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def health(self) -> list[TierHealthReport]:
        """Ask every tier now whether it can serve (`Tier.check_health`), whatever its backoff says."""
        reports = []
        for tier in self.tiers:
            try:
                tier.check_health()
            except Exception as err:  # the reason is the report
                reports.append(TierHealthReport(tier.name, False, _redacted(tier, f"{type(err).__name__}: {err}")))
            else:
                reports.append(TierHealthReport(tier.name, True))
        return reports

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
        message = _redacted(tier, f"{type(err).__name__}: {err}")
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
        check_key(key)

    # -- the store's operations -------------------------------------------------------------------------------

    def _in_flight(self, key: str) -> StoredEntry | None:
        return None if self._writer is None else self._writer.pending(key)

    def get(self, key: str) -> StoredEntry | None:
        """The entry under `key` from the highest tier that has it (promoted upward), or None. An entry still
        on its way to the persistent tiers is found where they would be."""
        self._check_key(key)
        for level, tier in enumerate(self.tiers):
            entry = self._in_flight(key) if tier.persistent else None
            if entry is None:
                entry = self._call(level, lambda tier=tier: tier.get(key), None)
            if entry is not None:
                for upper in reversed(range(level)):
                    self._put_into(upper, key, entry)
                return entry
        return None

    def put(self, key: str, entry: StoredEntry) -> None:
        """Store `entry` in the top tier (evicted entries spill down) and in every persistent tier — those in
        the background with `write_behind` (the default)."""
        self._check_key(key)
        if self._writer is not None:
            self._writer.submit(key, entry)  # first: in flight, so a spill from the top tier need not write it
        if not self.tiers[0].persistent:
            self._put_into(0, key, entry)
        if self._writer is None:
            self._write_persistent(key, entry)

    def _write_persistent(self, key: str, entry: StoredEntry) -> None:
        for level in self._persistent_levels:
            self._put_into(level, key, entry)

    def _put_into(self, level: int, key: str, entry: StoredEntry) -> None:
        tier = self.tiers[level]
        spilled = self._call(level, lambda: tier.put(key, entry), [], write=True)
        below = level + 1
        for lower_key, lower_entry in spilled:
            if below < len(self.tiers):
                lower = self.tiers[below]
                if lower.persistent and self._in_flight(lower_key) is not None:
                    continue  # on its way there already
                if not self._call(below, lambda lower=lower, k=lower_key: lower.contains(k), True):
                    self._put_into(below, lower_key, lower_entry)

    def contains(self, key: str) -> bool:
        self._check_key(key)
        if self._in_flight(key) is not None:
            return True
        return any(self._call(level, lambda t=tier: t.contains(key), False) for level, tier in enumerate(self.tiers))

    def discard(self, key: str) -> None:
        """Remove `key` from every tier (used when an entry turns out not to fit this model); a write of it
        still in flight is dropped, never written after this returns."""
        self._check_key(key)
        if self._writer is not None:
            self._writer.cancel(key)
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


def _redacted(tier: Tier, text: str) -> str:
    """`text` with the tier's secrets removed, for tiers that define `redact` (an optional part of `Tier`)."""
    redact = getattr(tier, "redact", None)
    return redact(text) if callable(redact) else text


def _close_quietly(tier: Tier) -> None:
    try:
        tier.close()
    except Exception as err:  # closing is best effort: a dead server's connection is gone anyway
        logger.warning("closing store tier %s failed: %s", tier.name, _redacted(tier, f"{type(err).__name__}: {err}"))
