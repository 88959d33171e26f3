"""`coverage`: in every moved image, recompute the tokens that stand for the whole image best — a k-center
greedy pick over the image's reused layer-0 keys — and keep them at every layer (uniform budgets).

Why. On the deep embedded model (8 layers, 64 tokens per image; `eval/results/fidelity_deep.md`) every token
of a moved image carries the context it was first seen in, so the few recomputed tokens must represent all of
the image, not one corner of it. Recomputing each image's first tokens (`first_k`, `vlcache`) recovers
nothing below 20 %; evenly spaced offsets (`stratified`) can land on background only; a random sample does
better. Covering the image's *content* does better still at every budget measured there: the first pick is
the token farthest from the image's mean key (the most distinctive one — on the synthetic pictures, the shape
rather than the background), and each next pick is the token farthest from all picks so far, so the
background and each object get one representative before any of them gets a second.

Which keys. Layer 0's: a moved token's layer-0 K/V depends on its own embedding and position only, and
re-rotation makes it exact, so those keys describe the image without the old context — and they are in the
cache before layer 0 runs (`SelectionContext.reused_keys`). They are rotated to the new positions, so the
distance also counts position: picks spread over the image as well as over its content.

Budget. `recompute_ratio` of the moved tokens (`budget_tokens`), shared by the moved spans in proportion to
their lengths (`split_over_spans`), the same set at every layer.
"""

from __future__ import annotations

import torch

from ..errors import VLCacheError
from .base import SelectionContext, SelectionPolicy
from .baselines import budget_tokens, split_over_spans


def k_center_picks(features: torch.Tensor, count: int) -> list[int]:
    """Greedy k-center over the rows of `features` ([tokens, dims]): first the row farthest from the mean, then
    each time the row farthest from every row picked so far (ties: the earliest row). Row indices, in pick order."""
    count = min(count, features.shape[0])
    if count <= 0:
        return []
    features = features.float()
    distance = (features - features.mean(dim=0, keepdim=True)).pow(2).sum(dim=1)
    picks: list[int] = []
    for _ in range(count):
        index = int(torch.argmax(distance))
        picks.append(index)
        distance = torch.minimum(distance, (features - features[index]).pow(2).sum(dim=1))
        distance[picks] = -1.0  # never picked twice, even when every remaining row is a duplicate
    return picks


class CoveragePolicy(SelectionPolicy):
    """Recompute, per moved image, the k-center picks over its layer-0 keys (see the module docstring)."""

    name = "coverage"

    def initial_set(self, ctx: SelectionContext) -> torch.Tensor:
        spans = list(ctx.moved_spans)
        counts = split_over_spans([s.length for s in spans], budget_tokens(ctx.num_moved, self.recompute_ratio))
        if any(counts) and ctx.reused_keys is None:
            raise VLCacheError("the coverage policy needs the reused keys (SelectionContext.reused_keys)")
        picked = [ctx.fresh_indices]
        for span, count in zip(spans, counts, strict=True):
            if count:
                keys = ctx.reused_keys(0)[0, :, span.start : span.end]  # [kv_heads, length, head_dim]
                rows = keys.permute(1, 0, 2).reshape(span.length, -1)
                offsets = k_center_picks(rows, count)
                picked.append(torch.tensor(offsets, dtype=torch.long, device=ctx.fresh_mask.device) + span.start)
        return torch.cat(picked)
