"""`VLCacheProcessor`: a processor wrapper that skips image preprocessing and encoding for stored images.

It finds every image by a *raw key*: the pixels the image processor starts from — after the processor's own
loading (a file path is opened and EXIF-rotated as the processor does) and colour conversion (a palette
image's colours, not its index bytes; transparency composited) — plus the image-processor settings in force
for this call (its attributes read now, and the call's image kwargs). The raw key is only an index: a small
alias entry maps it to the image's *item key*, the one key `encoder.encode_items` gives the image from its
preprocessed pixels on the plain path too. The encoder entry, the image's K/V and every context hash use the
item key, so an exact repeat is exact whichever way each request was made (wrapper or plain processor). On
a miss (no alias, or an alias whose entry was evicted) the wrapper preprocesses the image, lets
`encode_items` key, look up and encode it, and records the alias. It returns the token ids
(placeholders expanded from the stored token counts), tokenized with the call's text kwargs exactly as the
wrapped processor would, together with `mm_encoder_outputs` — pre-encoded features that `generate`
(transformers ≥ 5.18) accepts natively — so the model never sees pixels of an image it has encoded before.
Its outputs also work with plain `generate`.

A call the wrapper cannot serve faithfully (videos or audio, images nested as several prompts, a kwarg that
neither the tokenizer nor the image processor takes, `return_tensors` other than "pt") is handed to the
wrapped processor unchanged: never a different answer, only no reuse for that call. Several texts are a
`VLCacheError`: like `VLCache`, the wrapper serves one request per call.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import torch
from transformers import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.image_utils import is_valid_image
from transformers.modeling_outputs import BaseModelOutputWithPooling

from . import encoder
from .compat import merge_processor_kwargs
from .errors import VLCacheError
from .fingerprint import fingerprint
from .models import get_adapter
from .store.entry import AliasEntry, EncoderEntry, load_checked
from .store.keys import ALIAS_KIND, ENCODER_KIND, entry_key, image_key_from_seen
from .store.store import CacheStore

#: call kwargs the wrapper honours besides those the tokenizer and the image processor take
_OWN_KWARGS = {"return_tensors", "return_mm_token_type_ids"}


def _is_one_image(image: Any) -> bool:
    """One image as the processor reads it (a 4-D array is a batch, a list is several)."""
    if isinstance(image, str):
        return True
    if isinstance(image, (np.ndarray, torch.Tensor)):
        return image.ndim in (2, 3)
    return is_valid_image(image)


def _exposes_conversion(image_processor: Any) -> bool:
    """Whether the image processor's input conversion can be run on its own (`process_image`, implemented by
    transformers' PIL and torchvision backends). Without it an image cannot be keyed as the processor sees it,
    so the wrapped processor serves the call."""
    method = getattr(type(image_processor), "process_image", None)
    return method is not None and method is not getattr(BaseImageProcessor, "process_image", None)


def _flat_images(images: Any) -> list[Any] | None:
    """The images of one request as a flat list: a single image, a list, or a list holding one list (the
    nested per-prompt form). None for a form that means several prompts."""
    if _is_one_image(images):
        return [images]
    if not isinstance(images, (list, tuple)):
        return None
    if len(images) == 1 and isinstance(images[0], (list, tuple)):
        images = images[0]
    return list(images) if all(not isinstance(image, (list, tuple)) for image in images) else None


def load_image(image_processor: Any, image: Any) -> Any:
    """`image` as the image processor receives it: a path or URL loaded by the processor's own loader (which
    applies EXIF orientation); PIL images, arrays and tensors as they are."""
    if not _is_one_image(image):
        raise VLCacheError(
            f"VLCacheProcessor cannot key an image of type {type(image).__name__}; pass PIL images, arrays or file paths"
        )
    return image_processor.fetch_images(image) if isinstance(image, str) else image


def seen_pixels(image_processor: Any, image: Any, images_kwargs: dict[str, Any]) -> Any:
    """The pixels `image_processor` starts from for `image`: loaded as it loads paths, then converted by its
    own `process_image` (RGB conversion with transparency composited, channels first) with this call's options."""
    image = load_image(image_processor, image)

    def option(name: str) -> Any:
        value = images_kwargs.get(name)
        return value if value is not None else getattr(image_processor, name, None)

    return image_processor.process_image(image, do_convert_rgb=option("do_convert_rgb"), input_data_format=option("input_data_format"))


def image_settings(image_processor: Any, images_kwargs: dict[str, Any], variant: str) -> str:
    """Everything besides the pixels that decides the preprocessed image: the image processor's settings
    as they are now, this call's image kwargs over them, and the family's per-prompt variant."""
    settings = image_processor.to_dict()
    settings.update({name: value for name, value in images_kwargs.items() if value is not None})
    settings.pop("return_tensors", None)
    return json.dumps({"settings": settings, "variant": variant}, sort_keys=True, default=str)


class VLCacheProcessor:
    """Wraps a model's `AutoProcessor`: `VLCacheProcessor(processor, model, store)(text=..., images=...)`.

    Called like the processor it wraps; its outputs are always PyTorch tensors (they carry pre-encoded
    features). `last_hits` tells, after each call, which images were served from the store.
    """

    def __init__(self, processor: Any, model: torch.nn.Module, store: CacheStore):
        self.processor = processor
        self.model = model
        self.store = store
        self.adapter = get_adapter(model)
        self.image_token: str = processor.image_token
        self.last_hits: list[bool] = []
        self.last_seconds = 0.0

    def __getattr__(self, name: str) -> Any:  # decode, apply_chat_template, tokenizer, ...
        return getattr(self.processor, name)

    def _load(self, raw_key: str, model_fingerprint: str) -> tuple[str, EncoderEntry] | None:
        """The item key and encoder entry of the image whose raw key is `raw_key`, found through its alias
        without preprocessing; None when either is missing (an alias whose entry was evicted is a miss) or
        refused (another model, format or key: removed)."""
        alias_key = entry_key(ALIAS_KIND, model_fingerprint, raw_key)
        alias = load_checked(self.store, alias_key, lambda stored, key: AliasEntry.from_stored(stored, model_fingerprint, key=key))
        if alias is None:
            return None
        item_key = alias.target
        dtype = next(self.adapter.vision_tower.parameters()).dtype
        store_key = entry_key(ENCODER_KIND, model_fingerprint, item_key)
        entry = encoder.load_encoder_entry(self.store, store_key, model_fingerprint, self.adapter.hidden_size, dtype)
        if entry is None:
            return None
        return item_key, entry

    def _alias(self, raw_key: str, item_key: str, model_fingerprint: str) -> None:
        """Record that the image with raw key `raw_key` is the item `item_key`, so its next request skips
        preprocessing (the encoder entry itself stays under the item key, shared with the plain path)."""
        alias_key = entry_key(ALIAS_KIND, model_fingerprint, raw_key)
        self.store.put(alias_key, AliasEntry(item_key).to_stored(model_fingerprint, alias_key))

    def _merged_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any] | None:
        """The call's kwargs routed as the wrapped processor routes them, or None if the wrapper cannot honour
        one of them (then the wrapped processor serves the call)."""
        if kwargs.get("return_tensors", "pt") not in ("pt", None):
            return None
        merged = merge_processor_kwargs(self.processor, kwargs)
        routed = set(merged["text_kwargs"]) | set(merged["images_kwargs"]) | _OWN_KWARGS
        return merged if set(kwargs) <= routed else None

    def __call__(
        self, images: Any = None, text: str | list[str] | None = None, videos: Any = None, audio: Any = None, **kwargs: Any
    ) -> BatchFeature:
        """The wrapped processor's outputs for one request (same arguments, same token ids), with stored images
        served as `mm_encoder_outputs` instead of pixels."""
        texts = [text] if isinstance(text, str) else list(text) if text is not None else None
        if texts is not None and len(texts) != 1:
            raise VLCacheError("VLCacheProcessor serves one request at a time; pass one text")
        flat = _flat_images(images) if images is not None else None
        merged = self._merged_kwargs(kwargs)
        keyable = _exposes_conversion(self.processor.image_processor)
        if not flat or texts is None or videos is not None or audio is not None or merged is None or not keyable:
            self.last_hits = [False] * len(flat or [])
            extra = {name: value for name, value in (("videos", videos), ("audio", audio)) if value is not None}
            return self.processor(images=images, text=text, **extra, **kwargs)
        if texts[0].count(self.image_token) != len(flat):
            raise VLCacheError(
                f"the text has {texts[0].count(self.image_token)} {self.image_token} placeholders but {len(flat)} images were given"
            )
        return self._serve(texts[0], flat, merged)

    def _serve(self, text: str, images: list[Any], merged: dict[str, Any]) -> BatchFeature:
        start = time.perf_counter()
        device = self.model.device
        model_fingerprint = fingerprint(self.model)
        image_processor = self.processor.image_processor
        images_kwargs = {name: value for name, value in merged["images_kwargs"].items() if name != "return_tensors"}
        settings = image_settings(image_processor, images_kwargs, self.adapter.image_variant(len(images)))
        images = [load_image(image_processor, image) for image in images]  # a path is read once
        raw_keys = [image_key_from_seen(seen_pixels(image_processor, image, images_kwargs), settings) for image in images]
        found_entries = [self._load(raw_key, model_fingerprint) for raw_key in raw_keys]
        missing = [i for i, found in enumerate(found_entries) if found is None]
        modality = self.adapter.modalities()[0]
        # every item is tagged with its item key (what encode_items keys it by), never with its raw key: its K/V
        # and contexts are then shared with requests made through the plain processor
        keys: list[str | None] = [found[0] if found else None for found in found_entries]
        entries = [found[1] if found else None for found in found_entries]
        hits = [entry is not None for entry in entries]
        embeddings: list[torch.Tensor | None] = [e.embeddings.to(device) if e else None for e in entries]
        deepstack = [tuple(t.to(device) for t in e.deepstack) if e else () for e in entries]
        layouts: list[tuple[int, ...] | None] = [tuple(e.grid_thw) if e else None for e in entries]
        if missing:
            pixels, layout = self.adapter.preprocess_images(
                image_processor, [images[i] for i in missing], len(images), **images_kwargs
            )
            pixels = pixels.to(device, self.model.dtype)
            layout = layout.to(device) if layout is not None else None
            found = encoder.encode_items(self.adapter, modality, self.store, model_fingerprint, pixels, layout)
            for j, i in enumerate(missing):
                embeddings[i], keys[i], hits[i] = found.embeddings[j], found.keys[j], found.hits[j]
                deepstack[i] = found.deepstack[j] if found.deepstack else ()
                self._alias(raw_keys[i], found.keys[j], model_fingerprint)
            for i, item_layout in zip(missing, self.adapter.image_layouts(self.adapter.split_pixels(pixels, layout), layout), strict=True):
                layouts[i] = item_layout
        counts = [int(e.shape[0]) for e in embeddings]  # type: ignore[union-attr]
        data = dict(self._tokenize(self._expand(text, counts), merged))
        data.update(self.adapter.layout_kwargs(layouts, torch.device("cpu")))  # type: ignore[arg-type]
        features = encoder.ImageFeatures(
            embeddings, keys, hits, time.perf_counter() - start, deepstack if any(deepstack) else None  # type: ignore[arg-type]
        )
        output = BaseModelOutputWithPooling(pooler_output=tuple(embeddings))
        if features.deepstack:
            output["deepstack_features"] = [tuple(layers) for layers in zip(*features.deepstack, strict=True)]
        setattr(output, encoder.FEATURES_ATTR, features)
        batch = BatchFeature(data)
        batch["mm_encoder_outputs"] = {"image": output}
        self.last_hits = features.hits
        self.last_seconds = features.seconds
        return batch

    def _tokenize(self, text: str, merged: dict[str, Any]) -> dict[str, Any]:
        """The expanded text tokenized as the wrapped processor tokenizes it (its text kwargs, its
        `mm_token_type_ids` rule), as tensors."""
        text_kwargs = dict(merged["text_kwargs"])
        return_mm_token_type_ids = text_kwargs.pop("return_mm_token_type_ids", merged.get("return_mm_token_type_ids", False))
        text_kwargs["return_tensors"] = "pt"
        inputs = dict(self.processor.tokenizer([text], **text_kwargs))
        if return_mm_token_type_ids:
            ids = inputs["input_ids"].tolist()
            inputs["mm_token_type_ids"] = torch.as_tensor(np.asarray(self.processor.create_mm_token_type_ids(ids)))
        return inputs

    def _expand(self, text: str, counts: list[int]) -> str:
        parts = text.split(self.image_token)
        out = [parts[0]]
        for count, part in zip(counts, parts[1:], strict=True):
            out += [self.image_token * count, part]
        return "".join(out)
