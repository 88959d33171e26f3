"""The encoder cache: vision-encoder outputs reused by image content, so a seen image never re-runs the ViT.

Since transformers 5.18, `generate` encodes images *before* the first forward (`mm_encoder_outputs`) by
calling the base model's `get_image_features`; no public hook lets a caller skip that call. We therefore
wrap `get_image_features` on the model *instance* (never the class, never `forward`). The wrapper is inert
unless a `VLCache` of this model is armed (created and not yet prefilled): then it looks every image up in
that cache's store, runs the original encoder on the misses only, and tags its output with the images'
content keys so the prefill can find their K/V.
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
from .store.entry import EncoderEntry
from .store.keys import ENCODER_KIND, digest, entry_key, image_key_from_pixels, tensor_parts

logger = logging.getLogger(__name__)

FEATURES_ATTR = "vlcache_features"
_ORIGINAL_ATTR = "_vlcache_original_get_image_features"
_armed: weakref.WeakKeyDictionary[nn.Module, weakref.ref] = weakref.WeakKeyDictionary()


@dataclass
class ImageFeatures:
    """Per-image encoder outputs of one request, with where they came from."""

    embeddings: list[torch.Tensor]
    keys: list[str]
    hits: list[bool]
    seconds: float = 0.0
    deepstack: list[tuple[torch.Tensor, ...]] | None = None  # per image: per injection layer (Qwen3-VL)

    @property
    def tokens_per_image(self) -> list[int]:
        return [int(e.shape[0]) for e in self.embeddings]


def install(adapter: ModelAdapter) -> None:
    """Wrap the model's `get_image_features` once (idempotent)."""
    owner = adapter.image_feature_owner()
    if hasattr(owner, _ORIGINAL_ATTR):
        return
    original = owner.get_image_features
    setattr(owner, _ORIGINAL_ATTR, original)
    signature = inspect.signature(original)

    @functools.wraps(original)  # generate picks the encoder's arguments from this signature
    def get_image_features(*args: Any, **kwargs: Any):
        cache_ref = _armed.get(owner)
        cache = cache_ref() if cache_ref is not None else None
        if cache is None:
            return original(*args, **kwargs)
        arguments = signature.bind(*args, **kwargs).arguments
        arguments.update(arguments.pop("kwargs", {}))
        return_dict = arguments.pop("return_dict", True)
        pixel_values = arguments.pop("pixel_values")
        layout = arguments.pop(adapter.layout_arg, None) if adapter.layout_arg else None
        features = encode_images(cache.adapter, cache.store, cache.fingerprint, pixel_values, layout, **arguments)
        output = BaseModelOutputWithPooling(pooler_output=tuple(features.embeddings))
        if features.deepstack:
            # what the model's own forward reads from pre-encoded outputs: per layer, per image
            output["deepstack_features"] = [tuple(layers) for layers in zip(*features.deepstack)]
        setattr(output, FEATURES_ATTR, features)
        return output if return_dict else output.to_tuple()

    owner.get_image_features = get_image_features


def arm(cache: Any) -> None:
    """Route the model's image encoding through `cache`'s store until `disarm`."""
    _armed[cache.adapter.image_feature_owner()] = weakref.ref(cache)


def disarm(cache: Any) -> None:
    owner = cache.adapter.image_feature_owner()
    ref = _armed.get(owner)
    if ref is not None and ref() is cache:
        del _armed[owner]


def original_encoder(adapter: ModelAdapter):
    owner = adapter.image_feature_owner()
    return getattr(owner, _ORIGINAL_ATTR, owner.get_image_features)


def _vision_dtype(adapter: ModelAdapter) -> torch.dtype:
    return next(adapter.vision_tower.parameters()).dtype


def encode_images(
    adapter: ModelAdapter,
    store: Any,
    fingerprint: str,
    pixel_values: torch.Tensor,
    layout: torch.Tensor | None,
    image_keys: list[str] | None = None,
    **kwargs: Any,
) -> ImageFeatures:
    """Encoder outputs of every image: stored ones loaded, the rest computed in one encoder call and stored.

    `layout` is the per-image layout argument the family's encoder takes (Qwen's `image_grid_thw`), if any.
    """
    start = time.perf_counter()
    device = pixel_values.device
    pixels = adapter.split_pixels(pixel_values, layout)
    grids = adapter.image_layouts(pixels, layout)
    keys = image_keys or [image_key_from_pixels(p, g) for p, g in zip(pixels, grids)]
    hidden, dtype = adapter.hidden_size, _vision_dtype(adapter)

    embeddings: list[torch.Tensor | None] = []
    deepstack: list[tuple[torch.Tensor, ...]] = []
    for key in keys:
        store_key = entry_key(ENCODER_KIND, fingerprint, key)
        stored = store.get(store_key)
        entry = None
        if stored is not None:
            try:
                entry = EncoderEntry.from_stored(stored, fingerprint, hidden, dtype)
            except EntryMismatchError as err:
                logger.warning("dropping encoder entry %s: %s", store_key[:16], err)
                store.discard(store_key)
        embeddings.append(entry.embeddings.to(device, non_blocking=True) if entry is not None else None)
        deepstack.append(tuple(t.to(device, non_blocking=True) for t in entry.deepstack) if entry is not None else ())

    hits = [e is not None for e in embeddings]
    missing = [i for i, hit in enumerate(hits) if not hit]
    if missing:
        output = adapter.encode(original_encoder(adapter), pixels, layout, missing, **kwargs)
        extra = getattr(output, "deepstack_features", None) or []
        for j, (i, emb) in enumerate(zip(missing, output.pooler_output)):
            embeddings[i] = emb
            deepstack[i] = tuple(layer[j] for layer in extra)
            entry = EncoderEntry(emb.detach(), grids[i], tuple(t.detach() for t in deepstack[i]))  # type: ignore[arg-type]
            store.put(entry_key(ENCODER_KIND, fingerprint, keys[i]), entry.to_stored(fingerprint))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    has_deepstack = any(deepstack)
    return ImageFeatures(embeddings, keys, hits, time.perf_counter() - start, deepstack if has_deepstack else None)  # type: ignore[arg-type]


def features_from_output(output) -> ImageFeatures:
    """Features for pre-encoded outputs passed by the caller: keyed by the embeddings' own bytes."""
    embeddings = list(output["pooler_output"])
    keys = [digest("image-embeddings", *tensor_parts(e)) for e in embeddings]
    extra = output.get("deepstack_features") if hasattr(output, "get") else None
    deepstack = [tuple(layer[i] for layer in extra) for i in range(len(embeddings))] if extra else None
    return ImageFeatures(embeddings, keys, [False] * len(embeddings), 0.0, deepstack)
