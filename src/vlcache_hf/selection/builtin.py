"""The two reference policies: recompute everything, or nothing that can be reused."""

from __future__ import annotations

import torch

from .base import SelectionContext, SelectionPolicy


class FullRecompute(SelectionPolicy):
    """Recompute every token at every layer; only the encoder cache is reused. The exactness reference."""

    name = "full"
    reuses_kv = False

    def initial_set(self, ctx: SelectionContext) -> torch.Tensor:
        return torch.arange(ctx.num_tokens, device=ctx.fresh_mask.device)


class NoRecompute(SelectionPolicy):
    """Naive reuse: stored K/V (re-rotated) is used as is; only tokens with nothing stored are computed."""

    name = "none"

    def initial_set(self, ctx: SelectionContext) -> torch.Tensor:
        return ctx.fresh_indices
