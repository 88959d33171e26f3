"""vlcache-hf: reuse vision-encoder outputs and KV caches of repeated images in Hugging Face VLMs.

    from vlcache_hf import VLCache, CacheStore
    store = CacheStore()
    out = model.generate(**inputs, past_key_values=VLCache(model, store=store), max_new_tokens=64)
"""

__version__ = "0.1.0"

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
