"""The forward pre-hook that makes `model.generate(..., past_key_values=VLCache(...))` work unchanged.

It only translates: when the model is called with a `VLCache` that has not been prefilled yet and more
than one prompt token, the hook runs `engine.prefill_request` and hands the model's forward the final
prompt token alone. Every other call passes through untouched.
"""

from __future__ import annotations

import weakref
from typing import Any

from torch import nn

_installed: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _find_cache(kwargs: dict[str, Any]):
    from .cache import VLCache

    for name in ("cache", "past_key_values"):
        value = kwargs.get(name)
        if isinstance(value, VLCache):
            return value
    return None


def _prefill_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]):
    cache = _find_cache(kwargs)
    if cache is None or cache.is_prefilled:
        return None
    if cache.model is not module:
        from .errors import VLCacheError

        raise VLCacheError("this VLCache was created for another model; create one per model")
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    if input_ids is not None and input_ids.ndim == 2 and input_ids.shape[1] < 2:
        cache.mark_prefilled()
        return None
    from .engine import prefill_request

    return (), prefill_request(cache, args, kwargs)


def install(model: nn.Module) -> None:
    """Register the pre-hook on `model` once."""
    if model in _installed:
        return
    model.register_forward_pre_hook(_prefill_hook, with_kwargs=True)
    _installed.add(model)
