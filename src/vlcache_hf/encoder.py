"""The encoder cache: vision-encoder outputs reused by content, so a seen image or video never re-runs the ViT.

Since transformers 5.18, `generate` encodes images and videos *before* the first forward
(`mm_encoder_outputs`) by calling the base model's `get_image_features` / `get_video_features`; no public
hook lets a caller skip that call. We therefore route those methods on the model *instance* (never the
class, never `forward`) through small picklable callables (`EncoderRoute`). Which cache a call's images go
to belongs to the call: generate's encoding step (`RequestScope`) finds the `VLCache` the call was handed
in its own kwargs and makes it current in a context variable only while that step runs, so threads, tasks
and other caches of the same model never see it. A route then looks every item up in that cache's store,
runs the original encoder on the misses only, and tags its output with the items' content keys so the
prefill can find their K/V; the new entries are published only once the prefill succeeded.
"""
from __future__ import annotations

import inspect
import logging
import threading
import time
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from . import compat
from .cache_lookup import find_cache
from .models import ModelAdapter
from .models.base import Modality
from .store.entry import EncoderEntry, load_checked
from .store.keys import (
    ENCODER_KIND,
    digest,
    encoder_options,
    entry_key,
    item_key,
    tensor_parts,
)

logger = logging.getLogger(__name__)

FEATURES_ATTR = "vlcache_features"
_install_lock = threading.Lock()
_request: ContextVar[Any] = ContextVar("vlcache_request", default=None)  # the VLCache of the encoding step running


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
    """The encoder method as the model defines it (what `encode_items` runs on the misses)."""
    method = getattr(owner, modality.encoder_method)
    return method.original() if isinstance(method, EncoderRoute) else method


def _class_method(instance: nn.Module, name: str, inner: Any):
    return inner if inner is not None else getattr(type(instance), name).__get__(instance, type(instance))


class EncoderRoute:
    """Stands on the model instance in place of `get_image_features` / `get_video_features`.

    It holds no closure and no per-model state: it finds the cache of the `generate` call in progress in a
    context variable, and the original method on the owner's class at call time. It is a plain object of an
    importable class whose only reference is its owner, so `deepcopy` and `torch.save`/`torch.load` rebind it
    to the copy, which then encodes with its *own* vision tower.
    Outside a `generate` call handed a `VLCache` (and for another model's cache) it is the original method.
    """

    def __init__(self, owner: nn.Module, method: str, inner: Any = None):
        self.owner, self.method, self.inner = owner, method, inner  # inner: an instance attribute it replaced

    def original(self):
        return _class_method(self.owner, self.method, self.inner)

    @property
    def __signature__(self) -> inspect.Signature:  # generate picks the encoder's arguments from it
        return inspect.signature(self.original())

    def __repr__(self) -> str:
        return f"EncoderRoute({type(self.owner).__name__}.{self.method})"

    def __call__(self, *args: Any, **kwargs: Any):
        cache = _request.get()
        if cache is None or cache.adapter.image_feature_owner() is not self.owner:
            return self.original()(*args, **kwargs)
        modality = next(m for m in cache.adapter.modalities() if m.encoder_method == self.method)
        signature = self.__signature__
        arguments = signature.bind(*args, **kwargs).arguments
        arguments.update(arguments.pop("kwargs", {}))
        return_dict = arguments.pop("return_dict", True)
        pixels = arguments.pop(next(iter(signature.parameters)))  # the first parameter holds the pixels
        layout = cache.adapter.item_layout(modality, {name: arguments.pop(name, None) for name in modality.layout_inputs})
        features = encode_items(
            cache.adapter, modality, cache.store, cache.fingerprint, pixels, layout, pending=cache.pending_entries, **arguments
        )
        output = BaseModelOutputWithPooling(pooler_output=tuple(features.embeddings))
        if features.deepstack:
            # what the model's own forward reads from pre-encoded outputs: per layer, per item
            output["deepstack_features"] = [tuple(layers) for layers in zip(*features.deepstack, strict=True)]
        setattr(output, FEATURES_ATTR, features)
        return output if return_dict else output.to_tuple()


# transformers 5.18-5.24: the step of `generate` that encodes images and videos, called with `model_kwargs`
# (which hold the call's cache); without it (another version) generate encodes without the encoder cache.
GENERATE_ENCODING_STEP = compat.GENERATE_ENCODING_STEP


class RequestScope:
    """Stands on the model instance in place of generate's encoding step: while that step runs for a call
    handed an unfilled `VLCache`, the call's cache is the context's current request, so the encoder routes of
    exactly that call (thread- and task-local) use that cache's store. Nothing outlives the step."""

    def __init__(self, model: nn.Module, inner: Any = None):
        self.model, self.inner = model, inner

    def original(self):
        return _class_method(self.model, GENERATE_ENCODING_STEP, self.inner)

    def __repr__(self) -> str:
        return f"RequestScope({type(self.model).__name__})"

    def __call__(self, *args: Any, **kwargs: Any):
        model_kwargs = args[0] if args else kwargs.get("model_kwargs", {})
        cache = find_cache(model_kwargs)
        if cache is None or cache.is_prefilled:
            return self.original()(*args, **kwargs)
        cache.pending_entries.clear()  # what an earlier, failed call on this cache encoded is not published
        token = _request.set(cache)
        try:
            return self.original()(*args, **kwargs)
        except BaseException:
            cache.pending_entries.clear()
            raise
        finally:
            _request.reset(token)


def _replace(instance: nn.Module, name: str, make) -> None:
    current = instance.__dict__.get(name)
    if isinstance(current, (EncoderRoute, RequestScope)):
        return
    object.__setattr__(instance, name, make(current))


def install(adapter: ModelAdapter) -> None:
    """Put the encoder routes and the request scope on the model instance once (idempotent, picklable)."""
    owner = adapter.image_feature_owner()
    with _install_lock:
        for modality in adapter.modalities():
            if hasattr(owner, modality.encoder_method):
                method = modality.encoder_method
                _replace(owner, method, lambda inner, m=method: EncoderRoute(owner, m, inner))
        if hasattr(adapter.model, GENERATE_ENCODING_STEP):
            _replace(adapter.model, GENERATE_ENCODING_STEP, lambda inner: RequestScope(adapter.model, inner))
        else:
            logger.warning(
                "this transformers version has no %s: generate's image encoding bypasses the encoder cache",
                GENERATE_ENCODING_STEP,
            )


def publish_pending(cache: Any) -> None:
    """Write the encoder entries a request computed, once its prefill succeeded (and if it publishes)."""
    entries, cache.pending_entries[:] = list(cache.pending_entries), []
    if cache.settings.publish:
        for key, stored in entries:
            cache.store.put(key, stored)


def _vision_dtype(adapter: ModelAdapter) -> torch.dtype:
    return next(adapter.vision_tower.parameters()).dtype


def load_encoder_entry(store: Any, store_key: str, fingerprint: str, hidden: int, dtype: torch.dtype) -> EncoderEntry | None:
    return load_checked(store, store_key, lambda stored, key: EncoderEntry.from_stored(stored, fingerprint, hidden, dtype, key=key))


def item_keys(
    adapter: ModelAdapter, modality: Modality, pixels: list[torch.Tensor], layouts: list[tuple[int, ...]], options: str
) -> list[str]:
    """The one content key of each item, whichever way its request was made (`VLCacheProcessor` or the plain
    processor): its encoder entry, its K/V and every context hash that contains it use this key.

    It covers all the encoder output depends on: the preprocessed pixels, the item's layout (Qwen's grid,
    LLaVA-OneVision's size and tiled/base-view variant), the modality and the encoder options (`encoder_options`).
    The pixels are hashed as the vision tower reads them — in its dtype, as every supported tower casts its
    input first — so pixels passed in float32 or already cast to the model's dtype are one image.
    """
    dtype = _vision_dtype(adapter)
    return [item_key(p, g, modality.name, dtype, options) for p, g in zip(pixels, layouts, strict=True)]


def encode_items(
    adapter: ModelAdapter,
    modality: Modality,
    store: Any,
    fingerprint: str,
    pixel_values: torch.Tensor,
    layout: torch.Tensor | None,
    pending: list[tuple[str, Any]] | None = None,
    **kwargs: Any,
) -> ImageFeatures:
    """Encoder outputs of every item: stored ones loaded, the rest computed in one encoder call and stored.

    `layout` is the per-item layout argument the family's encoder takes (Qwen's `image_grid_thw`), if any.
    `pending`, when given, collects the new entries instead of storing them (a request publishes them only
    once its prefill succeeded, so a failed request leaves the store as it was).
    `kwargs` are the encoder method's further arguments; they are part of every item's key (`item_keys`).
    """
    start = time.perf_counter()
    device = pixel_values.device
    pixels = adapter.split_pixels(pixel_values, layout)
    layouts = adapter.image_layouts(pixels, layout)
    # generate-time encoder arguments (vision_feature_layer, ...) change the output
    keys = item_keys(adapter, modality, pixels, layouts, encoder_options(kwargs))
    hidden, dtype = adapter.hidden_size, _vision_dtype(adapter)
    store_keys = [entry_key(ENCODER_KIND, fingerprint, key) for key in keys]

    entries = [load_encoder_entry(store, k, fingerprint, hidden, dtype) for k in store_keys]
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
            stored = (store_keys[i], entry.to_stored(fingerprint, store_keys[i]))
            if pending is None:
                store.put(*stored)
            else:
                pending.append(stored)
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
