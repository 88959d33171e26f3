"""What the store holds, and how typed entries become plain tensors + string metadata.

Tiers only ever see `StoredEntry` (a dict of tensors and a dict of strings): exactly what a safetensors
file holds, so no tier needs pickle and every tier stores the same thing. The typed entries below know
their own layout and refuse (`EntryMismatchError`) anything written by another model, dtype or format, and
any entry read under a store key other than the one it was written under (its header names its key, so a
file copied or renamed onto another image's key is refused, not served).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from ..errors import EntryMismatchError

logger = logging.getLogger(__name__)
T = TypeVar("T")

#: 2: prefix chunks hold their text rows only (image rows live in the images' exact entries, see reuse.py)
FORMAT_VERSION = "2"


@dataclass
class StoredEntry:
    """The unit a tier stores: named tensors plus string metadata (the safetensors header)."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> StoredEntry:
        """A copy on `device`; host-to-GPU copies go through pinned memory so they run asynchronously."""
        device = torch.device(device)
        if device.type == "cuda":
            return StoredEntry({k: to_device(v, device) for k, v in self.tensors.items()}, dict(self.metadata))
        return StoredEntry(
            {k: v.to(device, non_blocking=non_blocking) for k, v in self.tensors.items()}, dict(self.metadata)
        )


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move to `device`; CPU → CUDA through pinned memory with a non-blocking copy (DMA at full bandwidth)."""
    if tensor.device == device:
        return tensor
    if tensor.device.type == "cpu" and device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _header(kind: str, fingerprint: str, key: str) -> dict[str, str]:
    return {"kind": kind, "format_version": FORMAT_VERSION, "fingerprint": fingerprint, "key": key}


def _check_header(stored: StoredEntry, kind: str, fingerprint: str, names: tuple[str, ...], key: str | None) -> None:
    """Refuse an entry of another kind, format or model, one lacking tensors, or (when `key` is given) one
    written under another store key."""
    meta = stored.metadata
    if meta.get("kind") != kind:
        raise EntryMismatchError(f"entry kind {meta.get('kind')!r}, expected {kind!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise EntryMismatchError(f"format version {meta.get('format_version')!r}, expected {FORMAT_VERSION!r}")
    if meta.get("fingerprint") != fingerprint:
        raise EntryMismatchError("entry was written by another model (fingerprint differs)")
    if key is not None and meta.get("key") != key:
        raise EntryMismatchError(f"entry was written under another key ({str(meta.get('key'))[:20]}…), not this one")
    missing = [n for n in names if n not in stored.tensors]
    if missing:
        raise EntryMismatchError(f"entry lacks tensors {missing}")


@dataclass
class EncoderEntry:
    """Vision-encoder output of one image: the LLM input embeddings of its placeholder tokens.

    `grid_thw` is kept so a processor can skip pixel preprocessing on a hit and still give the model the
    image's token layout.
    """

    embeddings: torch.Tensor  # [num_tokens, hidden]
    grid_thw: tuple[int, ...]
    deepstack: tuple[torch.Tensor, ...] = ()  # Qwen3-VL: per injection layer, [num_tokens, hidden]

    KIND = "encoder"

    def to_stored(self, fingerprint: str, key: str) -> StoredEntry:
        """The stored form, bound to the store `key` it is written under."""
        meta = _header(self.KIND, fingerprint, key)
        meta["grid_thw"] = ",".join(str(int(x)) for x in self.grid_thw)
        meta["deepstack_layers"] = str(len(self.deepstack))
        tensors = {"embeddings": self.embeddings.contiguous()}
        tensors.update({f"deepstack.{i}": t.contiguous() for i, t in enumerate(self.deepstack)})
        return StoredEntry(tensors, meta)

    @classmethod
    def from_stored(
        cls, stored: StoredEntry, fingerprint: str, hidden_size: int, dtype: torch.dtype, key: str | None = None
    ) -> EncoderEntry:
        """The entry, checked against the model and (readers always pass it) the store `key` it was read under."""
        _check_header(stored, cls.KIND, fingerprint, ("embeddings",), key)
        emb = stored.tensors["embeddings"]
        if emb.ndim != 2 or emb.shape[1] != hidden_size or emb.dtype != dtype:
            raise EntryMismatchError(f"encoder entry shape {tuple(emb.shape)} / {emb.dtype} does not fit the model")
        grid = tuple(int(x) for x in stored.metadata.get("grid_thw", "").split(",") if x)
        if not grid:
            raise EntryMismatchError("encoder entry has no valid grid_thw")
        layers = int(stored.metadata.get("deepstack_layers", "0"))
        deepstack = tuple(stored.tensors.get(f"deepstack.{i}") for i in range(layers))
        if any(t is None or t.shape != emb.shape for t in deepstack):
            raise EntryMismatchError("encoder entry's deepstack features are missing or misshapen")
        return cls(emb, grid, deepstack)  # type: ignore[arg-type]


@dataclass
class KVEntry:
    """Per-layer keys and values of a run of tokens, as the model computed them.

    `kv` is [num_layers, 2, num_kv_heads, num_tokens, head_dim] (keys post-RoPE); `positions` is
    [num_position_axes, num_tokens], the positions the keys were rotated for, so a later request can
    re-rotate them to wherever the tokens now sit. `context` is the context hash (`keys.context_hashes`) of
    everything the K/V was computed from when it was computed exactly, "" when it was computed on top of
    approximately reused K/V: only an entry whose context equals the request's is an exact reuse.
    """

    kv: torch.Tensor
    positions: torch.Tensor
    context: str = ""

    KIND = "kv"

    @property
    def num_tokens(self) -> int:
        return int(self.kv.shape[3])

    def to_stored(self, fingerprint: str, key: str) -> StoredEntry:
        """The stored form, bound to the store `key` it is written under."""
        meta = _header(self.KIND, fingerprint, key)
        meta["context"] = self.context
        return StoredEntry({"kv": self.kv.contiguous(), "positions": self.positions.contiguous()}, meta)

    @classmethod
    def from_stored(
        cls,
        stored: StoredEntry,
        fingerprint: str,
        layout: tuple[int, int, int],
        dtype: torch.dtype,
        num_tokens: int | None = None,
        key: str | None = None,
    ) -> KVEntry:
        """`layout` is (num_layers, num_kv_heads, head_dim) of the model that will use the entry; `key` the store
        key it was read under (readers always pass it)."""
        _check_header(stored, cls.KIND, fingerprint, ("kv", "positions"), key)
        kv, positions = stored.tensors["kv"], stored.tensors["positions"]
        layers, heads, head_dim = layout
        ok = (
            kv.ndim == 5
            and (kv.shape[0], kv.shape[1], kv.shape[2], kv.shape[4]) == (layers, 2, heads, head_dim)
            and kv.dtype == dtype
            and positions.ndim == 2
            and positions.shape[1] == kv.shape[3]
            and (num_tokens is None or kv.shape[3] == num_tokens)
        )
        if not ok:
            raise EntryMismatchError(
                f"KV entry {tuple(kv.shape)} {kv.dtype} / positions {tuple(positions.shape)} does not fit "
                f"layout {layout} {dtype} with {num_tokens} tokens"
            )
        return cls(kv, positions, stored.metadata.get("context", ""))


@dataclass
class AliasEntry:
    """Where `VLCacheProcessor` finds an image's encoder entry without preprocessing it: its raw key (the pixels
    the image processor starts from + settings) → the image's item key (`encoder.item_keys`, from the
    preprocessed pixels), the one key its encoder entry, K/V and contexts are stored under whichever path a
    request takes. Only an index: when the target entry is gone, the alias leads to a miss."""

    target: str  # the item key (not a store key) of the image's encoder entry

    KIND = "alias"

    def to_stored(self, fingerprint: str, key: str) -> StoredEntry:
        """The stored form, bound to the store `key` it is written under; the target is kept as bytes too (a
        tensor: every tier stores tensors, and a memory budget counts them)."""
        meta = _header(self.KIND, fingerprint, key)
        meta["target"] = self.target
        return StoredEntry({"target": torch.frombuffer(bytearray(self.target.encode()), dtype=torch.uint8)}, meta)

    @classmethod
    def from_stored(cls, stored: StoredEntry, fingerprint: str, key: str | None = None) -> AliasEntry:
        """The alias, checked against the model and the store `key` it was read under."""
        _check_header(stored, cls.KIND, fingerprint, ("target",), key)
        target = stored.metadata.get("target", "")
        data = stored.tensors["target"]
        if not target or data.dtype != torch.uint8 or bytes(data.cpu().tolist()) != target.encode():
            raise EntryMismatchError("alias entry's target is missing or does not match its bytes")
        return cls(target)


def load_checked(store: Any, key: str, parse: Callable[[StoredEntry, str], T]) -> T | None:
    """The entry under `key`, parsed and validated by `parse(stored, key)`; None on a miss. An entry that
    `parse` refuses (another model, format, shape or key: `EntryMismatchError`) is logged, removed from the
    store and treated as a miss, so no reader ever uses it."""
    stored = store.get(key)
    if stored is None:
        return None
    try:
        return parse(stored, key)
    except EntryMismatchError as err:
        logger.warning("dropping store entry %s…: %s", key[:20], err)
        store.discard(key)
        return None
