"""LLaVA-1.5 (`LlavaForConditionalGeneration`): a CLIP-style tower, a projector and a Llama-style LLM.

Quirks handled here:
- plain 1-D RoPE: positions are [1, 1, L] and moving an image is a single-axis shift;
- every image is one `pixel_values` row with a fixed number of tokens (576 for 336-px CLIP/14), so images
  split by row; models that pass `image_sizes` (variable resolution, e.g. Pixtral) are not served yet;
- the LLM is any Llama-like decoder; its rotary module takes [batch, n] positions.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import VLCacheError
from .base import ModelAdapter


class LlavaAdapter(ModelAdapter):
    """Adapter for `LlavaForConditionalGeneration` (LLaVA-1.5 layout)."""

    family = "LLaVA-1.5"
    MODEL_TYPES = ("llava",)
    VISION_ATTR = "vision_tower"

    def prompt_positions(self, model_kwargs: dict, input_ids: torch.Tensor) -> torch.Tensor:
        given = model_kwargs.get("position_ids")
        if given is not None:
            return given.view(1, 1, -1)
        mask = model_kwargs.get("attention_mask")
        if mask is not None and not bool(mask.all()):
            return (mask.long().cumsum(-1) - 1).clamp(min=0).view(1, 1, -1)
        return torch.arange(input_ids.shape[1], device=input_ids.device).view(1, 1, -1)

    def last_token_position_ids(self, model_kwargs: dict, positions: torch.Tensor, count: int = 1) -> torch.Tensor:
        given = model_kwargs.get("position_ids")
        source = given if given is not None else positions[0]
        return source[..., -count:].contiguous()

    layout_arg = "image_sizes"  # LLaVA-1.5 passes none; a model that does has variable-size images

    def split_pixels(self, pixel_values: torch.Tensor, layout: torch.Tensor | None) -> list[torch.Tensor]:
        if layout is not None:
            raise VLCacheError("LLaVA inputs with image_sizes (variable resolution) are not supported by VLCache yet")
        return list(pixel_values.split(1))

    def image_layouts(self, pixels: list[torch.Tensor], layout: torch.Tensor | None) -> list[tuple[int, ...]]:
        return [tuple(int(x) for x in p.shape[-2:]) for p in pixels]

    def layout_kwargs(self, layouts: list[tuple[int, ...]], device: torch.device) -> dict[str, torch.Tensor]:
        return {}  # fixed-size images: nothing describes them

    def image_feature_owner(self) -> nn.Module:
        return self.model.model

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.model.vision_tower


class LlavaNextAdapter(LlavaAdapter):
    """Adapter for `LlavaNextForConditionalGeneration` (LLaVA-NeXT / LLaVA-1.6).

    An image is tiled into a base view plus high-resolution crops chosen from its size, and the projected
    features are packed with an `image_newline` embedding after every row; `get_image_features` returns
    them per image, so the encoder cache stores that packed sequence and reuses it as is. `pixel_values`
    is [images, max crops, C, H, W] with `image_sizes` [images, 2]: both split by image row.
    """

    family = "LLaVA-NeXT"
    MODEL_TYPES = ("llava_next",)
    layout_arg = "image_sizes"

    def split_pixels(self, pixel_values: torch.Tensor, layout: torch.Tensor | None) -> list[torch.Tensor]:
        if layout is None:
            raise VLCacheError("LLaVA-NeXT pixel_values need their image_sizes; pass the processor's full output")
        return list(pixel_values.split(1))

    def image_layouts(self, pixels: list[torch.Tensor], layout: torch.Tensor | None) -> list[tuple[int, ...]]:
        return [(*(int(x) for x in size), *(int(x) for x in p.shape[1:])) for size, p in zip(layout.tolist(), pixels, strict=True)]

    def layout_kwargs(self, layouts: list[tuple[int, ...]], device: torch.device) -> dict[str, torch.Tensor]:
        return {"image_sizes": torch.tensor([layout[:2] for layout in layouts], dtype=torch.long, device=device)}
