"""Reading and writing K/V entries: exact prefix chunks and per-image spans.

Every read validates the entry against this model (fingerprint, format, layout, dtype, length); an entry
that does not fit is dropped from the store and treated as a miss, so a request never uses foreign K/V.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import torch

from .errors import EntryMismatchError
from .models import KVLayout
from .plan import ImageSpan
from .store.entry import KVEntry, StoredEntry
from .store.keys import KV_KIND, PREFIX_KIND, entry_key

logger = logging.getLogger(__name__)
T = TypeVar("T")


def _load(store, key: str, parse: Callable[[StoredEntry], T]) -> T | None:
    stored = store.get(key)
    if stored is None:
        return None
    try:
        return parse(stored)
    except EntryMismatchError as err:
        logger.warning("dropping store entry %s…: %s", key[:20], err)
        store.discard(key)
        return None


def _parse_kv(fingerprint: str, layout: KVLayout, num_tokens: int) -> Callable[[StoredEntry], KVEntry]:
    return lambda stored: KVEntry.from_stored(stored, fingerprint, layout.as_tuple, layout.dtype, num_tokens)


def prefix_key(fingerprint: str, chunk_hash: str) -> str:
    return entry_key(PREFIX_KIND, fingerprint, chunk_hash)


def image_kv_key(fingerprint: str, image_key: str) -> str:
    return entry_key(KV_KIND, fingerprint, image_key)


def load_prefix(
    store, fingerprint: str, layout: KVLayout, chunk_hashes: list[str], chunk_size: int
) -> list[KVEntry]:
    """Entries of the longest run of stored chunks from the start of the prompt."""
    entries: list[KVEntry] = []
    for chunk_hash in chunk_hashes:
        entry = _load(store, prefix_key(fingerprint, chunk_hash), _parse_kv(fingerprint, layout, chunk_size))
        if entry is None:
            break
        entries.append(entry)
    return entries


def load_image_kv(store, fingerprint: str, layout: KVLayout, span: ImageSpan) -> KVEntry | None:
    return _load(store, image_kv_key(fingerprint, span.key), _parse_kv(fingerprint, layout, span.length))


def gather_kv(layer_buffers: list[tuple[torch.Tensor, torch.Tensor]], start: int, end: int) -> torch.Tensor:
    """[num_layers, 2, kv_heads, end - start, head_dim] copy of the cache rows [start, end)."""
    return torch.stack([torch.stack([k[0, :, start:end], v[0, :, start:end]]) for k, v in layer_buffers]).clone()


def publish_prefix(
    store,
    fingerprint: str,
    layer_buffers: list[tuple[torch.Tensor, torch.Tensor]],
    positions: torch.Tensor,
    chunk_hashes: list[str],
    chunk_size: int,
    first_stored: int,
    exact_until: int,
) -> int:
    """Store the chunks past the ones already stored whose K/V is exact (all of it before `exact_until`)."""
    written = 0
    for index in range(first_stored, len(chunk_hashes)):
        start, end = index * chunk_size, (index + 1) * chunk_size
        if end > exact_until:
            break
        entry = KVEntry(gather_kv(layer_buffers, start, end), positions[:, 0, start:end].clone())
        store.put(prefix_key(fingerprint, chunk_hashes[index]), entry.to_stored(fingerprint))
        written += 1
    return written


def publish_image(
    store,
    fingerprint: str,
    layer_buffers: list[tuple[torch.Tensor, torch.Tensor]],
    positions: torch.Tensor,
    span: ImageSpan,
) -> None:
    """Store the K/V of an image span computed in this request, with the positions its keys carry."""
    entry = KVEntry(gather_kv(layer_buffers, span.start, span.end), positions[:, 0, span.start : span.end].clone())
    store.put(image_kv_key(fingerprint, span.key), entry.to_stored(fingerprint))
