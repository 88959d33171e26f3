"""Planning a prefill: where the images are, what is reused, what must be computed.

Pure bookkeeping over token indices: no model, no store. `plan_prefill` reads like the algorithm:
the exact prefix is reused as is, image spans found in the store are reused at their new position, and
every other token is fresh.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import VLCacheError
from .selection import ReusedSpan


@dataclass(frozen=True)
class ImageSpan:
    """Image `index` of the prompt occupies tokens [start, end) and has content key `key`."""

    index: int
    start: int
    end: int
    key: str

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
    for index, (count, key) in enumerate(zip(tokens_per_image, image_keys), start=first_index):
        chunk = positions[cursor : cursor + count]
        cursor += count
        if chunk and chunk[-1] - chunk[0] + 1 != count:
            raise VLCacheError(f"the placeholder tokens of image {index} are not contiguous in the prompt")
        if chunk:
            spans.append(ImageSpan(index, chunk[0], chunk[-1] + 1, key))
    return spans


@dataclass
class PrefillPlan:
    """What the selective prefill of tokens [0, num_tokens) starts from."""

    num_tokens: int
    prefix_tokens: int
    reused_spans: list[ImageSpan]  # image spans (or their parts past the prefix) filled from stored K/V
    fresh_mask: torch.Tensor  # bool [num_tokens]

    @property
    def moved_spans(self) -> tuple[ReusedSpan, ...]:
        """Reused tokens outside the exact prefix: their K/V is approximate, so they may be recomputed."""
        return tuple(ReusedSpan(s.start, s.end) for s in self.reused_spans)

    @property
    def reused_count(self) -> int:
        return self.prefix_tokens + sum(s.length for s in self.reused_spans)


def plan_prefill(
    num_tokens: int,
    image_spans: list[ImageSpan],
    prefix_tokens: int,
    kv_hit_images: set[int],
    device: torch.device | str = "cpu",
) -> PrefillPlan:
    """Plan tokens [0, num_tokens): reuse the exact prefix, reuse stored image spans past it, compute the rest.

    An image partly inside the prefix keeps only its part past the prefix as a reused span.
    """
    fresh = torch.ones(num_tokens, dtype=torch.bool, device=device)
    fresh[:prefix_tokens] = False
    reused: list[ImageSpan] = []
    for span in image_spans:
        start, end = max(span.start, prefix_tokens), min(span.end, num_tokens)
        if span.index in kv_hit_images and start < end:
            reused.append(ImageSpan(span.index, start, end, span.key))
            fresh[start:end] = False
    return PrefillPlan(num_tokens, prefix_tokens, reused, fresh)
