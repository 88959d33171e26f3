"""Qwen2-VL and Qwen2.5-VL: multimodal RoPE (M-RoPE) with three position axes (time, height, width).

Quirks handled here:
- positions come from `get_rope_index` (or `generate`'s precomputed 4-row `position_ids`: a text row used
  for masks, then the three M-RoPE rows);
- `model.model.rope_deltas` must hold (max position + 1 - prompt length) for decoding steps;
- moving a whole image shifts all three axes by the same amount, so re-rotation is exact.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Modality, ModelAdapter


class QwenVLAdapter(ModelAdapter):
    """Adapter for `Qwen2VLForConditionalGeneration` and `Qwen2_5_VLForConditionalGeneration`."""

    family = "Qwen2-VL / Qwen2.5-VL"
    MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
    position_axes = 3

    # -- positions -----------------------------------------------------------------------------------------
    def prompt_positions(self, model_kwargs: dict, input_ids: torch.Tensor) -> torch.Tensor:
        given = model_kwargs.get("position_ids")
        if given is not None:
            if given.ndim == 3 and given.shape[0] == 4:  # generate's [text row, t, h, w]
                return given[1:]
            if given.ndim == 2:
                return given[None].expand(3, -1, -1)
            return given
        grid, video_grid = model_kwargs.get("image_grid_thw"), model_kwargs.get("video_grid_thw")
        token_types = model_kwargs.get("mm_token_type_ids")
        if (grid is None and video_grid is None) or token_types is None:
            length = input_ids.shape[1]
            return torch.arange(length, device=input_ids.device).view(1, 1, -1).expand(3, 1, -1)
        extra = {"second_per_grid_ts": model_kwargs["second_per_grid_ts"]} if model_kwargs.get("second_per_grid_ts") is not None else {}
        positions, _ = self.model.model.get_rope_index(
            input_ids,
            mm_token_type_ids=token_types,
            image_grid_thw=grid,
            video_grid_thw=video_grid,
            attention_mask=model_kwargs.get("attention_mask"),
            **extra,
        )
        return positions

    def last_token_position_ids(self, model_kwargs: dict, positions: torch.Tensor, count: int = 1) -> torch.Tensor:
        given = model_kwargs.get("position_ids")
        source = given if given is not None else positions
        return source[..., -count:].contiguous()

    def after_prefill(self, positions: torch.Tensor, num_tokens: int) -> None:
        delta = positions.max() + 1 - num_tokens
        self.model.model.rope_deltas = delta.view(1, 1).to(torch.long)

    # -- images and videos ---------------------------------------------------------------------------------
    layout_arg = "image_grid_thw"

    def modalities(self) -> list[Modality]:
        """Images, and videos: a video is one item whose frames share one KV span (temporal axis included)."""
        video = Modality(
            "video", int(self.model.config.video_token_id), "get_video_features", "pixel_values_videos", "video_grid_thw"
        )
        return [*super().modalities(), video]

    def prefill_only_inputs(self) -> set[str]:
        return super().prefill_only_inputs() | {"second_per_grid_ts"}  # video timing: read by `get_rope_index` only

    def split_pixels(self, pixel_values: torch.Tensor, layout: torch.Tensor | None) -> list[torch.Tensor]:
        if layout is None:
            from ..errors import VLCacheError

            raise VLCacheError("pixel_values were given without image_grid_thw; pass the processor's full output")
        return list(torch.split(pixel_values, layout.prod(-1).tolist()))

    def image_layouts(self, pixels: list[torch.Tensor], layout: torch.Tensor | None) -> list[tuple[int, ...]]:
        return [tuple(int(x) for x in grid) for grid in layout.tolist()]

    def image_feature_owner(self) -> nn.Module:
        return self.model.model

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.model.visual
