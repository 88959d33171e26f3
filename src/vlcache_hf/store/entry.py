"""What the store holds, and how typed entries become plain tensors + string metadata.

Tiers only ever see `StoredEntry` (a dict of tensors and a dict of strings): exactly what a safetensors
file holds, so no tier needs pickle and every tier stores the same thing. The typed entries below know
their own layout and refuse (`EntryMismatchError`) anything written by another model, dtype or format.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import EntryMismatchError

FORMAT_VERSION = "1"


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


def _header(kind: str, fingerprint: str) -> dict[str, str]:
    return {"kind": kind, "format_version": FORMAT_VERSION, "fingerprint": fingerprint}


def _check_header(stored: StoredEntry, kind: str, fingerprint: str, names: tuple[str, ...]) -> None:
    meta = stored.metadata
    if meta.get("kind") != kind:
        raise EntryMismatchError(f"entry kind {meta.get('kind')!r}, expected {kind!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise EntryMismatchError(f"format version {meta.get('format_version')!r}, expected {FORMAT_VERSION!r}")
    if meta.get("fingerprint") != fingerprint:
        raise EntryMismatchError("entry was written by another model (fingerprint differs)")
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

    def to_stored(self, fingerprint: str) -> StoredEntry:
        meta = _header(self.KIND, fingerprint)
        meta["grid_thw"] = ",".join(str(int(x)) for x in self.grid_thw)
        meta["deepstack_layers"] = str(len(self.deepstack))
        tensors = {"embeddings": self.embeddings.contiguous()}
        tensors.update({f"deepstack.{i}": t.contiguous() for i, t in enumerate(self.deepstack)})
        return StoredEntry(tensors, meta)

    @classmethod
    def from_stored(cls, stored: StoredEntry, fingerprint: str, hidden_size: int, dtype: torch.dtype) -> EncoderEntry:
        _check_header(stored, cls.KIND, fingerprint, ("embeddings",))
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
    re-rotate them to wherever the tokens now sit.
    """

    kv: torch.Tensor
    positions: torch.Tensor

    KIND = "kv"

    @property
    def num_tokens(self) -> int:
        return int(self.kv.shape[3])

    def to_stored(self, fingerprint: str) -> StoredEntry:
        return StoredEntry(
            {"kv": self.kv.contiguous(), "positions": self.positions.contiguous()}, _header(self.KIND, fingerprint)
        )

    @classmethod
    def from_stored(
        cls,
        stored: StoredEntry,
        fingerprint: str,
        layout: tuple[int, int, int],
        dtype: torch.dtype,
        num_tokens: int | None = None,
    ) -> KVEntry:
        """`layout` is (num_layers, num_kv_heads, head_dim) of the model that will use the entry."""
        _check_header(stored, cls.KIND, fingerprint, ("kv", "positions"))
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
        return cls(kv, positions)
