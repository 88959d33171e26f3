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
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from ..errors import VLCacheError
from .base import ModelAdapter


def split_real_crops(pixel_values: torch.Tensor, crops: list[int]) -> list[torch.Tensor]:
    """Per image its first `crops[i]` crops [crops, C, H, W] (what the model's encoder reads), from a batch's
    `pixel_values`: [images, max crops, C, H, W] padded to the batch's largest count, or every image's crops
    concatenated [total crops, C, H, W], as the encoder also accepts."""
    if pixel_values.dim() == 4:
        return list(pixel_values.split(crops))
    return [row[:n] for row, n in zip(pixel_values, crops, strict=True)]


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
    is [images, max crops, C, H, W] (each image's crops, then zeros up to the batch's largest count) with
    `image_sizes` [images, 2]. Each image is its real crops only, as the model itself trims them before its
    vision tower: the key of a picture then does not depend on the other pictures of its batch, and a client
    that processes it alone (`models/serving.py`, for vLLM) computes the same key.
    """

    family = "LLaVA-NeXT"
    MODEL_TYPES = ("llava_next",)
    layout_arg = "image_sizes"

    def _num_crops(self, size: list[int]) -> int:
        """Crops the model's encoder reads for an image of `size` (height, width): its own rule."""
        config = self.model.config
        return image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)

    def split_pixels(self, pixel_values: torch.Tensor, layout: torch.Tensor | None) -> list[torch.Tensor]:
        """Per image its real crops [crops, C, H, W], batch padding dropped."""
        if layout is None:
            raise VLCacheError("LLaVA-NeXT pixel_values need their image_sizes; pass the processor's full output")
        return split_real_crops(pixel_values, [self._num_crops(size) for size in layout.tolist()])

    def image_layouts(self, pixels: list[torch.Tensor], layout: torch.Tensor | None) -> list[tuple[int, ...]]:
        """(height, width, crops, C, H, W) per image."""
        return [(*(int(x) for x in size), *(int(x) for x in p.shape)) for size, p in zip(layout.tolist(), pixels, strict=True)]

    def layout_kwargs(self, layouts: list[tuple[int, ...]], device: torch.device) -> dict[str, torch.Tensor]:
        return {"image_sizes": torch.tensor([layout[:2] for layout in layouts], dtype=torch.long, device=device)}
