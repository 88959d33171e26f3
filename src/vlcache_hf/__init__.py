"""vlcache-hf: reuse vision-encoder outputs and KV caches of repeated images in Hugging Face VLMs.

    from vlcache_hf import VLCache, CacheStore
    store = CacheStore()
    out = model.generate(**inputs, past_key_values=VLCache(model, store=store), max_new_tokens=64)

`import vlcache_hf` is cheap: each public name is imported from its module on first use (PEP 562), so the
command line answers `--help` without importing torch, and the runtime never imports the tooling
(`vlcache_hf.tools`: toy models, benchmark, demo, the command line) or the integrations unless asked for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

# public name -> the module that defines it (imported on first attribute access)
_LAZY: dict[str, str] = {
    "POLICIES": ".selection",
    "CacheStore": ".store.store",
    "LayerProfile": ".selection",
    "PrefillReport": ".metrics",
    "PrefillTimings": ".metrics",
    "SelectionPolicy": ".selection",
    "UnsupportedModelError": ".errors",
    "VLCache": ".cache",
    "VLCacheError": ".errors",
    "VLCacheLayer": ".cache",
    "VLCacheProcessor": ".processor",
    "calibrate": ".calibration",
    "default_store": ".cache",
    "register_policy": ".selection",
    "supported_families": ".models",
}

if TYPE_CHECKING:  # static type checkers and IDEs see the eager imports
    from .cache import VLCache, VLCacheLayer, default_store
    from .calibration import calibrate
    from .errors import UnsupportedModelError, VLCacheError
    from .metrics import PrefillReport, PrefillTimings
    from .models import supported_families
    from .processor import VLCacheProcessor
    from .selection import POLICIES, LayerProfile, SelectionPolicy, register_policy
    from .store.store import CacheStore

__all__ = [
    "POLICIES",
    "CacheStore",
    "LayerProfile",
    "PrefillReport",
    "PrefillTimings",
    "SelectionPolicy",
    "UnsupportedModelError",
    "VLCache",
    "VLCacheError",
    "VLCacheLayer",
    "VLCacheProcessor",
    "__version__",
    "calibrate",
    "default_store",
    "register_policy",
    "supported_families",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(__all__) | {name for name in globals() if name.startswith("__")})
