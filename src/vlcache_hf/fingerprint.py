"""Model fingerprints: stored entries are only ever used by the model (weights, config, dtype) that wrote them.

Every byte of every weight is hashed: a fine-tune, a merged adapter or a `load_state_dict` may change any
value, and a digest of a sample would keep serving the old model's K/V. Hashing is blake3 on all cores
(`eval/bench_fingerprint.py` measures it: seconds for a 7B model, once). The weights digest is then
memoized against each tensor's identity, storage pointer and autograd version counter — which every
in-place op bumps (`load_state_dict`'s `copy_`, optimiser steps, `torch.no_grad()` edits) and which
assigning a new tensor replaces — so re-validating it per `VLCache` costs a walk over the state dict.

Writes through `tensor.data` bypass the version counter (PyTorch's documented escape hatch): after those,
call `fingerprint(model, refresh=True)`.

Engines other than transformers (vLLM) hold the weights in their own layout (fused projections, renamed
modules), so they cannot hash them as this process does. For them a model is named by its *checkpoint*:
`checkpoint_fingerprint(path, dtype)` hashes the checkpoint's config.json and every tensor of its safetensors
files as that engine loads them (cast to its dtype). `bind_checkpoint(model, path)` lets a transformers model
carry that same fingerprint — after checking, tensor by tensor, that its weights and config are exactly the
checkpoint's — so both engines read and write one set of entries. The binding holds while the weights'
signature is unchanged: an edit of any weight (or the config) falls back to the model's own fingerprint.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass
from pathlib import Path

import blake3
import torch
from torch import nn

from . import compat
from .errors import VLCacheError
from .store.entry import FORMAT_VERSION
from .store.keys import model_fingerprint, tensor_parts, update_parts

_IGNORED_CONFIG_KEYS = {"_name_or_path", "transformers_version", "_attn_implementation_autoset"}


@dataclass
class _Memo:
    signature: tuple
    weights_digest: str
    checkpoint: tuple[str, str] | None = None  # (config json, fingerprint) of the checkpoint it was bound to


_memo: weakref.WeakKeyDictionary[nn.Module, _Memo] = weakref.WeakKeyDictionary()


def _canonical_config(config: dict) -> str:
    config = {key: value for key, value in config.items() if key not in _IGNORED_CONFIG_KEYS}
    return json.dumps(config, sort_keys=True, default=str)


def _config_json(model: nn.Module) -> str:
    return _canonical_config(model.config.to_dict())


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
            update_parts(hasher, (name.encode(), *tensor_parts(tensor)))
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
    config = _config_json(model)
    if memo.checkpoint is not None and memo.checkpoint[0] == config:
        return memo.checkpoint[1]
    return model_fingerprint(config, memo.weights_digest, _model_dtype(model), FORMAT_VERSION)


def _model_dtype(model: nn.Module) -> str:
    return str(next(model.parameters()).dtype)


# ------------------------------------------------------------------------------------------------------------
# checkpoint fingerprints: one name for a checkpoint in every engine


def checkpoint_dir(path: str | Path, revision: str | None = None) -> Path:
    """The local directory of a checkpoint: `path` itself, or a Hub id's snapshot already in the local
    Hugging Face cache (never downloaded here: an engine that serves it has fetched it)."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(path), revision=revision, local_files_only=True))
    except Exception as err:  # noqa: BLE001 - any failure means: not a checkpoint we can read
        raise VLCacheError(f"checkpoint {str(path)!r} is neither a directory nor a model in the local Hugging Face cache") from err


def _checkpoint_files(directory: Path) -> list[Path]:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise VLCacheError(f"checkpoint {str(directory)!r} has no .safetensors files")
    return files


def _checkpoint_tensors(directory: Path):
    """(name, tensor) of every tensor of the checkpoint's safetensors files, one at a time, in name order."""
    from safetensors import safe_open

    handles = [safe_open(str(f), framework="pt") for f in _checkpoint_files(directory)]
    where = {name: handle for handle in handles for name in handle.keys()}
    for name in sorted(where):
        yield name, where[name].get_tensor(name)


def _as_loaded(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A checkpoint tensor as an engine loading it in `dtype` holds it: floating tensors cast, others kept."""
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def checkpoint_fingerprint(path: str | Path, dtype: torch.dtype | str, revision: str | None = None) -> str:
    """The fingerprint of a checkpoint loaded in `dtype`, computed from its files alone: config.json (the
    keys that name no file or version dropped) and every safetensors tensor's name, dtype, shape and bytes
    after the cast. Any engine (vLLM, transformers) that serves these files in `dtype` computes this name."""
    return _checkpoint_fingerprint(checkpoint_dir(path, revision), _parse_dtype(dtype))


def _checkpoint_fingerprint(directory: Path, dtype: torch.dtype, check: _CheckpointMatch | None = None) -> str:
    """`checkpoint_fingerprint` of a local directory; `check`, when given, sees every tensor of the same
    single read of the files (so binding a model reads its checkpoint once)."""
    try:
        config = _canonical_config(json.loads((directory / "config.json").read_text()))
    except (OSError, ValueError) as err:
        raise VLCacheError(f"checkpoint {str(directory)!r} has no readable config.json") from err
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    with torch.no_grad():
        for name, tensor in _checkpoint_tensors(directory):
            if check is not None:
                check.compare(name, tensor)
            update_parts(hasher, (name.encode(), *tensor_parts(_as_loaded(tensor, dtype))))
    return model_fingerprint(config, "checkpoint:" + hasher.hexdigest(), str(dtype), FORMAT_VERSION)


def _parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise VLCacheError(f"unknown dtype {dtype!r}")
    return value


class _CheckpointMatch:
    """Checks, tensor by tensor as the checkpoint is read, that every weight of a model is exactly the
    checkpoint's tensor of the same (saved) name, cast to the weight's dtype."""

    def __init__(self, model: nn.Module):
        self.state = compat.checkpoint_state_dict(model)
        self.offloaded = offloaded_weights(model) if any(t.is_meta for t in self.state.values()) else {}
        self.verified: set[int] = set()

    def compare(self, name: str, stored: torch.Tensor) -> None:
        held = self.state.pop(name, None)
        if held is None:
            return  # a tensor the model does not load (transformers drops it on load too)
        held = self.offloaded.get(name, held) if held.is_meta else held
        if held.is_meta or not torch.equal(held.detach().cpu(), _as_loaded(stored, held.dtype)):
            raise VLCacheError(f"weight {name!r} differs from the checkpoint's")
        self.verified.add(held.data_ptr())

    def finish(self) -> None:
        """What is left must be a tied copy of a verified weight (e.g. an lm_head tied to the embeddings)."""
        untied = [name for name, t in self.state.items() if t.is_meta or t.data_ptr() not in self.verified]
        if untied:
            raise VLCacheError(f"weights not in the checkpoint: {untied[:3]}{'…' if len(untied) > 3 else ''}")


def bind_checkpoint(model: nn.Module, path: str | Path | None = None, revision: str | None = None) -> str:
    """Give `model` the fingerprint of the checkpoint it was loaded from, so entries it writes are used by
    other engines serving the same files (vLLM through `VLCacheECConnector`) and theirs by it.

    `path` defaults to the model's `name_or_path`. Every weight and the config are compared with the
    checkpoint first (one read of its files); a model that differs in any byte raises `VLCacheError` and keeps
    its own fingerprint. The binding lasts while the weights are unchanged: after an edit, `fingerprint`
    returns the model's own (unshared) fingerprint again. Returns the checkpoint fingerprint.
    """
    from transformers import AutoConfig

    directory = checkpoint_dir(path if path is not None else model.name_or_path, revision)
    if _canonical_config(AutoConfig.from_pretrained(str(directory)).to_dict()) != _config_json(model):
        raise VLCacheError("the model's config differs from the checkpoint's config.json")
    match = _CheckpointMatch(model)
    shared = _checkpoint_fingerprint(directory, _parse_dtype(_model_dtype(model)), check=match)
    match.finish()
    fingerprint(model)  # the memo for the current weights
    _memo[model].checkpoint = (_config_json(model), shared)
    return shared
