"""`VLCacheProcessor`: a processor wrapper that skips image preprocessing and encoding for stored images.

It keys every image by its raw content (decoded pixels or file bytes) and the image-processor settings,
looks the encoder output up in the store, and runs the image processor and the vision encoder on the
misses only. It returns the token ids (placeholders expanded from the stored token counts) together with
`mm_encoder_outputs` — pre-encoded features that `generate` (transformers ≥ 5.18) accepts natively — so
the model never sees pixels of an image it has encoded before. Its outputs also work with plain `generate`.
"""

from __future__ import annotations

import inspect
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature
from transformers.modeling_outputs import BaseModelOutputWithPooling

from . import encoder
from .errors import EntryMismatchError, VLCacheError
from .fingerprint import fingerprint
from .models import get_adapter
from .store.entry import EncoderEntry
from .store.keys import ENCODER_KIND, digest, entry_key, tensor_parts
from .store.store import CacheStore


def raw_image_key(image: Any, settings: str) -> str:
    """Content key of an image as the user passed it: decoded pixels of a PIL image or array, or file bytes."""
    if isinstance(image, Image.Image):
        return digest("raw-image", settings, image.mode, f"{image.size}", image.tobytes())
    if isinstance(image, np.ndarray):
        return digest("raw-array", settings, f"{image.dtype}{image.shape}", memoryview(np.ascontiguousarray(image)).cast("B"))
    if isinstance(image, torch.Tensor):
        return digest("raw-tensor", settings, *tensor_parts(image))
    if isinstance(image, (str, Path)) and Path(image).is_file():
        return digest("raw-file", settings, Path(image).read_bytes())
    raise VLCacheError(f"VLCacheProcessor cannot key an image of type {type(image).__name__}; pass PIL images, arrays or file paths")


class VLCacheProcessor:
    """Wraps a model's `AutoProcessor`: `VLCacheProcessor(processor, model, store)(text=..., images=...)`.

    `last_hits` tells, after each call, which images were served from the store.
    """

    def __init__(self, processor: Any, model: torch.nn.Module, store: CacheStore):
        self.processor = processor
        self.model = model
        self.store = store
        self.adapter = get_adapter(model)
        self.fingerprint = fingerprint(model)
        self.settings = json.dumps(processor.image_processor.to_dict(), sort_keys=True, default=str)
        self.image_token: str = processor.image_token
        self.last_hits: list[bool] = []
        self.last_seconds = 0.0

    def __getattr__(self, name: str) -> Any:  # decode, apply_chat_template, tokenizer, ...
        return getattr(self.processor, name)

    def _load(self, key: str) -> EncoderEntry | None:
        store_key = entry_key(ENCODER_KIND, self.fingerprint, key)
        stored = self.store.get(store_key)
        if stored is None:
            return None
        try:
            dtype = next(self.adapter.vision_tower.parameters()).dtype
            return EncoderEntry.from_stored(stored, self.fingerprint, self.adapter.hidden_size, dtype)
        except EntryMismatchError:
            self.store.discard(store_key)
            return None

    def __call__(self, text: str | list[str], images: list[Any] | None = None, **kwargs: Any) -> BatchFeature:
        texts = [text] if isinstance(text, str) else list(text)
        if len(texts) != 1:
            raise VLCacheError("VLCacheProcessor serves one request at a time; pass one text")
        if not images:
            return self.processor(text=texts, **kwargs)
        start = time.perf_counter()
        device = self.model.device
        if len(images) == 1 and isinstance(images[0], (list, tuple)):  # one request's images, nested as HF takes them
            images = list(images[0])
        variant = self.adapter.image_variant(len(images))
        keys = [raw_image_key(image, f"{self.settings}|{variant}") for image in images]
        entries = [self._load(key) for key in keys]
        missing = [i for i, entry in enumerate(entries) if entry is None]
        modality = self.adapter.modalities()[0]
        embeddings: list[torch.Tensor | None] = [e.embeddings.to(device) if e else None for e in entries]
        deepstack = [tuple(t.to(device) for t in e.deepstack) if e else () for e in entries]
        layouts: list[tuple[int, ...] | None] = [tuple(e.grid_thw) if e else None for e in entries]
        if missing:
            pixels, layout = self.adapter.preprocess_images(self.processor.image_processor, [images[i] for i in missing], len(images))
            pixels = pixels.to(device, self.model.dtype)
            layout = layout.to(device) if layout is not None else None
            found = encoder.encode_items(
                self.adapter, modality, self.store, self.fingerprint, pixels, layout, item_keys=[keys[i] for i in missing]
            )
            for j, i in enumerate(missing):
                embeddings[i] = found.embeddings[j]
                deepstack[i] = found.deepstack[j] if found.deepstack else ()
            for i, item_layout in zip(missing, self.adapter.image_layouts(self.adapter.split_pixels(pixels, layout), layout), strict=True):
                layouts[i] = item_layout
        counts = [int(e.shape[0]) for e in embeddings]  # type: ignore[union-attr]
        expanded = self._expand(texts[0], counts)
        inputs = self.processor.tokenizer([expanded], return_tensors="pt", **kwargs)
        if "mm_token_type_ids" in inspect.signature(self.model.forward).parameters:
            inputs["mm_token_type_ids"] = torch.tensor(self.processor.create_mm_token_type_ids(inputs["input_ids"].tolist()))
        features = encoder.ImageFeatures(
            embeddings, keys, [e is not None for e in entries], time.perf_counter() - start, deepstack if any(deepstack) else None
        )
        output = BaseModelOutputWithPooling(pooler_output=tuple(embeddings))
        if features.deepstack:
            output["deepstack_features"] = [tuple(layers) for layers in zip(*features.deepstack, strict=True)]
        setattr(output, encoder.FEATURES_ATTR, features)
        data = dict(inputs)
        data.update(self.adapter.layout_kwargs(layouts, torch.device("cpu")))  # type: ignore[arg-type]
        batch = BatchFeature(data)
        batch["mm_encoder_outputs"] = {"image": output}
        self.last_hits = features.hits
        self.last_seconds = features.seconds
        return batch

    def _expand(self, text: str, counts: list[int]) -> str:
        parts = text.split(self.image_token)
        if len(parts) - 1 != len(counts):
            raise VLCacheError(
                f"the text has {len(parts) - 1} {self.image_token} placeholders but {len(counts)} images were given"
            )
        out = [parts[0]]
        for count, part in zip(counts, parts[1:], strict=True):
            out += [self.image_token * count, part]
        return "".join(out)
