"""Selection policies by name: `VLCache(model, policy="none")`."""

from __future__ import annotations

import inspect

from ..errors import VLCacheError
from .base import LayerObservation, ReusedSpan, SelectionContext, SelectionPolicy
from .baselines import CacheBlendPolicy, FirstTokensPolicy, RandomPolicy
from .builtin import FullRecompute, NoRecompute
from .coverage import CoveragePolicy
from .profile import DEFAULT_ALLOCATION, LayerProfile, allocate_budgets
from .shift import CoverageShiftPolicy
from .stratified import StratifiedPolicy
from .vlcache import VLCachePolicy

POLICIES: dict[str, type[SelectionPolicy]] = {
    cls.name: cls
    for cls in (
        FullRecompute, NoRecompute, FirstTokensPolicy, RandomPolicy, CacheBlendPolicy, VLCachePolicy, StratifiedPolicy,
        CoveragePolicy, CoverageShiftPolicy,
    )
}


def register_policy(cls: type[SelectionPolicy]) -> type[SelectionPolicy]:
    """Make a policy class available by its `name` (usable as a class decorator)."""
    POLICIES[cls.name] = cls
    return cls


def make_policy(
    policy: str | SelectionPolicy, recompute_ratio: float | None = None, profile: LayerProfile | None = None
) -> SelectionPolicy:
    """A policy instance from a name or an instance; clear error for unknown names or bad ratios.

    The policy is the one home of `recompute_ratio`: a name is built with `recompute_ratio` (default 0); an
    instance keeps its own, and a different `recompute_ratio` given beside it is refused rather than ignored.
    `profile` goes to policies with layer-aware budgets (those whose constructor takes `profile`).
    """
    if isinstance(policy, SelectionPolicy):
        if recompute_ratio is not None and float(recompute_ratio) != float(policy.recompute_ratio):
            raise VLCacheError(
                f"recompute_ratio={recompute_ratio} conflicts with the {policy.name!r} policy instance's "
                f"recompute_ratio={policy.recompute_ratio}; set it on the policy only"
            )
        recompute_ratio = policy.recompute_ratio
    if recompute_ratio is None:
        recompute_ratio = 0.0
    if isinstance(recompute_ratio, bool) or not isinstance(recompute_ratio, (int, float)):
        raise VLCacheError(f"recompute_ratio must be a number in [0, 1], got {recompute_ratio!r}")
    if not 0.0 <= float(recompute_ratio) <= 1.0:
        raise VLCacheError(f"recompute_ratio must be in [0, 1], got {recompute_ratio}")
    if isinstance(policy, SelectionPolicy):
        return policy
    if not isinstance(policy, str) or policy not in POLICIES:
        raise VLCacheError(f"unknown policy {policy!r}; choose one of {sorted(POLICIES)}")
    cls = POLICIES[policy]
    if profile is not None and "profile" in inspect.signature(cls.__init__).parameters:
        return cls(float(recompute_ratio), profile=profile)
    return cls(float(recompute_ratio))


__all__ = [
    "POLICIES",
    "CacheBlendPolicy",
    "CoveragePolicy",
    "CoverageShiftPolicy",
    "DEFAULT_ALLOCATION",
    "LayerProfile",
    "VLCachePolicy",
    "allocate_budgets",
    "FirstTokensPolicy",
    "FullRecompute",
    "RandomPolicy",
    "LayerObservation",
    "NoRecompute",
    "ReusedSpan",
    "SelectionContext",
    "SelectionPolicy",
    "StratifiedPolicy",
    "make_policy",
    "register_policy",
]
