"""The entry format every persistent tier stores: one place for keys, bytes, checksum and header.

A `StoredEntry` is written as a safetensors blob (never pickle: reading one cannot run code) whose header
carries the entry's string metadata. A blake3 checksum of the tensor bytes guards every read: a flipped
byte, a truncated or garbage blob decodes to `(None, why)`, a miss, never to K/V. The checksum travels in the
header (`__checksum__`, as `DiskTier` writes it) or beside the blob (`RedisTier` keeps it in its manifest).

Store keys are `<kind>-<64 hex>` (as `keys.entry_key` makes them), safe as file names and Redis keys;
`check_key` is the one check every tier and `CacheStore` apply.
"""

from __future__ import annotations

import json
import re

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from .entry import StoredEntry
from .keys import digest, tensor_parts

KEY_PATTERN = re.compile(r"^[a-z]+-[0-9a-f]{64}$")
CHECKSUM_FIELD = "__checksum__"  # header field of the tensors' checksum (a blob that carries its own)


def check_key(key: str) -> str:
    """`key` if it is a store key (`<kind>-<64 hex>`); ValueError otherwise (never a path or Redis pattern)."""
    if not isinstance(key, str) or not KEY_PATTERN.fullmatch(key):  # fullmatch: no trailing newline
        raise ValueError(f"invalid store key {key!r}")
    return key


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    """blake3 of the tensors' names, dtypes, shapes and bytes, in name order."""
    parts: list = []
    for name in sorted(tensors):
        parts += [name, *tensor_parts(tensors[name])]
    return digest(*parts)


def host_tensors(entry: StoredEntry) -> dict[str, torch.Tensor]:
    """The entry's tensors as contiguous CPU tensors, as they are encoded."""
    return {k: v.detach().to("cpu").contiguous() for k, v in entry.tensors.items()}


def encode(entry: StoredEntry, embed_checksum: bool = True) -> tuple[bytes, str]:
    """(safetensors bytes, checksum) of `entry`; with `embed_checksum` the header carries the checksum too,
    so the blob verifies itself (disk); without it the caller keeps the checksum elsewhere (Redis' manifest)."""
    tensors = host_tensors(entry)
    digest_ = checksum(tensors)
    metadata = {**entry.metadata, CHECKSUM_FIELD: digest_} if embed_checksum else dict(entry.metadata)
    return save_bytes(tensors, metadata), digest_


def header_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors blob, read from the same bytes as its tensors (one read, no race)."""
    size = int.from_bytes(data[:8], "little")
    return dict(json.loads(data[8 : 8 + size]).get("__metadata__") or {})


def decode(data: bytes, expected: str | None = None) -> tuple[StoredEntry | None, str]:
    """The entry in a checksummed safetensors blob, or (None, why) if the bytes are not one.

    The checksum is the header's own, or `expected` when it is kept elsewhere (Redis keeps it in a manifest).
    """
    try:
        tensors, metadata = load_bytes(data), header_metadata(data)
    except Exception as err:  # truncated, garbage, not safetensors: whatever the parser says
        return None, f"unreadable ({err})"
    own = metadata.pop(CHECKSUM_FIELD, None)
    expected = expected if expected is not None else own
    if expected is None or checksum(tensors) != expected:
        return None, "checksum mismatch"
    return StoredEntry(tensors, metadata), ""
