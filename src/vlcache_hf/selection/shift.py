"""`coverage-shift`: `coverage`'s picks, plus a per-image correction of the tokens it does not recompute.

Why. On the deep embedded model every token of a moved image carries the context the image was first seen in
(`coverage`'s docstring), and a few percent of recomputed tokens cannot carry the rest. But much of that
context is shared by all tokens of the image: after each layer, the tokens just recomputed show how far their
K/V moved from the stored K/V, and the mean of that deviation over an image's recomputed tokens is a
measured estimate of the shift every other token of the image needs. The prefill adds it to the K/V of the
image's other tokens at that layer, so the tokens computed after them — the question, the answer — attend to
corrected K/V. Nothing is stored for it and nothing is recomputed on top of `coverage`.

Keys carry rotary position: a deviation measured on a token at position p is R(p)·d. It is rotated back by −p
before averaging and forward to each corrected token's own position (`ModelAdapter.rotation_cos_sin`, so
M-RoPE's per-axis positions are honoured).

Only rows of moved spans that the layer did not recompute are touched (`shift_unrecomputed_rows`): fresh rows
and rows reused exactly are never changed, so every exactness guarantee stands.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..errors import VLCacheError
from ..rope import apply_rotation
from .base import LayerObservation, SelectionContext
from .coverage import CoveragePolicy

if TYPE_CHECKING:
    from ..models import ModelAdapter

SHIFTABLE = ("keys", "values")
DEFAULT_KEY_SCALE = 0.5
DEFAULT_VALUE_SCALE = 1.0


class CoverageShiftPolicy(CoveragePolicy):
    """`coverage`'s recompute sets, plus the mean measured K/V shift applied to each moved image's other tokens.

    Args:
        recompute_ratio: share of moved tokens recomputed (as `coverage`).
        key_scale, value_scale: the share of the measured mean shift applied to keys and to values. A mean over
            the few recomputed tokens of an image is a noisy estimate; shrinking it towards zero trades a little
            bias for less noise. The defaults were chosen on the deep model's validation split (see
            `eval/results/fidelity_deep_shift.md`), not on the test items that report measures.
    """

    name = "coverage-shift"
    needs_observation = True

    def __init__(self, recompute_ratio: float = 0.0, key_scale: float = DEFAULT_KEY_SCALE, value_scale: float = DEFAULT_VALUE_SCALE):
        super().__init__(recompute_ratio)
        for label, scale in (("key_scale", key_scale), ("value_scale", value_scale)):
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0.0 <= scale <= 1.0:
                raise VLCacheError(f"{label} must be a number in [0, 1], got {scale!r}")
        self.key_scale, self.value_scale = float(key_scale), float(value_scale)

    @property
    def shift_scales(self) -> dict[str, float]:
        return {"keys": self.key_scale, "values": self.value_scale}


def rotation_table(adapter: ModelAdapter, ctx: SelectionContext, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [1, num_tokens, head_dim] of the pure rotation to every prompt position (`ctx.positions`)."""
    return adapter.rotation_cos_sin(like.float(), ctx.positions)


def shift_unrecomputed_rows(
    adapter: ModelAdapter,
    keys: torch.Tensor,
    values: torch.Tensor,
    ctx: SelectionContext,
    observation: LayerObservation,
    scales: dict[str, float],
    rotation: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> int:
    """Add to the K/V rows ([1, kv_heads, rows, head_dim] `keys` / `values`, in place) of every moved span's tokens
    that `observation` did not recompute `scales[part]` × the mean deviation observed on the span's recomputed
    tokens, for each part ("keys", "values") in `scales`. Returns how many rows were shifted.

    `rotation` is (cos, sin) [1, num_tokens, head_dim] of every prompt position (`rotation_table`), computed once
    per request by the caller; without it, each call computes the rows it needs."""
    parts = tuple(part for part, scale in scales.items() if scale)
    unknown = sorted(set(scales) - set(SHIFTABLE))
    if unknown:
        raise ValueError(f"unknown shift parts {unknown}; use {SHIFTABLE}")
    if "keys" in parts and ctx.positions is None:
        raise ValueError("shifting keys needs the prompt's positions (SelectionContext.positions)")
    if not parts:
        return 0
    index = observation.indices
    # deviations of every recomputed row, once per layer: [kv_heads, recomputed, head_dim]
    value_deviation = (observation.new_values - observation.old_values)[0] if "values" in parts else None
    key_deviation = (observation.new_keys - observation.old_keys)[0] if "keys" in parts else None
    shifted = 0
    for span in ctx.moved_spans:
        inside = (index >= span.start) & (index < span.end)
        if not bool(inside.any()):
            continue
        rows = torch.arange(span.start, span.end, device=index.device)
        rows = rows[~torch.isin(rows, index)]
        if rows.numel() == 0:
            continue
        if value_deviation is not None:
            deviation = value_deviation[:, inside].float().mean(dim=1, keepdim=True)
            values[0][:, rows] += (scales["values"] * deviation).to(values.dtype)
        if key_deviation is not None:
            picked = index[inside]
            deviation = key_deviation[:, inside].float()  # [kv_heads, n, head_dim]
            cos, sin = rotation if rotation is not None else rotation_table(adapter, ctx, deviation)
            # R(-p) is R(p) with sin negated: the rotary angles of every axis change sign together
            unrotated = apply_rotation(deviation, cos[:, picked], -sin[:, picked])
            mean = (scales["keys"] * unrotated.mean(dim=1, keepdim=True)).expand(-1, rows.numel(), -1)
            keys[0][:, rows] += apply_rotation(mean, cos[:, rows], sin[:, rows]).to(keys.dtype)
        shifted += int(rows.numel())
    return shifted
