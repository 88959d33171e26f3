"""Baseline selection policies from prior work, for comparison with the paper's rule.

All take `recompute_ratio` = share of *moved* tokens (reused outside the exact prefix) to recompute.
"""

from __future__ import annotations

import math

import torch

from .base import LayerObservation, SelectionContext, SelectionPolicy


def _budget(ctx: SelectionContext, ratio: float) -> int:
    return min(ctx.num_moved, math.ceil(ratio * ctx.num_moved))


class FirstTokensPolicy(SelectionPolicy):
    """EPIC-like: the first tokens of every moved span (they act as attention sinks for what follows).

    Each span gets ceil(ratio × span length) tokens; the same set at every layer.
    """

    name = "first_k"

    def initial_set(self, ctx: SelectionContext) -> torch.Tensor:
        device = ctx.fresh_mask.device
        picks = [
            torch.arange(s.start, s.start + math.ceil(self.recompute_ratio * s.length), device=device) for s in ctx.moved_spans
        ]
        return torch.cat([ctx.fresh_indices, *picks]) if picks else ctx.fresh_indices


class RandomPolicy(SelectionPolicy):
    """Control: the same number of moved tokens, chosen uniformly at random (seeded), at every layer."""

    name = "random"

    def __init__(self, recompute_ratio: float = 0.0, seed: int = 0):
        super().__init__(recompute_ratio)
        self.seed = seed

    def initial_set(self, ctx: SelectionContext) -> torch.Tensor:
        moved = ctx.moved_indices()
        generator = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(moved.numel(), generator=generator).to(moved.device)
        return torch.cat([ctx.fresh_indices, moved[order[: _budget(ctx, self.recompute_ratio)]]])


class CacheBlendPolicy(SelectionPolicy):
    """CacheBlend: recompute every moved token at layer 0, then keep those whose fresh values deviate most
    from the reused ones (L2 over heads and dims) for all deeper layers.

    Layer 0 always costs all moved tokens, as in CacheBlend; `recompute_ratio` sets the share kept for
    layers 1 and deeper, so the average over layers is ratio + (1 - ratio) / num_layers.
    """

    name = "cacheblend"
    needs_observation = True

    def initial_set(self, ctx: SelectionContext) -> torch.Tensor:
        return torch.cat([ctx.fresh_indices, ctx.moved_indices()])

    def after_layer(
        self, layer_idx: int, ctx: SelectionContext, current: torch.Tensor, observation: LayerObservation | None
    ) -> torch.Tensor:
        if layer_idx != 0 or observation is None:
            return current
        moved = ~ctx.fresh_mask[current]
        deviation = (observation.new_values - observation.old_values).float().pow(2).sum(dim=(0, 1, 3))
        deviation = deviation.masked_fill(~moved, float("-inf"))
        keep = torch.topk(deviation, _budget(ctx, self.recompute_ratio)).indices
        return torch.cat([ctx.fresh_indices, current[keep]])
