"""Differences between transformers 5.x releases, kept in one place (lowest tested: 5.18).

- the cache keyword: `past_key_values` until 5.2x renamed it `cache` in `generate`, `forward` and the
  decoder layers (the old name deprecated);
- generate's image-encoding step, `_prepare_multimodal_encoder_kwargs_for_generation` (private): where it
  exists the encoder cache routes through it per call; without it generate encodes without the encoder cache;
- the processor's `_merge_kwargs` wants the kwargs class passed explicitly on 5.18 (later versions default it).
- load-time weight renaming (`revert_weight_conversion`): the names a checkpoint file uses for a weight.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

#: generate's step that encodes images before the prefill (a private method; see the module docstring)
GENERATE_ENCODING_STEP = "_prepare_multimodal_encoder_kwargs_for_generation"


def cache_kwarg_name(function: Callable | nn.Module) -> str:
    """The keyword under which `function` (a model's or a decoder layer's `forward`) takes the cache."""
    forward = function.forward if isinstance(function, nn.Module) else function
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def with_cache(model: nn.Module, cache: Any) -> dict[str, Any]:
    """`{<the right keyword>: cache}` for `model.generate(**inputs, **with_cache(model, cache))`."""
    return {} if cache is None else {cache_kwarg_name(model): cache}


def merge_processor_kwargs(processor: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The processor's own routing of call kwargs into text / images / ... kwargs."""
    return processor._merge_kwargs(processor.valid_processor_kwargs, tokenizer_init_kwargs=processor.tokenizer.init_kwargs, **kwargs)


def checkpoint_state_dict(model: nn.Module) -> dict[str, Any]:
    """The model's state dict under the names its checkpoint files use (transformers 5 renames some on load,
    e.g. Qwen2-VL's `model.layers.*` → `model.language_model.layers.*`, and reverts that on save)."""
    state = model.state_dict()
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # a transformers without load-time conversions: the names are the checkpoint's
        return dict(state)
    return dict(revert_weight_conversion(model, state))
