"""How other engines (vLLM) hold a family's images and encoder outputs, mapped onto our encoder entries.

vLLM keeps one tensor per multimodal item in its encoder cache, and one processed-input dict per item
(`MultiModalFeatureSpec.data`). For an entry to mean the same thing in a Hugging Face process and in vLLM,
three things must agree, and each is a family quirk, so it lives here:

- the item's **layout** (Qwen's (t, h, w) grid, LLaVA-1.5's (height, width)), read from vLLM's processed item;
- the **encoder output**: vLLM's Qwen3-VL concatenates the DeepStack features after the main embeddings on
  the last dimension (`Qwen3_VisionTransformer.forward`: `torch.cat([hidden_states] + deepstack, dim=1)`, in
  the order of `deepstack_visual_indexes`); our entry keeps them as separate tensors, as `get_image_features`
  returns them;
- the **item key** a client sends as vLLM's `multi_modal_uuids`: the same content key `encoder.item_keys`
  computes in `generate` (preprocessed pixels in the vision tower's dtype, layout, modality).

Supported: Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-1.5 and LLaVA-NeXT. The LLaVA keys also cover generate-time
encoder options (`vision_feature_layer`, `vision_feature_select_strategy`); vLLM applies the config's, which is
what `generate` uses when it is given none, so the keys agree for a `generate` called without them (one called
with other options keys, and misses, apart). LLaVA-NeXT tiles an image into a number of crops that depends on its
size; its layout is (height, width, crops, C, H, W), the crops counted by the model's own rule
(`image_size_to_num_patches`), so padding a batch adds to neither key nor layout. LLaVA-OneVision is not mapped:
its images are tiled or not depending on how many share the prompt.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from ..errors import UnsupportedModelError, VLCacheError
from ..store.keys import item_key

#: model types (config.model_type) whose vLLM items map onto our encoder entries
SERVING_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava", "llava_next")
#: families whose items are one fixed-size view each, laid out by its (height, width)
_FIXED_VIEW_MODEL_TYPES = ("llava",)
#: families whose items are an image's crops, laid out by (height, width, crops, C, H, W)
_TILED_MODEL_TYPES = ("llava_next",)


def _field_data(item: Mapping[str, Any], name: str) -> torch.Tensor | None:
    field = item.get(name)
    data = getattr(field, "data", field)
    return None if data is None else torch.as_tensor(data)


@dataclass(frozen=True)
class ServingFormat:
    """One family's mapping between vLLM's items and our encoder entries."""

    model_type: str
    hidden_size: int  # width of one embedding row (the language model's hidden size)
    deepstack_layers: int  # extra feature sets vLLM appends on the last dimension (Qwen3-VL), else 0
    grid_pinpoints: tuple[tuple[int, int], ...] = ()  # tiled families: the resolutions an image is tiled to
    tile_size: int = 0  # tiled families: the side of one crop (the vision tower's image size)

    def layout(self, modality: str, item: Mapping[str, Any] | None) -> tuple[int, ...] | None:
        """The item's layout from vLLM's processed item (None when vLLM did not keep the item's data)."""
        if item is None:
            return None
        if self.model_type in _FIXED_VIEW_MODEL_TYPES:  # the view's pixels [channels, height, width]
            data = _field_data(item, "pixel_values")
            return None if data is None else tuple(int(x) for x in data.shape[-2:])
        if self.model_type in _TILED_MODEL_TYPES:  # its crops [crops (+ batch padding), C, H, W] and (height, width)
            pixels, sizes = _field_data(item, "pixel_values"), _field_data(item, "image_sizes")
            if pixels is None or sizes is None:
                return None
            size = [int(x) for x in sizes.reshape(-1).tolist()]
            crops = image_size_to_num_patches(size, [list(p) for p in self.grid_pinpoints], self.tile_size)
            return (*size, crops, *(int(x) for x in pixels.shape[-3:]))
        field = item.get(f"{modality}_grid_thw")
        data = getattr(field, "data", field)
        if data is None:
            return None
        return tuple(int(x) for x in torch.as_tensor(data).reshape(-1).tolist())

    def split(self, output: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """vLLM's encoder output of one item → (embeddings, per-layer DeepStack features)."""
        expected = self.hidden_size * (1 + self.deepstack_layers)
        if output.ndim != 2 or output.shape[1] != expected:
            raise VLCacheError(
                f"vLLM encoder output of shape {tuple(output.shape)} does not fit {self.model_type} "
                f"(expected [tokens, {expected}])"
            )
        parts = output.split(self.hidden_size, dim=1)
        return parts[0], tuple(parts[1:])

    def join(self, embeddings: torch.Tensor, deepstack: Sequence[torch.Tensor]) -> torch.Tensor:
        """Our entry's tensors → the one tensor vLLM's encoder cache holds for the item."""
        if len(deepstack) != self.deepstack_layers:
            raise VLCacheError(f"entry has {len(deepstack)} DeepStack layers, {self.model_type} has {self.deepstack_layers}")
        return torch.cat([embeddings, *deepstack], dim=1) if deepstack else embeddings


def serving_format(config: Any) -> ServingFormat:
    """The format for a model config (a `transformers` config object); refuses families not mapped yet."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SERVING_MODEL_TYPES:
        raise UnsupportedModelError(
            f"vLLM encoder entries are mapped for {', '.join(SERVING_MODEL_TYPES)}, not {model_type!r}"
        )
    text = getattr(config, "text_config", config)
    vision = getattr(config, "vision_config", None)
    deepstack = len(getattr(vision, "deepstack_visual_indexes", None) or ())
    if model_type in _TILED_MODEL_TYPES:
        pinpoints = tuple((int(h), int(w)) for h, w in config.image_grid_pinpoints)
        return ServingFormat(model_type, int(text.hidden_size), deepstack, pinpoints, int(vision.image_size))
    return ServingFormat(model_type, int(text.hidden_size), deepstack)


def processed_item_keys(processor: Any, images: Sequence[Any], dtype: torch.dtype, modality: str = "image") -> list[str]:
    """The content key of each image as `generate` keys it (`encoder.item_keys`), from the Hugging Face
    processor alone: the image processor's pixels of each image, cast to the vision tower's `dtype`, with their
    layout — Qwen's pixel rows and grid, LLaVA-1.5's one view [1, channels, height, width] and its (height,
    width), LLaVA-NeXT's crops [crops, C, H, W] and (height, width, crops, C, H, W). Each image is processed
    as it would be alone (LLaVA-NeXT's processor pads a batch's crops; one image has no padding), so keys do
    not depend on the batch."""
    if modality != "image":
        raise VLCacheError("only image keys can be computed without the model so far")
    if type(processor.image_processor).__name__.startswith("LlavaNext"):
        keys = []
        for image in images:
            one = processor.image_processor(images=[image], return_tensors="pt")
            crops, size = one["pixel_values"][0], [int(x) for x in one["image_sizes"][0].tolist()]
            keys.append(item_key(crops, (*size, *crops.shape), modality, dtype))
        return keys
    out = processor.image_processor(images=list(images), return_tensors="pt")
    pixels = out["pixel_values"]
    if "image_grid_thw" in out:
        grid = out["image_grid_thw"]
        rows = torch.split(pixels, grid.prod(-1).tolist())
        return [item_key(r, g, modality, dtype) for r, g in zip(rows, grid.tolist(), strict=True)]
    if "image_sizes" not in out and pixels.ndim == 4:  # one fixed-size view per image (LLaVA-1.5)
        return [item_key(view, tuple(view.shape[-2:]), modality, dtype) for view in pixels.split(1)]
    raise UnsupportedModelError(
        f"{type(processor.image_processor).__name__} tiles images depending on the prompt (LLaVA-OneVision): "
        f"keys for vLLM are computed for {', '.join(SERVING_MODEL_TYPES)} only"
    )
