"""Baseline selection policies from prior work, for comparison with the paper's rule.

All take `recompute_ratio` = share of *moved* tokens (reused outside the exact prefix) to recompute.
"""

from __future__ import annotations

import math

import torch

from .base import LayerObservation, SelectionContext, SelectionPolicy


def budget_tokens(num_moved: int, ratio: float) -> int:
    """How many moved tokens a ratio buys: round(ratio × moved), at least 1 when ratio > 0 and any moved.

    Every policy spends its budget through this rule (or, per layer, `allocate_budgets`), so policies are
    compared at equal cost.
    """
    if num_moved == 0 or ratio <= 0:
        return 0
    return min(num_moved, max(1, round(ratio * num_moved)))


def split_over_spans(lengths: list[int], total: int) -> list[int]:
    """`total` tokens shared by spans in proportion to their lengths (largest remainder; earlier spans win ties)."""
    if not lengths or total <= 0:
        return [0] * len(lengths)
    whole = sum(lengths)
    exact = [total * n / whole for n in lengths]
    counts = [min(n, math.floor(x)) for n, x in zip(lengths, exact, strict=False)]
    order = sorted(range(len(lengths)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order:
        if sum(counts) >= total:
            break
        if counts[i] < lengths[i]:
            counts[i] += 1
    return counts


class FirstTokensPolicy(SelectionPolicy):
    """EPIC-like: the first tokens of every moved span (they act as attention sinks for what follows).

    round(ratio × moved) tokens, shared by the spans in proportion to their length; the same set at every layer.
    """

    name = "first_k"

    def initial_set(self, ctx: SelectionContext) -> torch.Tensor:
        device = ctx.fresh_mask.device
        counts = split_over_spans([s.length for s in ctx.moved_spans], budget_tokens(ctx.num_moved, self.recompute_ratio))
        picks = [torch.arange(s.start, s.start + k, device=device) for s, k in zip(ctx.moved_spans, counts, strict=False)]
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
        return torch.cat([ctx.fresh_indices, moved[order[: budget_tokens(ctx.num_moved, self.recompute_ratio)]]])


class CacheBlendPolicy(SelectionPolicy):
    """CacheBlend: recompute every moved token at the first layers, then keep those whose fresh values
    deviate most from the reused ones (L2 over heads and dims) for all deeper layers.

    The deviation is measured at layer 1: a moved token's layer-0 K/V depends only on its own embedding
    (re-rotation makes it exact), so layer 0 shows no deviation to select by. Layers 0 and 1 therefore cost
    all moved tokens; `recompute_ratio` sets the share kept from layer 2 on, so the mean over layers is
    ratio + 2 (1 - ratio) / num_layers.
    """

    name = "cacheblend"
    needs_observation = True

    def initial_set(self, ctx: SelectionContext) -> torch.Tensor:
        return torch.cat([ctx.fresh_indices, ctx.moved_indices()])

    def after_layer(
        self, layer_idx: int, ctx: SelectionContext, current: torch.Tensor, observation: LayerObservation | None
    ) -> torch.Tensor:
        if layer_idx != min(1, ctx.num_layers - 2) or observation is None:
            return current
        moved = ~ctx.fresh_mask[current]
        deviation = (observation.new_values - observation.old_values).float().pow(2).sum(dim=(0, 1, 3))
        deviation = deviation.masked_fill(~moved, float("-inf"))
        keep = torch.topk(deviation, budget_tokens(ctx.num_moved, self.recompute_ratio)).indices
        return torch.cat([ctx.fresh_indices, current[keep]])
