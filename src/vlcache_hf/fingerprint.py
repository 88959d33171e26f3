"""Model fingerprints: stored entries are only ever used by the model (weights, config, dtype) that wrote them.

Every byte of every weight is hashed: a fine-tune, a merged adapter or a `load_state_dict` may change any
value, and a digest of a sample would keep serving the old model's K/V. Hashing is blake3 on all cores
(`eval/bench_fingerprint.py` measures it: seconds for a 7B model, once). The weights digest is then
memoized against each tensor's identity, storage pointer and autograd version counter — which every
in-place op bumps (`load_state_dict`'s `copy_`, optimiser steps, `torch.no_grad()` edits) and which
assigning a new tensor replaces — so re-validating it per `VLCache` costs a walk over the state dict.

Writes through `tensor.data` bypass the version counter (PyTorch's documented escape hatch): after those,
call `fingerprint(model, refresh=True)`.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass

import blake3
import torch
from torch import nn

from .errors import VLCacheError
from .store.entry import FORMAT_VERSION
from .store.keys import model_fingerprint, tensor_parts

_IGNORED_CONFIG_KEYS = {"_name_or_path", "transformers_version", "_attn_implementation_autoset"}


@dataclass
class _Memo:
    signature: tuple
    weights_digest: str


_memo: weakref.WeakKeyDictionary[nn.Module, _Memo] = weakref.WeakKeyDictionary()


def _config_json(model: nn.Module) -> str:
    config = model.config.to_dict()
    for key in _IGNORED_CONFIG_KEYS:
        config.pop(key, None)
    return json.dumps(config, sort_keys=True, default=str)


def weights_signature(model: nn.Module) -> tuple:
    """What changes whenever a weight may have changed: per checkpoint tensor (parameters and persistent
    buffers) its name, identity, storage pointer and version counter. A new shape, dtype or device comes
    with a new tensor, so those need no entry of their own. No tensor data is read."""
    return tuple((name, id(t), t.data_ptr(), t._version) for name, t in model.state_dict(keep_vars=True).items())


def offloaded_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The values of weights accelerate offloaded (`device_map` with "cpu"/"disk" offload): the module then
    holds a meta tensor and its `AlignDevicesHook`'s `weights_map` the value (read from disk on access)."""
    found: dict[str, torch.Tensor] = {}
    for prefix, module in model.named_modules():
        hook = getattr(module, "_hf_hook", None)
        for part in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
            weights = getattr(part, "weights_map", None)
            if getattr(part, "offload", False) and weights is not None:
                recurse = bool(getattr(part, "place_submodules", False))
                tensors = [*module.named_parameters(recurse=recurse), *module.named_buffers(recurse=recurse)]
                for local, tensor in tensors:  # looked up as the hook's own pre_forward does
                    if tensor.is_meta and local in weights:
                        found[f"{prefix}.{local}" if prefix else local] = weights[local]
    return found


def weights_digest(model: nn.Module) -> str:
    """blake3 of every tensor's name, dtype, shape and all of its bytes, each part length-prefixed (as
    `keys.digest` does). One tensor is copied to the CPU at a time; blake3 hashes it on all cores. Offloaded
    weights are read from where accelerate keeps them, so an offloaded model has its loaded twin's fingerprint."""
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    state = model.state_dict()
    offloaded = offloaded_weights(model) if any(t.is_meta for t in state.values()) else {}
    with torch.no_grad():
        for name, tensor in sorted(state.items()):
            if tensor.is_meta:
                if name not in offloaded:
                    raise VLCacheError(
                        f"weight {name!r} is on the meta device and not offloaded by accelerate: its values are "
                        "unknown, so the model cannot be fingerprinted (load the model's weights first)"
                    )
                tensor = offloaded[name]
            for part in (name.encode(), *tensor_parts(tensor)):
                hasher.update(len(part).to_bytes(8, "little"))
                hasher.update(part)
    return hasher.hexdigest()


def fingerprint(model: nn.Module, refresh: bool = False) -> str:
    """The model's fingerprint: its config, dtype and a digest of all its weights.

    The weights are re-hashed only when `weights_signature` says a tensor changed (or `refresh=True`); the
    config is read every call, so editing it is seen too.
    """
    signature = weights_signature(model)
    memo = _memo.get(model)
    if refresh or memo is None or memo.signature != signature:
        memo = _Memo(signature, weights_digest(model))
        _memo[model] = memo
    dtype = str(next(model.parameters()).dtype)
    return model_fingerprint(_config_json(model), memo.weights_digest, dtype, FORMAT_VERSION)
