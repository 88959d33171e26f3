"""The store: `CacheStore` over tiers (`MemoryTier`, `DiskTier`, `RedisTier`), built from objects, URLs or
keywords.

    from vlcache_hf.store import CacheStore
    store = CacheStore.from_url("cpu://8GiB", "disk:///data/vlcache?budget=50GiB")

Modules: `store.py` (`CacheStore`: promotion, spilling, faults as misses), `tiers.py` (the `Tier` protocol
and `MemoryTier`), `disk.py`, `redis_tier.py`, `codec.py` (the entry format every persistent tier stores),
`factory.py` (tier URLs and keywords → tiers), `entry.py` (typed entries), `keys.py` (content keys).
Names are imported on first use, so `import vlcache_hf.store.keys` stays light and `RedisTier` needs
redis-py only when a Redis tier is built.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "CacheStore": ".store",
    "TierHealthReport": ".store",
    "Tier": ".tiers",
    "TierStats": ".tiers",
    "MemoryTier": ".tiers",
    "DiskTier": ".disk",
    "RedisTier": ".redis_tier",
    "StoredEntry": ".entry",
    "parse_bytes": ".factory",
    "parse_tier_url": ".factory",
    "tier_from_url": ".factory",
}

if TYPE_CHECKING:  # static type checkers and IDEs see the eager imports
    from .disk import DiskTier
    from .entry import StoredEntry
    from .factory import parse_bytes, parse_tier_url, tier_from_url
    from .redis_tier import RedisTier
    from .store import CacheStore, TierHealthReport
    from .tiers import MemoryTier, Tier, TierStats

__all__ = [
    "CacheStore",
    "DiskTier",
    "MemoryTier",
    "RedisTier",
    "StoredEntry",
    "Tier",
    "TierHealthReport",
    "TierStats",
    "parse_bytes",
    "parse_tier_url",
    "tier_from_url",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
