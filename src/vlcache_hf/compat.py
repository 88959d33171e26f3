"""Differences between transformers 5.x releases, kept in one place."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn


def cache_kwarg_name(model: nn.Module) -> str:
    """`generate`/`forward` took `past_key_values` until transformers renamed it `cache` (old name deprecated)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def with_cache(model: nn.Module, cache: Any) -> dict[str, Any]:
    """`{<the right keyword>: cache}` for `model.generate(**inputs, **with_cache(model, cache))`."""
    return {} if cache is None else {cache_kwarg_name(model): cache}
