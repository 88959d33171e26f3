"""Tiny models and processors of every supported family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-1.5,
LLaVA-NeXT, LLaVA-OneVision), built fully offline.

No weights or tokenizers are downloaded: the tokenizer is byte-level BPE with no merges (every byte is a
token) plus the Qwen special tokens, and the models come from configs with seeded random weights. Tests,
examples and benchmarks use these to run the real Transformers code paths in seconds on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
PATCH = 14


@dataclass(frozen=True)
class ToySize:
    """Shape of a toy model. `tiny` is for tests; `medium` makes compute dominate for benchmarks."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    vision_depth: int = 2
    vision_hidden: int = 32
    vision_heads: int = 2
    mrope_section: tuple[int, int, int] = (2, 3, 3)


TINY = ToySize()
MEDIUM = ToySize(
    hidden_size=1024,
    intermediate_size=2816,
    num_layers=8,
    num_heads=16,
    num_kv_heads=4,
    vision_depth=8,
    vision_hidden=512,
    vision_heads=8,
    mrope_section=(8, 12, 12),
)


def build_tokenizer(extra_special: tuple[str, ...] = ()):
    """Byte-level Qwen2 tokenizer with no merges: ~263 tokens, works offline."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=[], unk_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS + list(extra_special)})
    return tokenizer


CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif item['type'] == 'video' %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


FAMILIES = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl", "llava", "llava_next", "llava_onevision")
LLAVA_IMAGE_TOKEN = "<image>"
LLAVA_VIDEO_TOKEN = "<video>"
LLAVA_IMAGE_PX = 56  # CLIP-style 56-px crops, 14-px patches: 16 image tokens (LLaVA-1.5 uses 336 px → 576)
LLAVA_NEXT_PINPOINTS = [[56, 112], [112, 56], [112, 112]]  # tiles of 56 px: up to 4 crops + the base view


def build_processor(
    family: str = "qwen2_5_vl", max_pixels: int = 112 * 112, min_pixels: int = 56 * 56, tokenizer: Any = None
):
    """Processor for a toy model: small images give few tokens (112×112 → 16 merged tokens; Qwen3-VL's
    16-px patches: 128×128 → 16). `tokenizer` replaces the byte-level default (Qwen families)."""
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil, Qwen2VLVideoProcessor

    if family in ("llava", "llava_next"):
        from transformers import LlavaNextProcessor, LlavaProcessor
        from transformers.models.clip import CLIPImageProcessorPil
        from transformers.models.llava_next import LlavaNextImageProcessorPil

        side = LLAVA_IMAGE_PX
        crop = dict(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
        if family == "llava":
            processor_cls, image_processor = LlavaProcessor, CLIPImageProcessorPil(**crop)
        else:
            processor_cls = LlavaNextProcessor
            image_processor = LlavaNextImageProcessorPil(**crop, image_grid_pinpoints=LLAVA_NEXT_PINPOINTS)
        return processor_cls(
            image_processor=image_processor,
            tokenizer=build_tokenizer(_llava_tokens(family)),
            patch_size=PATCH,
            num_additional_image_tokens=1,
            vision_feature_select_strategy="default",
            chat_template=CHAT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", LLAVA_IMAGE_TOKEN),
        )
    if family == "llava_onevision":
        return _onevision_processor()
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    if family == "qwen3_vl":
        from transformers import Qwen3VLProcessor
        from transformers.models.qwen3_vl import Qwen3VLVideoProcessor

        scale = (16 / PATCH) ** 2
        image_processor = Qwen2VLImageProcessorPil(
            min_pixels=round(min_pixels * scale), max_pixels=round(max_pixels * scale), patch_size=16
        )
        return Qwen3VLProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=Qwen3VLVideoProcessor(),
            chat_template=CHAT_TEMPLATE,
        )
    image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    video_processor = Qwen2VLVideoProcessor(min_pixels=min_pixels, max_pixels=max_pixels, do_sample_frames=False)
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLProcessor as Processor
    elif family == "qwen2_vl":
        from transformers import Qwen2VLProcessor as Processor
    else:
        raise ValueError(f"unknown toy family {family!r}; expected one of {FAMILIES}")
    return Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def _llava_tokens(family: str) -> tuple[str, ...]:
    """Extra special tokens of a LLaVA-family toy tokenizer (OneVision also takes videos)."""
    if family == "llava_onevision":
        return (LLAVA_IMAGE_TOKEN, LLAVA_VIDEO_TOKEN)
    return (LLAVA_IMAGE_TOKEN,) if family.startswith("llava") else ()


def _onevision_processor():
    """LLaVA-OneVision processor: 56-px SigLIP views (16 tokens), an image alone in its prompt tiled into up to
    2×2 crops + the base view, several images per prompt as padded base views (16 tokens + a newline each)."""
    from transformers import LlavaOnevisionProcessor
    from transformers.models.llava_onevision import (
        LlavaOnevisionImageProcessorPil,
        LlavaOnevisionVideoProcessor,
    )

    side = {"height": LLAVA_IMAGE_PX, "width": LLAVA_IMAGE_PX}
    template = CHAT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", LLAVA_IMAGE_TOKEN)
    return LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessorPil(size=side, image_grid_pinpoints=LLAVA_NEXT_PINPOINTS),
        video_processor=LlavaOnevisionVideoProcessor(size=side),
        tokenizer=build_tokenizer(_llava_tokens("llava_onevision")),
        num_image_tokens=(LLAVA_IMAGE_PX // PATCH) ** 2,
        vision_feature_select_strategy="full",
        chat_template=template.replace("<|vision_start|><|video_pad|><|vision_end|>", LLAVA_VIDEO_TOKEN),
    )


def _llava_vision_kwargs(size: ToySize) -> dict[str, int]:
    """The ViT shape of every LLaVA-family toy (CLIP for LLaVA-1.5 / NeXT, SigLIP for OneVision)."""
    return dict(
        hidden_size=size.vision_hidden,
        intermediate_size=size.vision_hidden * 2,
        num_hidden_layers=max(2, size.vision_depth),
        num_attention_heads=size.vision_heads,
        image_size=LLAVA_IMAGE_PX,
        patch_size=PATCH,
    )


def build_config(family: str = "qwen2_5_vl", size: ToySize = TINY, vocab_size: int | None = None) -> Any:
    """Config of a toy model whose special-token ids match its `build_processor(family)` tokenizer."""
    tokenizer = build_tokenizer(_llava_tokens(family))
    ids = tokenizer.convert_tokens_to_ids
    text = dict(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
        num_key_value_heads=size.num_kv_heads,
        rope_parameters={"rope_type": "default", "mrope_section": list(size.mrope_section), "rope_theta": 1e4},
        bos_token_id=ids("<|im_start|>"),
        eos_token_id=ids("<|im_end|>"),
        pad_token_id=ids("<|endoftext|>"),
        max_position_embeddings=32768,
    )
    special = dict(
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig

        vision = dict(
            depth=size.vision_depth,
            hidden_size=size.vision_hidden,
            intermediate_size=size.vision_hidden * 2,
            num_heads=size.vision_heads,
            out_hidden_size=size.hidden_size,
            fullatt_block_indexes=[size.vision_depth - 1],
            window_size=56,
            patch_size=PATCH,
            spatial_merge_size=2,
            temporal_patch_size=2,
        )
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **special)
    if family == "qwen2_vl":
        from transformers import Qwen2VLConfig

        vision = dict(
            depth=size.vision_depth,
            embed_dim=size.vision_hidden,
            hidden_size=size.hidden_size,
            mlp_ratio=2,
            num_heads=size.vision_heads,
            patch_size=PATCH,
            spatial_merge_size=2,
            temporal_patch_size=2,
        )
        return Qwen2VLConfig(text_config=text, vision_config=vision, **special)
    if family in ("llava", "llava_next"):
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig

        text.pop("rope_parameters")
        vision = CLIPVisionConfig(**_llava_vision_kwargs(size))
        common = dict(
            vision_config=vision,
            text_config=LlamaConfig(**text),
            image_token_index=ids(LLAVA_IMAGE_TOKEN),
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
        if family == "llava_next":
            return LlavaNextConfig(**common, image_grid_pinpoints=LLAVA_NEXT_PINPOINTS)
        return LlavaConfig(**common)
    if family == "llava_onevision":
        from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e4}
        vision = SiglipVisionConfig(**_llava_vision_kwargs(size), vision_use_head=False)
        return LlavaOnevisionConfig(
            vision_config=vision,
            text_config=Qwen2Config(**text),
            image_token_index=ids(LLAVA_IMAGE_TOKEN),
            video_token_index=ids(LLAVA_VIDEO_TOKEN),
            image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
        )
    if family == "qwen3_vl":
        from transformers import Qwen3VLConfig

        text["head_dim"] = size.hidden_size // size.num_heads
        text["rope_parameters"] = dict(text["rope_parameters"], mrope_interleaved=True)
        vision = dict(
            depth=size.vision_depth,
            hidden_size=size.vision_hidden,
            intermediate_size=size.vision_hidden * 2,
            num_heads=size.vision_heads,
            out_hidden_size=size.hidden_size,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            deepstack_visual_indexes=[0],
            num_position_embeddings=64,
        )
        return Qwen3VLConfig(text_config=text, vision_config=vision, **special)
    raise ValueError(f"unknown toy family {family!r}; expected one of {FAMILIES}")


def build_model(
    family: str = "qwen2_5_vl",
    size: ToySize = TINY,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
):
    """A randomly initialised toy model in eval mode; the same seed gives the same weights."""
    from transformers import AutoModelForImageTextToText

    config = build_config(family, size)
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    return model.eval()


def make_image(seed: int, size: int = 112) -> Image.Image:
    """A deterministic RGB picture: coloured blocks plus noise, different for every seed."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    base = np.kron(blocks, np.ones((size // 4 + 1, size // 4 + 1, 1), dtype=np.uint8))[:size, :size]
    noise = rng.integers(0, 32, size=(size, size, 3), dtype=np.uint8)
    return Image.fromarray((base // 2 + noise).astype(np.uint8))


def image_tokens(size: int) -> int:
    """Merged LLM tokens of a square `size`×`size` image under a 14-px patch, 2×2 merge processor."""
    side = size // (PATCH * 2)
    return side * side


def make_video(seed: int, frames: int = 4, size: int = 112) -> np.ndarray:
    """A deterministic clip [frames, size, size, 3]: one picture drifting a few pixels per frame."""
    base = np.array(make_image(seed, size + 4 * frames))
    return np.stack([base[4 * f : 4 * f + size, 2 * f : 2 * f + size] for f in range(frames)])


def _part(part: str | Image.Image | np.ndarray) -> dict:
    if isinstance(part, Image.Image):
        return {"type": "image", "image": part}
    if isinstance(part, np.ndarray):
        return {"type": "video", "video": part}
    return {"type": "text", "text": part}


def message(role: str, *parts: str | Image.Image | np.ndarray) -> dict:
    """A chat message whose content mixes text, PIL images and videos ([frames, H, W, 3] arrays), in order."""
    return {"role": role, "content": [_part(p) for p in parts]}


def chat_inputs(processor, messages: list[dict], add_generation_prompt: bool = True):
    """Processor inputs (`input_ids`, `pixel_values`, ...) for a chat whose messages come from `message`
    (`vlcache_hf.probe.chat_inputs`, left where the processor puts them)."""
    from ..probe import chat_inputs as probe_chat_inputs

    return probe_chat_inputs(processor, messages, device=None, add_generation_prompt=add_generation_prompt)
