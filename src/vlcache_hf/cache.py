"""`VLCache`: a `transformers.Cache` for one request that fills itself from a shared `CacheStore`.

Hand it to `model.generate(..., past_key_values=VLCache(model, store))`. On the prefill call a forward
pre-hook (see `hook.py`) plans the request, loads what the store holds, recomputes what the policy selects,
and leaves the final prompt token to the model's own forward; from then on the cache behaves like a
`DynamicCache`.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from . import encoder, hook
from .cache_lookup import register_cache_type
from .errors import VLCacheError
from .fingerprint import fingerprint
from .metrics import PrefillReport
from .models import get_adapter
from .selection import LayerObservation, LayerProfile, SelectionPolicy, make_policy
from .store.store import CacheStore

DEFAULT_PREFIX_CHUNK = 64
_default_store: CacheStore | None = None


def default_store() -> CacheStore:
    """The process-wide store used when `VLCache` is given none, so plain `VLCache(model)` still shares."""
    global _default_store
    if _default_store is None:
        _default_store = CacheStore()
    return _default_store


class VLCacheLayer(DynamicLayer):
    """A `DynamicLayer` that takes scatter writes into preloaded full-length buffers, then appends in place.

    During the selective prefill, `begin_write(indices)` makes the next `update` write the given rows of the
    buffers and return the whole buffers (so the recomputed queries attend to every prompt token). Outside
    that window it appends like a `DynamicLayer`, but into spare capacity of its storage instead of
    concatenating the whole cache at every step (capacity doubles when full), so the final prompt token and
    each decoding step cost O(new tokens) in copies rather than O(cache length).
    """

    def __init__(self) -> None:
        super().__init__()
        self._storage: tuple[torch.Tensor, torch.Tensor] | None = None
        self._write_index: torch.Tensor | None = None
        self._capture = False
        self._previous: tuple[torch.Tensor, torch.Tensor] | None = None
        self._written: tuple[torch.Tensor, torch.Tensor] | None = None

    def load(self, keys: torch.Tensor, values: torch.Tensor, length: int | None = None) -> None:
        """Adopt storage [batch, heads, capacity, head_dim]; the first `length` rows are the cache."""
        length = keys.shape[-2] if length is None else length
        self._storage = (keys, values)
        self.keys, self.values = keys[..., :length, :], values[..., :length, :]
        self.device = keys.device
        self.is_initialized = True

    def begin_write(self, indices: torch.Tensor, capture_previous: bool = False) -> None:
        self._write_index, self._capture = indices, capture_previous

    def end_write(self, layer_idx: int) -> LayerObservation | None:
        observation = None
        if self._capture and self._previous is not None and self._written is not None:
            observation = LayerObservation(layer_idx, self._write_index, *self._written, *self._previous)
        self._write_index, self._capture, self._previous, self._written = None, False, None, None
        return observation

    def _owns_views(self) -> bool:
        """True while keys/values are still prefixes of our storage (crop keeps that; reorders do not)."""
        if self._storage is None or self.keys is None:
            return False
        storage_k, storage_v = self._storage
        return self.keys.data_ptr() == storage_k.data_ptr() and self.values.data_ptr() == storage_v.data_ptr()

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        length, new = self.keys.shape[-2], key_states.shape[-2]
        if not self._owns_views() or length + new > self._storage[0].shape[-2]:
            capacity = max(2 * (length + new), 64)
            grown = []
            for current in (self.keys, self.values):
                buffer = current.new_empty((*current.shape[:-2], capacity, current.shape[-1]))
                buffer[..., :length, :] = current
                grown.append(buffer)
            self._storage = (grown[0], grown[1])
        storage_k, storage_v = self._storage
        storage_k[..., length : length + new, :] = key_states
        storage_v[..., length : length + new, :] = value_states
        self.keys, self.values = storage_k[..., : length + new, :], storage_v[..., : length + new, :]
        return self.keys, self.values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        index = self._write_index
        if index is None:
            if not self.is_initialized or self.keys is None or self.keys.numel() == 0:
                return super().update(key_states, value_states, *args, **kwargs)
            return self._append(key_states, value_states)
        if self._capture:
            self._previous = (self.keys.index_select(2, index), self.values.index_select(2, index))
            self._written = (key_states, value_states)
        self.keys.index_copy_(2, index, key_states.to(self.keys.dtype))
        self.values.index_copy_(2, index, value_states.to(self.values.dtype))
        return self.keys, self.values

    def crop(self, *args, **kwargs) -> None:
        """Crop like a `DynamicLayer`, and give up the spare capacity: the next append copies into new storage
        instead of writing over rows that tensors handed out before the crop still view."""
        super().crop(*args, **kwargs)
        self._storage = None

    def reset(self) -> None:
        self._storage = None
        super().reset()


@dataclass(frozen=True)
class RequestSettings:
    """What one request asks of the engine, fixed when its `VLCache` is made. The engine reads these and the
    cache's runtime parts (model adapter, store, fingerprint, layers, report) — nothing else."""

    policy: SelectionPolicy  # owns `recompute_ratio`
    prefix_chunk_size: int
    publish: bool
    profile: LayerProfile | None


class VLCache(Cache):
    """One request's KV cache, filled from (and published to) a shared `CacheStore`.

    Args:
        model: a supported vision-language model (see `vlcache_hf.models.supported_families()`).
        store: where encoder outputs and K/V live across requests; defaults to one process-wide in-memory store.
        policy: `"none"` (reuse stored K/V, recompute only what is missing), `"full"` (recompute every token,
            reuse only encoder outputs), or any registered `SelectionPolicy` name or instance.
        recompute_ratio: share of reused non-prefix tokens to recompute, in [0, 1], for a policy given by name
            (default 0). A policy instance carries its own; giving a different one here too is an error.
        prefix_chunk_size: granularity, in tokens, of exact prefix reuse.
        publish: write this request's new encoder outputs and K/V to the store.
        profile: a `LayerProfile` (or the path of its JSON) from `vlcache_hf.calibrate` for this model; it sets
            the per-layer budgets of layer-aware policies ("vlcache"). Without one they use their documented
            default allocation; `cache.report.allocation` says which was used.

    A `VLCache` affects only the `generate` (or forward) call it is handed: creating one changes nothing else.
    `copy.deepcopy(cache)` copies its K/V and shares the model and the store (as `DynamicCache` copies do).
    """

    # shared, not copied, by `copy.deepcopy`: the model and what belongs to it, the store, the settings
    _SHARED = frozenset({"model", "adapter", "store", "settings", "fingerprint"})

    def __init__(
        self,
        model: nn.Module,
        store: CacheStore | None = None,
        policy: str | SelectionPolicy = "none",
        recompute_ratio: float | None = None,
        prefix_chunk_size: int = DEFAULT_PREFIX_CHUNK,
        publish: bool = True,
        profile: LayerProfile | str | None = None,
    ):
        self.adapter = get_adapter(model)
        self.fingerprint = fingerprint(model)
        if profile is not None and not isinstance(profile, LayerProfile):
            if not isinstance(profile, (str, bytes)) and not hasattr(profile, "__fspath__"):
                raise VLCacheError(f"profile must be a LayerProfile or a path to its JSON, got {type(profile).__name__}")
            profile = LayerProfile.load(profile)
        if profile is not None:
            profile.check_model(self.fingerprint, self.adapter.kv_layout.num_layers)
        if not isinstance(prefix_chunk_size, int) or isinstance(prefix_chunk_size, bool) or prefix_chunk_size < 1:
            raise ValueError(f"prefix_chunk_size must be a positive int, got {prefix_chunk_size!r}")
        self.settings = RequestSettings(make_policy(policy, recompute_ratio, profile=profile), prefix_chunk_size, bool(publish), profile)
        self.model = model
        self.store = _checked_store(store)
        self.report: PrefillReport | None = None
        self.is_prefilled = False
        self.pending_entries: list[tuple[str, Any]] = []  # encoder entries published once the forward succeeds
        self.pending_kv: Callable[[], None] | None = None  # publishes the request's K/V once the forward succeeds
        self.forward_attention: Callable[[], Any] | None = None  # switches the attention back after the prefill forward
        super().__init__(layers=[VLCacheLayer() for _ in range(self.adapter.kv_layout.num_layers)])
        hook.install(model)
        encoder.install(self.adapter)

    # read-only views of the settings (one home each)
    @property
    def policy(self) -> SelectionPolicy:
        return self.settings.policy

    @property
    def recompute_ratio(self) -> float:
        return self.settings.policy.recompute_ratio

    @property
    def prefix_chunk_size(self) -> int:
        return self.settings.prefix_chunk_size

    @property
    def publish(self) -> bool:
        return self.settings.publish

    @property
    def profile(self) -> LayerProfile | None:
        return self.settings.profile

    def mark_prefilled(self) -> None:
        self.is_prefilled = True

    def abandon_prefill(self) -> None:
        """Forget a prefill that raised: empty layers, no report, nothing pending (a retry starts afresh)."""
        self.layers = [VLCacheLayer() for _ in self.layers]
        self.report, self.is_prefilled, self.pending_kv = None, False, None
        self.pending_entries.clear()

    def __deepcopy__(self, memo: dict) -> VLCache:
        clone = object.__new__(type(self))
        memo[id(self)] = clone
        for name, value in self.__dict__.items():
            clone.__dict__[name] = value if name in self._SHARED else copy.deepcopy(value, memo)
        clone.pending_kv, clone.pending_entries = None, []  # a copy publishes nothing of the original's request
        clone.forward_attention = None  # nor switches back what the original's forward switched
        return clone

    def __repr__(self) -> str:
        return (
            f"VLCache(policy={self.policy.name!r}, recompute_ratio={self.recompute_ratio}, "
            f"tokens={self.get_seq_length()}, store={self.store!r})"
        )


register_cache_type(VLCache)  # the hook and the encoder wrapper find it in a call's arguments


def _checked_store(store: Any) -> CacheStore:
    """The store a request uses. A path is refused rather than opened: a store is meant to be created once and
    shared by every request (its memory tier and byte budgets live in that one object)."""
    if store is None:
        return default_store()
    if isinstance(store, CacheStore):
        return store
    if isinstance(store, (str, bytes, os.PathLike)):
        path = os.fsdecode(store)
        raise VLCacheError(
            f"store={path!r} is a path; create the store once and share it: "
            f"store = CacheStore(disk={path!r}), then VLCache(model, store=store)"
        )
    raise VLCacheError(f"store must be a CacheStore (or None for the process-wide one), got {type(store).__name__}")
