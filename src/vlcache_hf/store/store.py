"""`CacheStore`: an ordered list of tiers shared by many requests.

Lookups walk the tiers top-down and promote a hit to the tiers above it; writes go to the top tier and
whatever it evicts spills to the next one down. Tiers marked `persistent` (disk, Redis) are also written
through at once, so a restart or a crash loses nothing that was published. One store serves many `VLCache`
objects (one per request).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

import torch

from ..errors import VLCacheError
from .entry import StoredEntry
from .tiers import MemoryTier, Tier, TierStats

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
        redis: str | None = None,
    ):
        """`CacheStore()`, `CacheStore([tier, ...])`, or
        `CacheStore(gpu="2GiB", cpu="8GiB", disk="~/.cache/vlcache", redis="redis://127.0.0.1:6379/0")`."""
        built: list[Tier] = list(tiers or [])
        if gpu is not None:
            if not torch.cuda.is_available():
                raise VLCacheError("CacheStore(gpu=...) needs CUDA; use cpu=... on this machine")
            built.append(MemoryTier(parse_bytes(gpu), device="cuda"))
        if cpu is not None:
            built.append(MemoryTier(parse_bytes(cpu), device="cpu"))
        if disk is not None:
            from .disk import DiskTier

            built.append(DiskTier(disk, parse_bytes(disk_budget)))
        if redis is not None:
            from .redis_tier import RedisTier

            built.append(RedisTier(redis))
        self.tiers = built or [MemoryTier(DEFAULT_MEMORY_BUDGET)]

    @classmethod
    def from_config(cls, config: dict) -> CacheStore:
        """A store from a dict such as `{"cpu": "8GiB", "disk": "/data/vlcache", "redis": "redis://..."}`."""
        allowed = {"gpu", "cpu", "disk", "disk_budget", "redis"}
        unknown = set(config) - allowed
        if unknown:
            raise VLCacheError(f"unknown CacheStore settings {sorted(unknown)}; use {sorted(allowed)}")
        return cls(**config)

    def get(self, key: str) -> StoredEntry | None:
        """The entry under `key` from the highest tier that has it (promoted upward), or None."""
        for level, tier in enumerate(self.tiers):
            entry = tier.get(key)
            if entry is not None:
                for upper in reversed(self.tiers[:level]):
                    self._put_into(upper, key, entry, start=self.tiers.index(upper))
                return entry
        return None

    def put(self, key: str, entry: StoredEntry) -> None:
        """Store `entry` in the top tier (evicted entries spill down) and in every persistent tier below it."""
        self._put_into(self.tiers[0], key, entry, start=0)
        for level, tier in enumerate(self.tiers[1:], start=1):
            if getattr(tier, "persistent", False):
                self._put_into(tier, key, entry, start=level)

    def _put_into(self, tier: Tier, key: str, entry: StoredEntry, start: int) -> None:
        spilled = tier.put(key, entry)
        for lower_key, lower_entry in spilled:
            if start + 1 < len(self.tiers) and not self.tiers[start + 1].contains(lower_key):
                self._put_into(self.tiers[start + 1], lower_key, lower_entry, start + 1)

    def contains(self, key: str) -> bool:
        return any(tier.contains(key) for tier in self.tiers)

    def discard(self, key: str) -> None:
        """Remove `key` from every tier (used when an entry turns out not to fit this model)."""
        for tier in self.tiers:
            tier.evict(key)

    def stats(self) -> list[TierStats]:
        return [tier.stats() for tier in self.tiers]

    def __repr__(self) -> str:
        return f"CacheStore(tiers={[t.name for t in self.tiers]})"
