"""Exceptions raised by vlcache-hf.

Every error a user can cause derives from `VLCacheError` (itself a `ValueError`, so code that already
catches bad-argument errors keeps working) and says what to change.
"""

from __future__ import annotations


class VLCacheError(ValueError):
    """Bad input or configuration: the message names what to change."""


class UnsupportedModelError(VLCacheError):
    """The model's family has no adapter in `vlcache_hf.models`."""


class EntryMismatchError(Exception):
    """A stored entry does not belong to this model / format / shape.

    Internal: lookups turn it into a miss (and drop the entry) so a request never uses foreign KV.
    """
