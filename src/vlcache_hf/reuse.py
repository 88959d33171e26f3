"""Reading and writing K/V entries: exact prefix chunks and per-image spans.

Every read validates the entry against this model (fingerprint, format, layout, dtype, length) and against the
key it was read under; an entry that does not fit is dropped from the store and treated as a miss, so a request
never uses foreign K/V.

An image span's K/V is exact only in the context it was computed in (the same tokens, images, positions and
padding before and at it: `keys.context_hashes`); anywhere else it is a *moved*, approximate reuse. So each image
has one *content* entry — the first K/V stored for it, found by content alone, which serves moved reuse (and
exact reuse when its recorded context matches) — plus one *context* entry per further context it was computed
exactly in (found by content and context). K/V is stored once either way: a span goes to its content key when
that is free, to its context key otherwise.

Prefix chunks hold only their *text* rows. Their image rows are the exact image entries of the same context:
a chunk's hash covers every token and image key up to its end, so when it matches, the images overlapping it
are this request's spans in this request's contexts, and their exact entries hold those very rows. Each K/V
row is thus stored once; a chunk whose images' exact entries are gone is a miss, like a missing chunk.

After the last full chunk a request also stores its *tail* — the rows up to its last prefilled token — in a
slot named by the chain hash before it (one slot per parent: the latest tail wins), recording its length and
the context hash of its end. A chat's next turn repeats the whole previous prompt, so after the full chunks
it finds that tail, checks that its own tokens up to the same end have the same context hash, and reuses
every row the previous turn computed: only the new tokens are computed, as with a copied `DynamicCache`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from .models import KVLayout
from .plan import ImageSpan
from .store.entry import KVEntry, StoredEntry, load_checked
from .store.keys import KV_KIND, PREFIX_KIND, entry_key

TAIL_MARK = "tail"

logger = logging.getLogger(__name__)
T = TypeVar("T")


def _parse_kv(fingerprint: str, layout: KVLayout, num_tokens: int) -> Callable[[StoredEntry, str], KVEntry]:
    return lambda stored, key: KVEntry.from_stored(stored, fingerprint, layout.as_tuple, layout.dtype, num_tokens, key=key)


def prefix_key(fingerprint: str, chunk_hash: str) -> str:
    return entry_key(PREFIX_KIND, fingerprint, chunk_hash)


def image_kv_key(fingerprint: str, image_key: str) -> str:
    """Store key of an image span's content entry (found by content alone)."""
    return entry_key(KV_KIND, fingerprint, image_key)


def image_context_key(fingerprint: str, image_key: str, context: str) -> str:
    """Store key of an image span's K/V computed exactly in the context `context` (a `keys.context_hashes`)."""
    return entry_key(KV_KIND, fingerprint, f"{image_key}@{context}")


@dataclass(frozen=True)
class SpanHit:
    """Stored K/V found for an image span; `exact` when it was computed in this very context."""

    entry: KVEntry
    exact: bool


def text_rows(start: int, end: int, spans: list[ImageSpan]) -> torch.Tensor:
    """The rows of [start, end) outside every image span (what a prefix chunk stores itself)."""
    inside = torch.zeros(end - start, dtype=torch.bool)
    for span in spans:
        if span.start < end and span.end > start:
            inside[max(span.start, start) - start : min(span.end, end) - start] = True
    return torch.nonzero(~inside).flatten() + start


@dataclass(frozen=True)
class PrefixChunk:
    """One stored chunk of the exact prefix: its own text rows and, for its image rows, the image entries
    (exact in this context) that hold them: (first row, end row, entry, offset of the first row in the entry)."""

    text_rows: torch.Tensor
    text: KVEntry
    image_parts: tuple[tuple[int, int, KVEntry, int], ...]


def load_prefix(
    store,
    fingerprint: str,
    layout: KVLayout,
    chunk_hashes: list[str],
    chunk_size: int,
    spans: list[ImageSpan],
    contexts: dict[int, str],
) -> tuple[list[PrefixChunk], dict[int, SpanHit]]:
    """The longest run of complete chunks from the start of the prompt, and the exact image hits their image
    rows came from (by span start; the engine reuses them for spans running past the prefix)."""
    chunks: list[PrefixChunk] = []
    image_hits: dict[int, SpanHit] = {}
    for index, chunk_hash in enumerate(chunk_hashes):
        start, end = index * chunk_size, (index + 1) * chunk_size
        rows = text_rows(start, end, spans)
        entry = load_checked(store, prefix_key(fingerprint, chunk_hash), _parse_kv(fingerprint, layout, rows.numel()))
        if entry is None:
            break
        parts = _exact_image_parts(store, fingerprint, layout, start, end, spans, contexts, image_hits)
        if parts is None:
            break
        chunks.append(PrefixChunk(rows, entry, parts))
    return chunks, image_hits


def _exact_image_parts(
    store, fingerprint: str, layout: KVLayout, start: int, end: int, spans: list[ImageSpan],
    contexts: dict[int, str], image_hits: dict[int, SpanHit],
) -> tuple[tuple[int, int, KVEntry, int], ...] | None:
    """The image rows of [start, end) from each overlapping image's exact entry (found before in `image_hits`,
    or loaded and added there), as (first row, end row, entry, offset); None if one has no exact entry."""
    parts = []
    for span in spans:
        if not (span.start < end and span.end > start):
            continue
        hit = image_hits.get(span.start)
        if hit is None and span.start in contexts:
            hit = load_image_kv(store, fingerprint, layout, span, contexts[span.start])
        if hit is None or not hit.exact:
            return None
        image_hits[span.start] = hit
        first, last = max(start, span.start), min(end, span.end)
        parts.append((first, last, hit.entry, first - span.start))
    return tuple(parts)


def tail_key(fingerprint: str, parent_hash: str) -> str:
    """Store key of the tail slot after the chunk whose chain hash is `parent_hash` (or `prefix_root`)."""
    return entry_key(PREFIX_KIND, fingerprint, f"{TAIL_MARK}@{parent_hash}")


def _tail_context(length: int, end_context: str) -> str:
    return f"{TAIL_MARK}:{length}:{end_context}"


def _tail_length(context: str) -> tuple[int, str] | None:
    mark, _, rest = context.partition(":")
    length, _, end_context = rest.partition(":")
    return (int(length), end_context) if mark == TAIL_MARK and length.isdigit() and end_context else None


def load_tail(
    store,
    fingerprint: str,
    layout: KVLayout,
    parent_hash: str,
    start: int,
    limit: int,
    spans: list[ImageSpan],
    contexts: dict[int, str],
    end_context: Callable[[int], str],
    image_hits: dict[int, SpanHit],
) -> tuple[PrefixChunk, int] | None:
    """The tail stored after the prefix [0, start) if this prompt repeats it: rows [start, start + L) for its
    recorded length L (start + L <= `limit`) whose end has this prompt's context hash; image rows from the
    images' exact entries, as for chunks. `image_hits` gains the image hits used."""
    key = tail_key(fingerprint, parent_hash)
    entry = load_checked(store, key, _parse_kv(fingerprint, layout, None))
    recorded = _tail_length(entry.context) if entry is not None else None
    if recorded is None:
        return None
    length, context = recorded
    end = start + length
    if length < 1 or end > limit or end_context(end) != context:
        return None  # another prompt's tail (or a longer one than this prompt): not ours
    rows = text_rows(start, end, spans)
    if entry.kv.shape[3] != rows.numel():
        logger.warning("dropping store entry %s…: its rows do not match its recorded length", key[:20])
        store.discard(key)
        return None
    parts = _exact_image_parts(store, fingerprint, layout, start, end, spans, contexts, image_hits)
    return None if parts is None else (PrefixChunk(rows, entry, parts), end)


def publish_tail(
    store,
    fingerprint: str,
    layer_buffers: list[tuple[torch.Tensor, torch.Tensor]],
    positions: torch.Tensor,
    parent_hash: str,
    start: int,
    end: int,
    spans: list[ImageSpan],
    end_context: str,
) -> None:
    """Store rows [start, end) — exact, after the prefix with chain hash `parent_hash` — as that prefix's tail."""
    rows = text_rows(start, end, spans)
    entry = KVEntry(gather_rows(layer_buffers, rows), positions[:, 0, rows.to(positions.device)].clone(), _tail_context(end - start, end_context))
    key = tail_key(fingerprint, parent_hash)
    store.put(key, entry.to_stored(fingerprint, key))


def load_image_kv(store, fingerprint: str, layout: KVLayout, span: ImageSpan, context: str) -> SpanHit | None:
    """The span's K/V computed in `context` if stored (exact), else any stored K/V of its content (moved)."""
    parse = _parse_kv(fingerprint, layout, span.length)
    content = load_checked(store, image_kv_key(fingerprint, span.key), parse)
    if content is not None and content.context == context:
        return SpanHit(content, exact=True)
    key = image_context_key(fingerprint, span.key, context)
    exact = load_checked(store, key, parse)
    if exact is not None and exact.context != context:  # the key names the context: a mismatch is corruption
        logger.warning("dropping store entry %s…: its context differs from its key's", key[:20])
        store.discard(key)
        exact = None
    if exact is not None:
        return SpanHit(exact, exact=True)
    return SpanHit(content, exact=False) if content is not None else None


def block_of(layer_buffers: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor | None:
    """The one tensor every layer's buffers are views of (`prefill.LayerBuffers.block`), or None."""
    return getattr(layer_buffers, "block", None)


def gather_kv(layer_buffers: list[tuple[torch.Tensor, torch.Tensor]], start: int, end: int) -> torch.Tensor:
    """[num_layers, 2, kv_heads, end - start, head_dim] copy of the cache rows [start, end) (one copy of the block
    when the buffers are views of one, see `gather_rows`; `torch.stack` copies too)."""
    block = block_of(layer_buffers)
    if block is not None:
        return block[:, :, 0, :, start:end].clone()
    return torch.stack([torch.stack([k[0, :, start:end], v[0, :, start:end]]) for k, v in layer_buffers])


def gather_rows(layer_buffers: list[tuple[torch.Tensor, torch.Tensor]], rows: torch.Tensor) -> torch.Tensor:
    """[num_layers, 2, kv_heads, len(rows), head_dim] copy of the cache rows `rows`: one indexing of the block
    when the buffers are views of one (`prefill.LayerBuffers.block`), else two per layer and a stack."""
    index = rows.to(layer_buffers[0][0].device)
    block = block_of(layer_buffers)
    if block is not None:
        return block[:, :, 0, :, index]
    return torch.stack([torch.stack([k[0, :, index], v[0, :, index]]) for k, v in layer_buffers])


def publish_prefix(
    store,
    fingerprint: str,
    layer_buffers: list[tuple[torch.Tensor, torch.Tensor]],
    positions: torch.Tensor,
    chunk_hashes: list[str],
    chunk_size: int,
    first_stored: int,
    exact_until: int,
    spans: list[ImageSpan],
) -> int:
    """Store the chunks past the ones already stored whose K/V is exact (all of it before `exact_until`): their
    text rows only (image rows live in the images' exact entries, see the module docstring)."""
    written = 0
    for index in range(first_stored, len(chunk_hashes)):
        start, end = index * chunk_size, (index + 1) * chunk_size
        if end > exact_until:
            break
        rows = text_rows(start, end, spans)
        key = prefix_key(fingerprint, chunk_hashes[index])
        pos = positions[:, 0, rows.to(positions.device)].clone()
        entry = KVEntry(gather_rows(layer_buffers, rows), pos, chunk_hashes[index])
        store.put(key, entry.to_stored(fingerprint, key))
        written += 1
    return written


def publish_image(
    store,
    fingerprint: str,
    layer_buffers: list[tuple[torch.Tensor, torch.Tensor]],
    positions: torch.Tensor,
    span: ImageSpan,
    context: str,
    exact: bool,
) -> str | None:
    """Store the K/V of an image span computed in this request, with the positions its keys carry.

    `exact`: computed with nothing approximate before it, so it is exact in `context`. Exact K/V goes to the
    content key when that is free (it then also serves moved reuse), else to its context key unless that is
    stored already; approximate K/V only fills a free content key (as a moved candidate, never claiming a
    context). Returns the key written, if any.
    """
    content_key = image_kv_key(fingerprint, span.key)
    if store.contains(content_key):
        key = image_context_key(fingerprint, span.key, context)
        if not exact or store.contains(key):  # nothing to add (policy "full" recomputes what is stored)
            return None
    else:
        key = content_key
    kv = gather_kv(layer_buffers, span.start, span.end)
    entry = KVEntry(kv, positions[:, 0, span.start : span.end].clone(), context if exact else "")
    store.put(key, entry.to_stored(fingerprint, key))
    return key
