"""Content keys: pure hashing helpers, no I/O.

Every key is a lower-case hex digest prefixed by its kind (``enc-``, ``kv-``, ``pfx-``), so it is safe as a
file name or Redis key whatever the user passed in. blake3 is used because hashing image pixels sits on the
request path and blake3 runs at memory speed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import blake3
import numpy as np
import torch

ENCODER_KIND = "enc"
KV_KIND = "kv"
PREFIX_KIND = "pfx"
ALIAS_KIND = "alias"  # VLCacheProcessor: an image's raw key → its item key (the encoder entry's content key)
KINDS = (ENCODER_KIND, KV_KIND, PREFIX_KIND, ALIAS_KIND)


Bytes = bytes | memoryview


def update_parts(hasher: Any, parts: Iterable[Bytes | str]) -> None:
    """Feed `parts` to a blake3 `hasher`, each length-prefixed so ("ab", "c") != ("a", "bc"): the framing of
    every digest in this package (keys here, model and checkpoint fingerprints)."""
    for part in parts:
        data = part.encode() if isinstance(part, str) else memoryview(part).cast("B")
        hasher.update(len(data).to_bytes(8, "little"))
        hasher.update(data)


def digest(*parts: Bytes | str) -> str:
    """blake3 hex digest of the parts, each length-prefixed (`update_parts`).

    It hashes on as many threads as torch computes on (`torch.get_num_threads()`, which `OMP_NUM_THREADS` sets):
    pixels are hashed on the request path, just before the model's forward, with the same cores at hand; one
    thread per logical CPU would compete with itself where the process is held to fewer cores."""
    hasher = blake3.blake3(max_threads=max(1, torch.get_num_threads()))
    update_parts(hasher, parts)
    return hasher.hexdigest()


def tensor_parts(tensor: torch.Tensor) -> tuple[bytes, memoryview]:
    """A tensor as two hash parts: its dtype/shape header and its raw bytes (a view, not a copy, when the
    tensor is already a contiguous CPU tensor), so equal bytes of different layouts never collide."""
    cpu = tensor.detach().to("cpu").contiguous()
    header = f"{cpu.dtype}|{tuple(cpu.shape)}".encode()
    return header, memoryview(cpu.reshape(-1).view(torch.uint8).numpy())


def image_key_from_pixels(pixels: torch.Tensor, grid_thw: Sequence[int], settings: str = "") -> str:
    """Content key of one image from its preprocessed patches and grid.

    The pixels already reflect every processor setting that changes them (resize, normalisation), so the
    key is stable for the same picture under the same processor and differs otherwise.
    """
    grid = ",".join(str(int(x)) for x in grid_thw)
    return digest("image-pixels", grid, settings, *tensor_parts(pixels))


def item_key(pixels: torch.Tensor, layout: Sequence[int], modality: str, dtype: torch.dtype, options: str = "") -> str:
    """The content key of one image or video item: its preprocessed pixels as the vision tower reads them
    (cast to the tower's `dtype`), its layout, its modality and the encoder options (`encoder_options`). The one
    definition `generate` (`encoder.item_keys`) and the vLLM client helper (`models/serving.py`) both use."""
    return with_encoder_options(image_key_from_pixels(pixels.to(dtype), layout, modality), options)


def image_key_from_seen(seen: np.ndarray | torch.Tensor, settings: str) -> str:
    """Content key of one image from the pixels the image processor starts from (after its own loading and
    colour conversion: a palette image's colours, not its index bytes) and the settings it runs with."""
    if isinstance(seen, torch.Tensor):
        return digest("image-seen", settings, *tensor_parts(seen))
    array = np.ascontiguousarray(seen)
    return digest("image-seen", settings, f"{array.dtype}|{array.shape}", memoryview(array).cast("B"))


def encoder_options(options: Mapping[str, Any]) -> str:
    """Canonical text of the extra arguments a vision encoder call receives (e.g. LLaVA's
    `vision_feature_layer`): they change its output, so they are part of every key derived from it.

    `None` means "the model's default" and is dropped, so a call without options keys as before. Tensors
    contribute a digest of their bytes, everything else its JSON form.
    """

    def canonical(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return digest("tensor", *tensor_parts(value))
        if isinstance(value, (list, tuple)):
            return [canonical(v) for v in value]
        if isinstance(value, Mapping):
            return {str(k): canonical(v) for k, v in value.items()}
        return value

    given = {name: canonical(value) for name, value in sorted(options.items()) if value is not None}
    return json.dumps(given, sort_keys=True, default=repr) if given else ""


def with_encoder_options(key: str, options: str) -> str:
    """`key` of an item encoded with `options` (from `encoder_options`); unchanged when there are none."""
    return digest("encoder-options", key, options) if options else key


def model_fingerprint(config_json: str, weights_digest: str, dtype: str, library_version: str) -> str:
    """Fingerprint of a model: its config, a digest of its weights, its dtype and our format version."""
    return digest("model", config_json, weights_digest, dtype, library_version)


def entry_key(kind: str, fingerprint: str, content: str) -> str:
    """Store key of an entry of `kind` for `content` (an image key or a prefix hash) under one model."""
    if kind not in KINDS:
        raise ValueError(f"unknown entry kind {kind!r}; expected one of {KINDS}")
    return f"{kind}-{digest(kind, fingerprint, content)}"


def _prompt_parts(
    token_ids: Sequence[int],
    image_keys_at: dict[int, str],
    start: int,
    end: int,
    positions: torch.Tensor | None,
    visible: torch.Tensor | None,
) -> list[Bytes | str]:
    """Hash parts of prompt tokens [start, end): what the model computes their K/V from.

    An image placeholder token contributes its image's content key instead of its (shared) token id. The
    positions the tokens are rotated to and which of them are visible (the attention mask) are parts too,
    so the same ids under other positions — left padding, other video timing, anything the adapter's
    position computation reads — never share an entry.
    """
    items = [image_keys_at.get(pos, str(int(token_ids[pos]))) for pos in range(start, end)]
    parts: list[Bytes | str] = [json.dumps(items)]
    if positions is not None:
        parts += ["positions", *tensor_parts(positions[:, start:end])]
    if visible is not None:
        parts += ["visible", *tensor_parts(visible[start:end])]
    return parts


def prefix_root(fingerprint: str) -> str:
    """The chain hash of the empty prefix (parent of the first chunk)."""
    return digest("prefix-root", fingerprint)


def chain_prefix_hashes(
    fingerprint: str,
    token_ids: Sequence[int],
    image_keys_at: dict[int, str],
    chunk_size: int,
    positions: torch.Tensor | None = None,
    visible: torch.Tensor | None = None,
) -> list[str]:
    """Chained hashes of the prompt's full chunks, as vLLM hashes KV blocks.

    Hash i covers tokens [0, (i+1)*chunk_size): it is the hash of hash i-1 plus chunk i's parts (token ids
    with image content keys, and when given the tokens' `positions` [num_axes, L] and `visible` [L] key
    mask; see `_prompt_parts`), so two prompts that differ in a picture, a position or the padding never
    share a prefix entry.
    """
    hashes: list[str] = []
    parent = prefix_root(fingerprint)
    for start in range(0, len(token_ids) - chunk_size + 1, chunk_size):
        parent = digest(parent, *_prompt_parts(token_ids, image_keys_at, start, start + chunk_size, positions, visible))
        hashes.append(parent)
    return hashes


#: granularity of the context hash chain; independent of the prefix chunk size, so requests made with
#: different `prefix_chunk_size` values still agree on which image K/V is exact
CONTEXT_BLOCK = 64


def context_hashes(
    fingerprint: str,
    token_ids: Sequence[int],
    image_keys_at: dict[int, str],
    ends: Sequence[int],
    positions: torch.Tensor | None = None,
    visible: torch.Tensor | None = None,
    block_hashes: Sequence[str] = (),
) -> dict[int, str]:
    """Per `end` in `ends`, the hash of everything the K/V of tokens [0, end) is computed from.

    The parts are those of the prefix chain (`_prompt_parts`: token ids with image content keys, positions,
    visible mask), chained over fixed blocks of `CONTEXT_BLOCK` tokens so each end costs at most one block of
    hashing. An image span's K/V computed in one prompt is exact in another exactly when both give its end the
    same context hash. The block chain is the prefix chain at a chunk size of `CONTEXT_BLOCK`: pass that
    (`block_hashes`, from `chain_prefix_hashes` with the same arguments) to skip hashing the prompt twice.
    """
    chain = [prefix_root(fingerprint), *block_hashes]  # chain[i] covers tokens [0, i * CONTEXT_BLOCK)
    result: dict[int, str] = {}
    for end in sorted(set(ends)):
        full = end // CONTEXT_BLOCK
        while len(chain) <= full:
            begin = (len(chain) - 1) * CONTEXT_BLOCK
            chain.append(digest(chain[-1], *_prompt_parts(token_ids, image_keys_at, begin, begin + CONTEXT_BLOCK, positions, visible)))
        tail = _prompt_parts(token_ids, image_keys_at, full * CONTEXT_BLOCK, end, positions, visible)
        result[end] = digest("context", chain[full], *tail)
    return result
