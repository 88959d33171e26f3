"""Finding a request's `VLCache` among a model call's arguments.

The hook and the encoder wrapper both need it, and `cache.py` imports both of them (to install them), so this
leaf module keeps the import graph free of cycles: `cache.py` registers its class here, and the lookup needs
no import of it.
"""

from __future__ import annotations

from typing import Any

_cache_types: tuple[type, ...] = ()


def register_cache_type(cls: type) -> type:
    """Make `find_cache` recognise instances of `cls` (done once by `cache.py` for `VLCache`)."""
    global _cache_types
    if cls not in _cache_types:
        _cache_types = (*_cache_types, cls)
    return cls


def find_cache(kwargs: dict[str, Any]) -> Any | None:
    """The registered cache passed as `cache=` (transformers >= 5.2x) or `past_key_values=`, if any."""
    for name in ("cache", "past_key_values"):
        value = kwargs.get(name)
        if _cache_types and isinstance(value, _cache_types):
            return value
    return None
