"""Model-family adapters. Add a family: one `ModelAdapter` subclass in its own file + one line below."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import UnsupportedModelError
from .base import KVLayout, ModelAdapter
from .llava import LlavaAdapter, LlavaNextAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .qwen3_vl import Qwen3VLAdapter
from .qwen_vl import QwenVLAdapter

ADAPTERS: list[type[ModelAdapter]] = [QwenVLAdapter, Qwen3VLAdapter, LlavaAdapter, LlavaNextAdapter, LlavaOnevisionAdapter]


def supported_families() -> list[str]:
    return [adapter.family for adapter in ADAPTERS]


def request_images(processor: Any, images: list[Any]) -> list[Any]:
    """One request's images in the form its processor reads as *one prompt*.

    Processors that tell a prompt's images apart (LLaVA-OneVision's `batch_num_images`: an image alone in its
    prompt is tiled, several are not) read a flat list as one prompt per image, so they get a nested list, as
    `apply_chat_template(..., tokenize=True)` gives them; every other processor gets the flat list.
    """
    image_processor = getattr(processor, "image_processor", None)
    if images and "batch_num_images" in getattr(image_processor, "model_input_names", ()):
        return [list(images)]
    return list(images)


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter serving `model`, or an `UnsupportedModelError` naming the supported families."""
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    raise UnsupportedModelError(
        f"vlcache-hf has no adapter for {type(model).__name__} (model_type={model_type!r}). "
        f"Supported families: {', '.join(supported_families())}. Load the model with "
        "AutoModelForImageTextToText (the *ForConditionalGeneration class)."
    )


__all__ = ["ADAPTERS", "KVLayout", "ModelAdapter", "get_adapter", "request_images", "supported_families"]
