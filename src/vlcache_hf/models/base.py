"""`ModelAdapter`: everything vlcache-hf needs to know about one model family.

The rest of the library talks to models only through this interface, so a new family is one new file in
`models/` and nothing else changes. An adapter is stateless; it is created per model by `get_adapter`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..compat import cache_kwarg_name


@dataclass(frozen=True)
class Modality:
    """One kind of visual input: its placeholder token, encoder method and `generate` argument names."""

    name: str  # "image" | "video": the key in `mm_encoder_outputs`
    token_id: int
    encoder_method: str  # e.g. "get_image_features"
    pixels_arg: str  # e.g. "pixel_values"
    layout_arg: str | None  # e.g. "image_grid_thw"
    #: further inputs that decide an item's layout (LLaVA-OneVision's `batch_num_images`: an image is tiled only
    #: when it is alone in its prompt); `ModelAdapter.item_layout` folds them into the per-item layout
    extra_layout_args: tuple[str, ...] = ()

    @property
    def layout_inputs(self) -> tuple[str, ...]:
        """Every input name `ModelAdapter.item_layout` reads for this modality."""
        return ((self.layout_arg,) if self.layout_arg else ()) + self.extra_layout_args


@dataclass(frozen=True)
class KVLayout:
    """Shape of the per-layer KV cache: what a stored KV entry must match."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def as_tuple(self) -> tuple[int, int, int]:
        return (self.num_layers, self.num_kv_heads, self.head_dim)

    def bytes_per_token(self) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize


class ModelAdapter(ABC):
    """Family-specific access to a vision-language model's pieces."""

    #: names shown in errors and the README
    family: str = ""

    def __init__(self, model: nn.Module):
        self.model = model

    # -- recognising a model -------------------------------------------------------------------------------
    #: `config.model_type` values this adapter serves
    MODEL_TYPES: tuple[str, ...] = ()
    #: attribute of `model.model` holding the vision encoder
    VISION_ATTR = "visual"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        """True if this adapter serves `model`: its model type, with a language model and a vision tower inside."""
        inner = getattr(model, "model", None)
        return (
            getattr(getattr(model, "config", None), "model_type", None) in cls.MODEL_TYPES
            and inner is not None
            and hasattr(inner, "language_model")
            and hasattr(inner, cls.VISION_ATTR)
        )

    # -- the language model's pieces -----------------------------------------------------------------------
    @property
    def text_model(self) -> nn.Module:
        """The decoder-only language model (embeddings, layers, rotary module)."""
        return self.model.model.language_model

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.text_model.layers

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_model.embed_tokens(input_ids)

    def rotary_position_ids(self, positions: torch.Tensor) -> torch.Tensor:
        """Our [num_axes, 1, n] positions in the shape the rotary module takes (M-RoPE keeps all axes)."""
        return positions if self.position_axes > 1 else positions[0]

    def rotary_cos_sin(self, like: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for `position_ids` ([num_axes, 1, n]) as the decoder layers consume them."""
        return self.text_model.rotary_emb(like, self.rotary_position_ids(position_ids))

    def rotation_cos_sin(self, like: torch.Tensor, delta_positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pure rotation (attention scaling divided out) by `delta_positions` ([num_axes, n]), for re-rotating keys."""
        rotary = self.text_model.rotary_emb
        cos, sin = rotary(like.float(), self.rotary_position_ids(delta_positions[:, None, :].to(like.device)))
        scale = float(getattr(rotary, "attention_scaling", 1.0))
        return cos / scale, sin / scale

    def rope_frequencies_are_base(self, positions: torch.Tensor) -> bool:
        """Whether the prompt at `positions` ([num_axes, 1, L]) gets the model's base rotary frequencies.

        Dynamic NTK and LongRoPE (the types transformers' `dynamic_rope_update` recomputes) change their
        frequencies once a sequence passes the original length: keys computed then hold for that length only,
        and no re-rotation turns keys stored at base frequencies into them (nor back). So K/V is stored and
        reused only for prompts at base frequencies. The answer comes from the model's own rotary module, called
        on the prompt's positions as the model's prefill calls it (which leaves it in the state that prefill would).
        """
        rotary = self.text_model.rotary_emb
        rope_type = getattr(rotary, "rope_type", "default")
        types = list(rope_type.values()) if isinstance(rope_type, dict) else [rope_type]
        if not any("dynamic" in t or t == "longrope" for t in types):
            return True
        if isinstance(rope_type, dict):  # per-layer-type frequencies: no single base to compare with
            return False
        rotary(torch.zeros(1, dtype=self.model.dtype, device=positions.device), self.rotary_position_ids(positions))
        return torch.equal(rotary.inv_freq, rotary.original_inv_freq.to(rotary.inv_freq.device))

    @property
    def kv_layout(self) -> KVLayout:
        cfg = self.model.config.get_text_config()
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return KVLayout(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim, self.model.dtype)

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def hidden_size(self) -> int:
        return int(self.model.get_input_embeddings().embedding_dim)

    def attention_config(self):
        """The config object the decoder's attention modules read `_attn_implementation` from."""
        return self.decoder_layers[0].self_attn.config

    def attention_window(self, layer_idx: int) -> int | None:
        """The sliding window of decoder layer `layer_idx` as the model's own masks apply it, None for full attention.

        The selective prefill builds its own masks, so it must window exactly the layers the model does: with
        `layer_types` (Qwen2 and Qwen2-VL from `use_sliding_window` / `max_window_layers`, most current configs)
        the layers marked "sliding_attention"; without it (Mistral-style text models) every layer when the text
        config sets `sliding_window`. Key j is then visible to query i iff i - window < j <= i.
        """
        config = self.text_model.config
        window = getattr(config, "sliding_window", None)
        if window is None:
            return None
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None:
            return int(window) if layer_types[layer_idx] == "sliding_attention" else None
        return int(window)

    # -- positions -----------------------------------------------------------------------------------------
    #: number of position axes: 3 for multimodal RoPE (time, height, width), 1 for plain RoPE
    position_axes: int = 1

    @abstractmethod
    def prompt_positions(self, model_kwargs: dict, input_ids: torch.Tensor) -> torch.Tensor:
        """Positions of every prompt token as the model would use them: [num_axes, 1, L]."""

    @abstractmethod
    def last_token_position_ids(self, model_kwargs: dict, positions: torch.Tensor, count: int = 1) -> torch.Tensor:
        """`position_ids` to hand the model's own forward for the final `count` prompt tokens."""

    def after_prefill(self, positions: torch.Tensor, num_tokens: int) -> None:  # noqa: B027 (optional hook)
        """Set any model state that decoding steps read (e.g. Qwen's `rope_deltas`)."""

    # -- images and videos ---------------------------------------------------------------------------------
    #: name of the `get_image_features` argument describing each image's layout (grid, size), if any
    layout_arg: str | None = None

    def modalities(self) -> list[Modality]:
        """The visual inputs this family takes; images only unless an adapter adds more."""
        return [Modality("image", self.image_token_id, "get_image_features", "pixel_values", self.layout_arg)]

    def prefill_only_inputs(self) -> set[str]:
        """Inputs the prefill consumes that the model's last-token forward must not see again (with pixels it
        would encode the images a second time): every modality's pixels and layout inputs, pre-encoded outputs."""
        names = {"mm_encoder_outputs"}
        for modality in self.modalities():
            names |= {modality.pixels_arg, *modality.layout_inputs}
        return names

    def item_layout(self, modality: Modality, inputs: Mapping[str, Any]) -> torch.Tensor | None:
        """The per-item layout tensor of `modality` (one row per item) from the encoder's or `generate`'s inputs.

        Usually the layout argument itself (Qwen's `image_grid_thw`); a family whose layout depends on more
        (LLaVA-OneVision) combines those inputs here, so the split, the keys and the encoder calls all see it.
        """
        return inputs.get(modality.layout_arg) if modality.layout_arg else None

    def image_variant(self, prompt_images: int) -> str:
        """What besides an image's content and the processor settings decides how it is encoded, given how many
        images its prompt has; part of `VLCacheProcessor`'s image key. Nothing for most families."""
        return ""

    def preprocess_images(
        self, image_processor: Any, images: list[Any], prompt_images: int, **images_kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`pixel_values` and per-item layout of `images`, some of a prompt's `prompt_images` images, preprocessed
        as the model's processor would in that prompt (`VLCacheProcessor` preprocesses only the misses), with the
        call's image kwargs."""
        processed = image_processor(images=images, return_tensors="pt", **images_kwargs)
        return processed["pixel_values"], self.item_layout(self.modalities()[0], processed)

    @abstractmethod
    def split_pixels(self, pixel_values: torch.Tensor, layout: torch.Tensor | None) -> list[torch.Tensor]:
        """Per-image slices of a batch's `pixel_values`."""

    @abstractmethod
    def image_layouts(self, pixels: list[torch.Tensor], layout: torch.Tensor | None) -> list[tuple[int, ...]]:
        """Per-image layout (e.g. Qwen's (t, h, w) grid), stored with encoder entries and part of the image key."""

    def layout_kwargs(self, layouts: list[tuple[int, ...]], device: torch.device) -> dict[str, torch.Tensor]:
        """Model inputs that describe the images when their pixels are not passed (rebuilt from layouts)."""
        if self.layout_arg is None:
            return {}
        return {self.layout_arg: torch.tensor(layouts, dtype=torch.long, device=device)}

    def encode(
        self, modality: Modality, original, pixels: list[torch.Tensor], layout: torch.Tensor | None, indices: list[int], **kwargs
    ):
        """Run the original encoder method on items `indices` only; returns its output."""
        if modality.layout_arg is not None and layout is not None:
            kwargs[modality.layout_arg] = layout[indices]
        return original(torch.cat([pixels[i] for i in indices]), return_dict=True, **kwargs)

    @abstractmethod
    def image_feature_owner(self) -> nn.Module:
        """The module whose `get_image_features` `generate` and `forward` call (the encoder entry point)."""

    @property
    @abstractmethod
    def vision_tower(self) -> nn.Module:
        """The vision encoder module (tests count its calls)."""

    def layer_injections(self, spans, features, embeddings: torch.Tensor) -> dict[int, torch.Tensor]:
        """Per decoder layer, a [1, num_tokens, hidden] tensor the model adds to that layer's output
        (e.g. Qwen3-VL's deepstack visual features at image tokens). Most families add nothing."""
        return {}

    # -- calling decoder layers ----------------------------------------------------------------------------
    def cache_kwarg_name(self) -> str:
        """The keyword the decoder layers take the cache under (`compat.cache_kwarg_name`)."""
        return cache_kwarg_name(self.decoder_layers[0])

    def run_decoder_layer(
        self,
        layer_idx: int,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        cache: object,
    ) -> torch.Tensor:
        layer: Callable = self.decoder_layers[layer_idx]
        out = layer(
            hidden,
            attention_mask=attention_mask,
            position_embeddings=cos_sin,
            position_ids=None,
            use_cache=True,
            **{self._cache_kwarg: cache},
        )
        return out[0] if isinstance(out, tuple) else out

    @property
    def _cache_kwarg(self) -> str:
        name = getattr(self, "_cache_kwarg_name", None)
        if name is None:
            name = self._cache_kwarg_name = self.cache_kwarg_name()
        return name
