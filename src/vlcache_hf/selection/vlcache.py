"""The paper's rule: recompute the tokens that contribute most to the *cumulative* reuse error, with
layer-aware budgets.

Why these tokens. A moved image's K/V were computed while its tokens attended to another context. Its
earliest tokens saw the least of their own image and the most of that foreign context, so their own
error is largest, and every later token of the prompt attends to them, so their error also travels
furthest (e_total = e_self + e_prop, earlier tokens weigh more). Layer 0's K/V of a moved token does not
depend on context at all (it is a function of the token's embedding, re-rotated exactly), so the first
*measurable* deviation is at layer 1: from there on the set is filtered by the measured K/V deviation
weighted by how many later tokens each token feeds.

Why these budgets. Sets are nested, so layer budgets can only shrink with depth. They are proportional to
the error that remains when recomputation stops at that layer — measured by `vlcache_hf.calibrate` and
stored in a `LayerProfile` — or, without a profile, uniform (`DEFAULT_ALLOCATION`).
`recompute_ratio` is the mean over layers of the share of moved tokens recomputed, as for every policy.
"""

from __future__ import annotations

import torch

from .base import LayerObservation, SelectionContext, SelectionPolicy
from .profile import DEFAULT_ALLOCATION, LayerProfile, allocate_budgets, default_weights


def span_offsets(ctx: SelectionContext) -> tuple[torch.Tensor, torch.Tensor]:
    """(moved token indices, their relative offset in their span in [0, 1))."""
    device = ctx.fresh_mask.device
    if not ctx.moved_spans:
        empty = torch.empty(0, device=device)
        return empty.long(), empty
    indices = [torch.arange(s.start, s.end, device=device) for s in ctx.moved_spans]
    offsets = [torch.arange(s.length, device=device, dtype=torch.float32) / s.length for s in ctx.moved_spans]
    return torch.cat(indices), torch.cat(offsets)


class VLCachePolicy(SelectionPolicy):
    """Cumulative-error token ranking + layer-aware nested budgets (see the module docstring).

    Args:
        recompute_ratio: mean share of moved tokens recomputed per layer.
        profile: a `LayerProfile` for this model (from `vlcache_hf.calibrate`); None → default allocation.
        refine: filter deeper layers by measured K/V deviation (True) or by position only (False).
    """

    name = "vlcache"
    needs_observation = True

    def __init__(self, recompute_ratio: float = 0.0, profile: LayerProfile | None = None, refine: bool = True):
        super().__init__(recompute_ratio)
        self.profile = profile
        self.refine = refine
        self.last_budgets: list[int] = []

    @property
    def allocation(self) -> str:
        return self.profile.describe() if self.profile is not None else DEFAULT_ALLOCATION

    def budgets(self, ctx: SelectionContext) -> list[int]:
        weights = self.profile.remaining_error if self.profile is not None else default_weights(ctx.num_layers)
        return allocate_budgets(list(weights), ctx.num_moved, self.recompute_ratio)

    def initial_set(self, ctx: SelectionContext) -> torch.Tensor:
        self.last_budgets = self.budgets(ctx)
        self._prior = self._positional_prior(ctx)
        return torch.cat([ctx.fresh_indices, self.initial_picks(ctx, self.last_budgets[0] if self.last_budgets else 0)])

    def initial_picks(self, ctx: SelectionContext, count: int) -> torch.Tensor:
        """The `count` moved tokens recomputed at layer 0: the earliest tokens of every span first; among
        equal offsets, earlier spans first. (Subclasses change only this choice.)"""
        moved, offsets = span_offsets(ctx)
        order = torch.argsort(offsets * ctx.num_tokens + moved.float() / ctx.num_tokens, stable=True)
        return moved[order[:count]]

    def _positional_prior(self, ctx: SelectionContext) -> torch.Tensor:
        """Per-token weight of an error: (1 − offset in span) × share of the prompt that follows the token."""
        prior = torch.zeros(ctx.num_tokens, device=ctx.fresh_mask.device)
        moved, offsets = span_offsets(ctx)
        follows = (ctx.num_tokens - moved).float() / ctx.num_tokens
        prior[moved] = (1.0 - offsets) * follows
        return prior

    def after_layer(
        self, layer_idx: int, ctx: SelectionContext, current: torch.Tensor, observation: LayerObservation | None
    ) -> torch.Tensor:
        keep = self.last_budgets[layer_idx + 1]
        moved = ~ctx.fresh_mask[current]
        if int(moved.sum()) <= keep:
            return current
        score = self._prior[current].clone()
        if self.refine and layer_idx >= 1 and observation is not None:
            deviation = (observation.new_keys - observation.old_keys).float().pow(2).sum(dim=(0, 1, 3))
            deviation += (observation.new_values - observation.old_values).float().pow(2).sum(dim=(0, 1, 3))
            follows = (ctx.num_tokens - current).float() / ctx.num_tokens
            score = deviation.sqrt() * follows
        score = score.masked_fill(~moved, float("-inf"))
        top = torch.topk(score, keep).indices
        return torch.cat([ctx.fresh_indices, current[top]])
