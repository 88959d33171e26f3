"""Selection policies by name: `VLCache(model, policy="none")`."""

from __future__ import annotations

from ..errors import VLCacheError
from .base import LayerObservation, ReusedSpan, SelectionContext, SelectionPolicy
from .baselines import CacheBlendPolicy, FirstTokensPolicy, RandomPolicy
from .builtin import FullRecompute, NoRecompute

POLICIES: dict[str, type[SelectionPolicy]] = {
    cls.name: cls for cls in (FullRecompute, NoRecompute, FirstTokensPolicy, RandomPolicy, CacheBlendPolicy)
}


def register_policy(cls: type[SelectionPolicy]) -> type[SelectionPolicy]:
    """Make a policy class available by its `name` (usable as a class decorator)."""
    POLICIES[cls.name] = cls
    return cls


def make_policy(policy: str | SelectionPolicy, recompute_ratio: float) -> SelectionPolicy:
    """A policy instance from a name or an instance; clear error for unknown names or bad ratios."""
    if isinstance(recompute_ratio, bool) or not isinstance(recompute_ratio, (int, float)):
        raise VLCacheError(f"recompute_ratio must be a number in [0, 1], got {recompute_ratio!r}")
    if not 0.0 <= float(recompute_ratio) <= 1.0:
        raise VLCacheError(f"recompute_ratio must be in [0, 1], got {recompute_ratio}")
    if isinstance(policy, SelectionPolicy):
        return policy
    if not isinstance(policy, str) or policy not in POLICIES:
        raise VLCacheError(f"unknown policy {policy!r}; choose one of {sorted(POLICIES)}")
    return POLICIES[policy](float(recompute_ratio))


__all__ = [
    "POLICIES",
    "CacheBlendPolicy",
    "FirstTokensPolicy",
    "FullRecompute",
    "RandomPolicy",
    "LayerObservation",
    "NoRecompute",
    "ReusedSpan",
    "SelectionContext",
    "SelectionPolicy",
    "make_policy",
    "register_policy",
]
