"""The encoder cache: vision-encoder outputs reused by content, so a seen image or video never re-runs the ViT.

Since transformers 5.18, `generate` encodes images and videos *before* the first forward
(`mm_encoder_outputs`) by calling the base model's `get_image_features` / `get_video_features`; no public
hook lets a caller skip that call. We therefore wrap those methods on the model *instance* (never the
class, never `forward`). A wrapper is inert unless a `VLCache` of this model is armed (created and not yet
prefilled): then it looks every item up in that cache's store, runs the original encoder on the misses
only, and tags its output with the items' content keys so the prefill can find their K/V.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .errors import EntryMismatchError
from .models import ModelAdapter
from .models.base import Modality
from .store.entry import EncoderEntry
from .store.keys import ENCODER_KIND, digest, entry_key, image_key_from_pixels, tensor_parts

logger = logging.getLogger(__name__)

FEATURES_ATTR = "vlcache_features"
_ORIGINAL_PREFIX = "_vlcache_original_"
_armed: weakref.WeakKeyDictionary[nn.Module, weakref.ref] = weakref.WeakKeyDictionary()


@dataclass
class ImageFeatures:
    """Per-item encoder outputs of one request (images or videos), with where they came from."""

    embeddings: list[torch.Tensor]
    keys: list[str]
    hits: list[bool]
    seconds: float = 0.0
    deepstack: list[tuple[torch.Tensor, ...]] | None = None  # per item: per injection layer (Qwen3-VL)

    @property
    def tokens_per_image(self) -> list[int]:
        return [int(e.shape[0]) for e in self.embeddings]

    def __add__(self, other: ImageFeatures) -> ImageFeatures:
        """Items of `self` then `other` (e.g. images then videos), indexed in that order."""
        deepstack = None
        if self.deepstack or other.deepstack:
            deepstack = (self.deepstack or [()] * len(self.keys)) + (other.deepstack or [()] * len(other.keys))
        return ImageFeatures(
            self.embeddings + other.embeddings,
            self.keys + other.keys,
            self.hits + other.hits,
            self.seconds + other.seconds,
            deepstack,
        )


def _original(owner: nn.Module, modality: Modality):
    return getattr(owner, _ORIGINAL_PREFIX + modality.encoder_method, getattr(owner, modality.encoder_method))


def install(adapter: ModelAdapter) -> None:
    """Wrap each modality's encoder method once (idempotent)."""
    owner = adapter.image_feature_owner()
    for modality in adapter.modalities():
        if hasattr(owner, _ORIGINAL_PREFIX + modality.encoder_method) or not hasattr(owner, modality.encoder_method):
            continue
        original = getattr(owner, modality.encoder_method)
        setattr(owner, _ORIGINAL_PREFIX + modality.encoder_method, original)
        setattr(owner, modality.encoder_method, _wrapper(owner, modality, original))


def _wrapper(owner: nn.Module, modality: Modality, original):
    signature = inspect.signature(original)

    @functools.wraps(original)  # generate picks the encoder's arguments from this signature
    def encode_through_store(*args: Any, **kwargs: Any):
        cache_ref = _armed.get(owner)
        cache = cache_ref() if cache_ref is not None else None
        if cache is None:
            return original(*args, **kwargs)
        arguments = signature.bind(*args, **kwargs).arguments
        arguments.update(arguments.pop("kwargs", {}))
        return_dict = arguments.pop("return_dict", True)
        pixels = arguments.pop(next(iter(signature.parameters)))  # the first parameter holds the pixels
        layout = cache.adapter.item_layout(modality, {name: arguments.pop(name, None) for name in modality.layout_inputs})
        features = encode_items(cache.adapter, modality, cache.store, cache.fingerprint, pixels, layout, **arguments)
        output = BaseModelOutputWithPooling(pooler_output=tuple(features.embeddings))
        if features.deepstack:
            # what the model's own forward reads from pre-encoded outputs: per layer, per item
            output["deepstack_features"] = [tuple(layers) for layers in zip(*features.deepstack, strict=True)]
        setattr(output, FEATURES_ATTR, features)
        return output if return_dict else output.to_tuple()

    return encode_through_store


def arm(cache: Any) -> None:
    """Route the model's visual encoding through `cache`'s store until `disarm`."""
    _armed[cache.adapter.image_feature_owner()] = weakref.ref(cache)


def disarm(cache: Any) -> None:
    owner = cache.adapter.image_feature_owner()
    ref = _armed.get(owner)
    if ref is not None and ref() is cache:
        del _armed[owner]


def _vision_dtype(adapter: ModelAdapter) -> torch.dtype:
    return next(adapter.vision_tower.parameters()).dtype


def _load(store: Any, store_key: str, fingerprint: str, hidden: int, dtype: torch.dtype) -> EncoderEntry | None:
    stored = store.get(store_key)
    if stored is None:
        return None
    try:
        return EncoderEntry.from_stored(stored, fingerprint, hidden, dtype)
    except EntryMismatchError as err:
        logger.warning("dropping encoder entry %s…: %s", store_key[:20], err)
        store.discard(store_key)
        return None


def encode_items(
    adapter: ModelAdapter,
    modality: Modality,
    store: Any,
    fingerprint: str,
    pixel_values: torch.Tensor,
    layout: torch.Tensor | None,
    item_keys: list[str] | None = None,
    **kwargs: Any,
) -> ImageFeatures:
    """Encoder outputs of every item: stored ones loaded, the rest computed in one encoder call and stored.

    `layout` is the per-item layout argument the family's encoder takes (Qwen's `image_grid_thw`), if any.
    """
    start = time.perf_counter()
    device = pixel_values.device
    pixels = adapter.split_pixels(pixel_values, layout)
    layouts = adapter.image_layouts(pixels, layout)
    keys = item_keys or [image_key_from_pixels(p, g, modality.name) for p, g in zip(pixels, layouts, strict=True)]
    hidden, dtype = adapter.hidden_size, _vision_dtype(adapter)
    store_keys = [entry_key(ENCODER_KIND, fingerprint, key) for key in keys]

    entries = [_load(store, k, fingerprint, hidden, dtype) for k in store_keys]
    embeddings = [e.embeddings.to(device, non_blocking=True) if e is not None else None for e in entries]
    deepstack = [tuple(t.to(device, non_blocking=True) for t in e.deepstack) if e is not None else () for e in entries]
    missing = [i for i, entry in enumerate(entries) if entry is None]
    if missing:
        owner = adapter.image_feature_owner()
        output = adapter.encode(modality, _original(owner, modality), pixels, layout, missing, **kwargs)
        extra = getattr(output, "deepstack_features", None) or []
        for j, i in enumerate(missing):
            embeddings[i] = output.pooler_output[j]
            deepstack[i] = tuple(layer[j] for layer in extra)
            entry = EncoderEntry(embeddings[i].detach(), layouts[i], tuple(t.detach() for t in deepstack[i]))
            store.put(store_keys[i], entry.to_stored(fingerprint))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    hits = [entry is not None for entry in entries]
    return ImageFeatures(embeddings, keys, hits, time.perf_counter() - start, deepstack if any(deepstack) else None)  # type: ignore[arg-type]


def features_from_output(output) -> ImageFeatures:
    """Features for pre-encoded outputs passed by the caller: keyed by the embeddings' own bytes."""
    embeddings = list(output["pooler_output"])
    keys = [digest("encoder-output", *tensor_parts(e)) for e in embeddings]
    extra = output.get("deepstack_features") if hasattr(output, "get") else None
    deepstack = [tuple(layer[i] for layer in extra) for i in range(len(embeddings))] if extra else None
    return ImageFeatures(embeddings, keys, [False] * len(embeddings), 0.0, deepstack)
