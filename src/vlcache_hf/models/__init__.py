"""Model-family adapters. Add a family: one `ModelAdapter` subclass in its own file + one line below."""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from .base import KVLayout, ModelAdapter
from .llava import LlavaAdapter, LlavaNextAdapter
from .qwen3_vl import Qwen3VLAdapter
from .qwen_vl import QwenVLAdapter

ADAPTERS: list[type[ModelAdapter]] = [QwenVLAdapter, Qwen3VLAdapter, LlavaAdapter, LlavaNextAdapter]


def supported_families() -> list[str]:
    return [adapter.family for adapter in ADAPTERS]


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


__all__ = ["ADAPTERS", "KVLayout", "ModelAdapter", "get_adapter", "supported_families"]
