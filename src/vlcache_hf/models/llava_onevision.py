"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): SigLIP tower, projector, Qwen2 LLM with 1-D RoPE.

Quirks handled here:
- an image's token layout depends on its prompt, not only on its content: an image alone in its prompt is
  tiled (base view + high-resolution crops, unpadded, with an `image_newline` after every row), while each of
  several images in one prompt gets its padded base view only (+ one `image_newline`). The processor and the
  model learn which from `batch_num_images`. We fold that flag into the per-item layout, so the two variants of
  one picture are two encoder entries and two KV entries — an image is reused wherever it appears in the same
  variant (any position, any order, any neighbours), and encoded afresh the first time it appears in the other;
- the encoder can only be told "not tiled" for a group of at least two images (`batch_num_images` holds counts
  per prompt, and a count of 1 means tiled): a lone untiled miss is encoded next to a copy of itself (one extra
  base-view ViT pass) and the copy's output dropped;
- videos: each video is one item (frames pooled 2×2, one `image_newline` after the last frame), reused whole at
  any position; individual frames are not reused on their own, because the pooled frames share one trailing
  newline token and the processor gives them no per-frame layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

from ..errors import VLCacheError
from .base import Modality
from .llava import LlavaAdapter, split_real_crops

#: columns of an image's layout row: original height, original width, tiled (1) or base view only (0)
_HEIGHT, _WIDTH, _TILED = 0, 1, 2


class LlavaOnevisionAdapter(LlavaAdapter):
    """Adapter for `LlavaOnevisionForConditionalGeneration` (images tiled or not, and videos)."""

    family = "LLaVA-OneVision"
    MODEL_TYPES = ("llava_onevision",)
    layout_arg = "image_sizes"

    def modalities(self) -> list[Modality]:
        image = Modality(
            "image", self.image_token_id, "get_image_features", "pixel_values", "image_sizes", ("batch_num_images",)
        )
        video = Modality("video", int(self.model.config.video_token_id), "get_video_features", "pixel_values_videos", None)
        return [image, video]

    # -- layouts -------------------------------------------------------------------------------------------
    def item_layout(self, modality: Modality, inputs: Mapping[str, Any]) -> torch.Tensor | None:
        """Images: [n, 3] rows (height, width, tiled); videos have no layout input."""
        if modality.name != "image":
            return None
        sizes = inputs.get("image_sizes")
        if sizes is None:
            raise VLCacheError("LLaVA-OneVision pixel_values need their image_sizes; pass the processor's full output")
        sizes = torch.as_tensor(sizes).long().view(-1, 2)
        counts = inputs.get("batch_num_images")
        if counts is None:  # the model's own rule without counts: every image is tiled
            tiled = [True] * len(sizes)
        else:
            tiled = [n == 1 for n in torch.as_tensor(counts).view(-1).tolist() for _ in range(n)]
        if len(tiled) != len(sizes):
            raise VLCacheError(f"batch_num_images counts {len(tiled)} images but image_sizes has {len(sizes)}")
        flags = torch.tensor(tiled, dtype=torch.long, device=sizes.device)[:, None]
        return torch.cat([sizes, flags], dim=1)

    def image_variant(self, prompt_images: int) -> str:
        return "tiled" if prompt_images == 1 else "base-view"

    def preprocess_images(
        self, image_processor: Any, images: list[Any], prompt_images: int, **images_kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tiled when the prompt has one image; otherwise base views, which the image processor gives for a
        nested group of two or more (a lone one is processed beside a copy of itself, the copy dropped)."""
        if prompt_images == 1:  # a flat list of one reads as one prompt of one: the default path tiles it
            return super().preprocess_images(image_processor, images, prompt_images, **images_kwargs)
        group = list(images) + list(images[:1]) if len(images) == 1 else list(images)
        processed = image_processor(images=[group], return_tensors="pt", **images_kwargs)
        sizes = processed["image_sizes"][: len(images)].long().view(-1, 2)
        untiled = torch.zeros(len(images), 1, dtype=torch.long)
        return processed["pixel_values"][: len(images)], torch.cat([sizes, untiled], dim=1)

    def _num_crops(self, row: list[int]) -> int:
        """Crops the encoder reads for one image: its base view, plus the tiles when it is tiled."""
        if not row[_TILED]:
            return 1
        config = self.model.config
        size = [row[_HEIGHT], row[_WIDTH]]
        return image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)

    def split_pixels(self, pixel_values: torch.Tensor, layout: torch.Tensor | None) -> list[torch.Tensor]:
        """Per image its real crops [crops, C, H, W] (batch padding dropped); per video its row [1, frames, C, H, W]."""
        if layout is None:
            return list(pixel_values.split(1))
        return split_real_crops(pixel_values, [self._num_crops(row) for row in layout.tolist()])

    def image_layouts(self, pixels: list[torch.Tensor], layout: torch.Tensor | None) -> list[tuple[int, ...]]:
        """Images: (height, width, tiled, crops, C, H, W); videos: (frames, C, H, W)."""
        if layout is None:
            return [tuple(int(x) for x in p.shape[1:]) for p in pixels]
        return [(*(int(x) for x in row), *(int(x) for x in p.shape)) for row, p in zip(layout.tolist(), pixels, strict=True)]

    def layout_kwargs(self, layouts: list[tuple[int, ...]], device: torch.device) -> dict[str, torch.Tensor]:
        """`image_sizes` and `batch_num_images` as the processor would give them for these images, so the
        inputs also make sense to code that reads them (the model itself only needs them to encode pixels)."""
        sizes = torch.tensor([layout[:2] for layout in layouts], dtype=torch.long, device=device)
        tiled = {bool(layout[_TILED]) for layout in layouts}
        if len(tiled) > 1:
            raise VLCacheError("one LLaVA-OneVision prompt cannot mix tiled and untiled images")
        counts = [1] * len(layouts) if tiled == {True} else [len(layouts)]
        return {"image_sizes": sizes, "batch_num_images": torch.tensor(counts, dtype=torch.long, device=device)}

    # -- encoding ------------------------------------------------------------------------------------------
    def encode(
        self, modality: Modality, original, pixels: list[torch.Tensor], layout: torch.Tensor | None, indices: list[int], **kwargs
    ):
        """Encode items `indices` in one call: tiled images as prompts of one, untiled ones as one prompt of many."""
        if modality.name != "image":
            return super().encode(modality, original, pixels, layout, indices, **kwargs)
        kwargs.pop("batch_num_images", None)
        rows = layout.tolist()
        tiled = [i for i in indices if rows[i][_TILED]]
        untiled = [i for i in indices if not rows[i][_TILED]]
        padding = untiled[:1] if len(untiled) == 1 else []  # a group of one would read as "tiled"
        order = tiled + untiled + padding
        counts = [1] * len(tiled) + ([len(untiled) + len(padding)] if untiled else [])
        output = original(
            torch.cat([pixels[i] for i in order]),
            image_sizes=layout[order, :2],
            batch_num_images=torch.tensor(counts, dtype=torch.long, device=layout.device),
            return_dict=True,
            **kwargs,
        )
        by_item = dict(zip(order, output.pooler_output, strict=True))  # the padding copy maps to its own item
        return BaseModelOutputWithPooling(pooler_output=tuple(by_item[i] for i in indices))
