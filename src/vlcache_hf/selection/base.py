"""The selection seam: which prompt tokens each decoder layer recomputes.

A policy sees a `SelectionContext` (which tokens are fresh, which are reused and where reused spans lie)
and returns layer 0's recompute set; after each layer it may shrink the set for the next layer, optionally
looking at how far freshly computed K/V moved from the reused K/V (`LayerObservation`). Sets are sorted
token indices, nested (layer l+1's set ⊆ layer l's: a token's hidden state must exist to go deeper) and
always contain every fresh token. The prefill enforces these rules, so a policy cannot break exactness.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch


@dataclass(frozen=True)
class ReusedSpan:
    """A run of reused tokens [start, end) that was computed in another context (e.g. a moved image)."""

    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class SelectionContext:
    """What a policy may look at before the layer loop starts."""

    num_tokens: int
    num_layers: int
    fresh_mask: torch.Tensor  # bool [num_tokens]: tokens with no stored K/V, always recomputed
    moved_spans: tuple[ReusedSpan, ...]  # approximate reuse: candidates for recomputation
    #: the reused keys a layer starts from ([1, kv_heads, num_tokens, head_dim]; rows of fresh tokens are not
    #: filled yet), for policies that choose by what the stored K/V holds; None where there is no cache
    reused_keys: Callable[[int], torch.Tensor] | None = field(default=None, compare=False, repr=False)
    #: where each token sits in this prompt ([num_axes, num_tokens], the model's rotary positions); None where unknown
    positions: torch.Tensor | None = field(default=None, compare=False, repr=False)

    @property
    def fresh_indices(self) -> torch.Tensor:
        return torch.nonzero(self.fresh_mask, as_tuple=False).flatten()

    @property
    def num_moved(self) -> int:
        return sum(span.length for span in self.moved_spans)

    def moved_indices(self) -> torch.Tensor:
        device = self.fresh_mask.device
        if not self.moved_spans:
            return torch.empty(0, dtype=torch.long, device=device)
        return torch.cat([torch.arange(s.start, s.end, device=device) for s in self.moved_spans])


@dataclass
class LayerObservation:
    """Freshly computed vs previously reused K/V of the tokens a layer just recomputed."""

    layer_idx: int
    indices: torch.Tensor
    new_keys: torch.Tensor  # [1, kv_heads, len(indices), head_dim]
    new_values: torch.Tensor
    old_keys: torch.Tensor
    old_values: torch.Tensor


class SelectionPolicy(ABC):
    """Chooses recompute sets; subclasses register themselves by `name`."""

    name: ClassVar[str]
    #: whether `after_layer` needs a LayerObservation (costs a copy of the overwritten K/V)
    needs_observation: ClassVar[bool] = False
    #: the policy reuses stored K/V at all (False only for full recomputation)
    reuses_kv: ClassVar[bool] = True
    @property
    def shift_scales(self) -> dict[str, float]:
        """Per part ("keys", "values"), the share of a measured shift the prefill applies after each layer to the
        reused K/V of the moved tokens that layer did not recompute: the mean deviation the layer measured on the
        same image's recomputed tokens (`vlcache_hf.selection.shift`; needs `needs_observation`). Default: none."""
        return {}

    def __init__(self, recompute_ratio: float = 0.0):
        #: share of moved tokens to recompute, averaged over layers: the one home of this setting
        #: (`VLCache.recompute_ratio` reads it from here)
        self.recompute_ratio = recompute_ratio

    @abstractmethod
    def initial_set(self, ctx: SelectionContext) -> torch.Tensor:
        """Sorted token indices recomputed at layer 0 (must include every fresh token)."""

    def after_layer(
        self, layer_idx: int, ctx: SelectionContext, current: torch.Tensor, observation: LayerObservation | None
    ) -> torch.Tensor:
        """Indices to recompute at layer `layer_idx + 1`; a subset of `current`. Default: keep the set."""
        return current
