"""Model fingerprints: stored entries are only ever used by the model (weights, config, dtype) that wrote them."""

from __future__ import annotations

import json
import weakref

import torch
from torch import nn

from .store.entry import FORMAT_VERSION
from .store.keys import digest, model_fingerprint, tensor_parts

_SAMPLES_PER_TENSOR = 1024
_IGNORED_CONFIG_KEYS = {"_name_or_path", "transformers_version", "_attn_implementation_autoset"}
_memo: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


def _config_json(model: nn.Module) -> str:
    config = model.config.to_dict()
    for key in _IGNORED_CONFIG_KEYS:
        config.pop(key, None)
    return json.dumps(config, sort_keys=True, default=str)


def _weights_digest(model: nn.Module) -> str:
    """Digest of every tensor's name, shape, dtype and ~1k evenly spaced values.

    Hashing all weights of a 7B model would take seconds; a strided sample of every tensor changes when
    any checkpoint changes, at a cost of milliseconds.
    """
    parts: list[bytes | str] = []
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // _SAMPLES_PER_TENSOR)
            parts.append(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}")
            parts.extend(tensor_parts(flat[::step][:_SAMPLES_PER_TENSOR]))
    return digest(*parts)


def fingerprint(model: nn.Module, refresh: bool = False) -> str:
    """The model's fingerprint, computed once per model object (pass `refresh=True` after changing weights)."""
    if refresh or model not in _memo:
        dtype = str(next(model.parameters()).dtype)
        _memo[model] = model_fingerprint(_config_json(model), _weights_digest(model), dtype, FORMAT_VERSION)
    return _memo[model]
