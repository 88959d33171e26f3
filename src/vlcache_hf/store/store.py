"""`CacheStore`: an ordered list of tiers shared by many requests.

Lookups walk the tiers top-down and promote a hit to the tiers above it; writes go to the top tier and
whatever it evicts spills to the next one down. One store serves many `VLCache` objects (one per request).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from .entry import StoredEntry
from .tiers import MemoryTier, Tier, TierStats

logger = logging.getLogger(__name__)

DEFAULT_MEMORY_BUDGET = 4 * 1024**3


class CacheStore:
    """Encoder and KV entries of many requests, across tiers.

    `CacheStore()` is one in-memory tier that keeps tensors on the model's device, within 4 GiB.
    """

    def __init__(self, tiers: Sequence[Tier] | None = None):
        self.tiers: list[Tier] = list(tiers) if tiers else [MemoryTier(DEFAULT_MEMORY_BUDGET)]
        if not self.tiers:
            raise ValueError("a CacheStore needs at least one tier")

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
        """Store `entry` in the top tier; evicted entries spill down the tiers."""
        self._put_into(self.tiers[0], key, entry, start=0)

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
