"""Planning a prefill: where the images are, what is reused, what must be computed.

Pure bookkeeping over token indices: no model, no store. `plan_prefill` reads like the algorithm:
the exact prefix is reused as is, image spans found in the store are reused — as they are when they were
computed in this same context (exact), re-rotated to their new position otherwise (moved) — and every other
token is fresh.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import torch

from .errors import VLCacheError
from .selection import ReusedSpan


@dataclass(frozen=True)
class ImageSpan:
    """Item `index` (an image or video) has its rows [offset, offset + end - start) at tokens [start, end).

    An item whose placeholders are interleaved with text (Qwen3-VL puts a timestamp before each video frame
    group) gets one span per contiguous run, each keyed on its own (`<item key>:<run>`).
    """

    index: int
    start: int
    end: int
    key: str
    offset: int = 0

    @property
    def length(self) -> int:
        return self.end - self.start


def find_image_spans(
    input_ids: torch.Tensor,
    image_token_id: int,
    tokens_per_image: list[int],
    image_keys: list[str],
    first_index: int = 0,
) -> list[ImageSpan]:
    """Assign the prompt's placeholder tokens of one modality to its items (images, videos), in order.

    Items are numbered from `first_index`. Raises a `VLCacheError` when the number of placeholder tokens
    does not match the items given.
    """
    positions = torch.nonzero(input_ids.flatten() == image_token_id, as_tuple=False).flatten().tolist()
    expected = sum(tokens_per_image)
    if len(positions) != expected:
        raise VLCacheError(
            f"the prompt has {len(positions)} image tokens but the {len(tokens_per_image)} image(s) given need "
            f"{expected}; build inputs with the model's processor so every image has its placeholder"
        )
    spans: list[ImageSpan] = []
    cursor = 0
    for index, (count, key) in enumerate(zip(tokens_per_image, image_keys, strict=True), start=first_index):
        rows = positions[cursor : cursor + count]
        cursor += count
        runs = _contiguous_runs(rows)
        for part, (offset, start, end) in enumerate(runs):
            spans.append(ImageSpan(index, start, end, key if len(runs) == 1 else f"{key}:{part}", offset))
    return spans


def _contiguous_runs(rows: list[int]) -> list[tuple[int, int, int]]:
    """(offset into rows, start, end) of each run of consecutive token positions."""
    runs: list[tuple[int, int, int]] = []
    for offset, row in enumerate(rows):
        if runs and runs[-1][2] == row:
            runs[-1] = (runs[-1][0], runs[-1][1], row + 1)
        else:
            runs.append((offset, row, row + 1))
    return runs


@dataclass
class PrefillPlan:
    """What the selective prefill of tokens [0, num_tokens) starts from."""

    num_tokens: int
    prefix_tokens: int
    reused_spans: list[ImageSpan]  # image spans (or their parts past the prefix) filled from stored K/V
    fresh_mask: torch.Tensor  # bool [num_tokens]
    #: starts (in the prompt) of the image spans whose stored K/V was computed in this same context
    exact_starts: frozenset[int] = field(default_factory=frozenset)

    def is_exact(self, part: ImageSpan) -> bool:
        """True if reused part `part` comes from K/V computed in this very context (no re-rotation, no error)."""
        return part.start - part.offset in self.exact_starts

    @property
    def moved_parts(self) -> list[ImageSpan]:
        """Reused parts computed in another context: approximate."""
        return [s for s in self.reused_spans if not self.is_exact(s)]

    @property
    def moved_spans(self) -> tuple[ReusedSpan, ...]:
        """Reused tokens whose K/V was computed in another context: approximate, so they may be recomputed."""
        return tuple(ReusedSpan(s.start, s.end) for s in self.moved_parts)

    @property
    def exact_until(self) -> int:
        """Every token before this one has exact K/V after the prefill: the start of the first moved part."""
        return min((s.start for s in self.moved_parts), default=self.num_tokens)

    @property
    def reused_count(self) -> int:
        return self.prefix_tokens + sum(s.length for s in self.reused_spans)


def plan_prefill(
    num_tokens: int,
    image_spans: list[ImageSpan],
    prefix_tokens: int,
    kv_hit_keys: Collection[str] = (),
    device: torch.device | str = "cpu",
    *,
    span_hits: Mapping[int, bool] | None = None,
) -> PrefillPlan:
    """Plan tokens [0, num_tokens): reuse the exact prefix, reuse stored spans past it, compute the rest.

    `span_hits` maps the start of each span whose K/V was found to whether it is exact (computed in this same
    context); the same image twice in a prompt is two spans with their own hits. Without it, `kv_hit_keys`
    names the image keys found, all as moved. A span partly inside the prefix keeps only its part past the
    prefix as a reused span (its `offset` then says where that part starts in the span).
    """
    hits = span_hits if span_hits is not None else {s.start: False for s in image_spans if s.key in kv_hit_keys}
    fresh = torch.ones(num_tokens, dtype=torch.bool, device=device)
    fresh[:prefix_tokens] = False
    reused: list[ImageSpan] = []
    for span in image_spans:
        start, end = max(span.start, prefix_tokens), min(span.end, num_tokens)
        if span.start in hits and start < end:
            reused.append(ImageSpan(span.index, start, end, span.key, start - span.start))
            fresh[start:end] = False
    exact = frozenset(start for start, is_exact in hits.items() if is_exact)
    return PrefillPlan(num_tokens, prefix_tokens, reused, fresh, exact)
