"""Qwen3-VL: interleaved M-RoPE and deepstack visual features.

Quirks handled here:
- the vision tower also returns *deepstack* features, which the language model adds to the image tokens'
  hidden states after its first few decoder layers; they are cached with the encoder output and re-added
  for every image token the selective prefill recomputes (`layer_injections`);
- M-RoPE sections are interleaved rather than contiguous; re-rotation goes through the model's own rotary
  module, so nothing else changes;
- its text model builds a plain causal mask on every layer (no sliding window, whatever the config says).
"""

from __future__ import annotations

import torch

from .qwen_vl import QwenVLAdapter


class Qwen3VLAdapter(QwenVLAdapter):
    """Adapter for `Qwen3VLForConditionalGeneration`."""

    family = "Qwen3-VL"
    MODEL_TYPES = ("qwen3_vl",)

    def attention_window(self, layer_idx: int) -> int | None:
        return None  # transformers' Qwen3-VL text model never windows its attention mask (checked in 5.24)

    def layer_injections(self, spans, features, embeddings: torch.Tensor) -> dict[int, torch.Tensor]:
        if not features.deepstack or not spans:
            return {}
        num_tokens = embeddings.shape[1]
        depth = len(features.deepstack[spans[0].index])
        injections: dict[int, torch.Tensor] = {}
        for layer in range(depth):
            added = torch.zeros_like(embeddings)
            for span in spans:
                end = min(span.end, num_tokens)
                if span.start < end:
                    rows = features.deepstack[span.index][layer]
                    added[0, span.start : end] = rows[span.offset : span.offset + end - span.start]
            injections[layer] = added
        return injections
