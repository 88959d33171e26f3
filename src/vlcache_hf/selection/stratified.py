"""`stratified`: the paper's layer-aware budgets and deviation refinement, started from tokens spread evenly
over every moved image instead of each image's first tokens.

Why. On the deep embedded model (8 layers, 64 tokens per image; `eval/results/fidelity_deep.md`) a moved
image's error is not concentrated in its first tokens: every token of the image attended to the labels and
the images it was first shown with, so every token carries the old context. There, recomputing the first
tokens (`first_k`, and `vlcache`, which starts from them) recovers nothing below a 20 % budget, while a random
sample of the same size does. Spreading the initial set evenly over each image covers every region of every
image at the smallest cost; the deviation refinement then keeps, layer by layer, the tokens whose K/V moved most.

Which tokens. The layer-0 budget is shared by the moved spans in proportion to their lengths
(`split_over_spans`); a span of length L given m tokens recomputes offsets floor((j + ½)·L / m), j < m — the
centres of m equal strata.
"""

from __future__ import annotations

import torch

from .base import SelectionContext
from .baselines import split_over_spans
from .vlcache import VLCachePolicy


def stratified_offsets(length: int, count: int) -> list[int]:
    """The centres of `count` equal strata of a span of `length` tokens."""
    return [int((j + 0.5) * length / count) for j in range(count)]


class StratifiedPolicy(VLCachePolicy):
    """`vlcache` with an evenly spread initial set (see the module docstring)."""

    name = "stratified"

    def initial_picks(self, ctx: SelectionContext, count: int) -> torch.Tensor:
        spans = list(ctx.moved_spans)
        counts = split_over_spans([s.length for s in spans], count)
        picked = [s.start + offset for s, m in zip(spans, counts, strict=True) for offset in stratified_offsets(s.length, m)]
        return torch.tensor(picked, dtype=torch.long, device=ctx.fresh_mask.device)
