"""Content keys: pure hashing helpers, no I/O.

Every key is a lower-case hex digest prefixed by its kind (``enc-``, ``kv-``, ``pfx-``), so it is safe as a
file name or Redis key whatever the user passed in. blake3 is used because hashing image pixels sits on the
request path and blake3 runs at memory speed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

import blake3
import torch

ENCODER_KIND = "enc"
KV_KIND = "kv"
PREFIX_KIND = "pfx"
KINDS = (ENCODER_KIND, KV_KIND, PREFIX_KIND)


Bytes = bytes | memoryview


def digest(*parts: Bytes | str) -> str:
    """blake3 hex digest of the parts, each length-prefixed so ("ab", "c") != ("a", "bc")."""
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    for part in parts:
        data = part.encode() if isinstance(part, str) else memoryview(part).cast("B")
        hasher.update(len(data).to_bytes(8, "little"))
        hasher.update(data)
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


def image_key_from_bytes(raw: bytes, settings: str) -> str:
    """Content key of one image from its encoded file bytes and the processor settings that change pixels."""
    return digest("image-bytes", settings, raw)


def model_fingerprint(config_json: str, weights_digest: str, dtype: str, library_version: str) -> str:
    """Fingerprint of a model: its config, a digest of its weights, its dtype and our format version."""
    return digest("model", config_json, weights_digest, dtype, library_version)


def entry_key(kind: str, fingerprint: str, content: str) -> str:
    """Store key of an entry of `kind` for `content` (an image key or a prefix hash) under one model."""
    if kind not in KINDS:
        raise ValueError(f"unknown entry kind {kind!r}; expected one of {KINDS}")
    return f"{kind}-{digest(kind, fingerprint, content)}"


def chain_prefix_hashes(
    fingerprint: str, token_ids: Sequence[int], image_keys_at: dict[int, str], chunk_size: int
) -> list[str]:
    """Chained hashes of the prompt's full chunks, as vLLM hashes KV blocks.

    Hash i covers tokens [0, (i+1)*chunk_size): it is the hash of hash i-1 plus chunk i's token ids, where
    an image placeholder token contributes its image's content key instead of its (shared) token id, so two
    prompts that differ only in which picture they show never share a prefix entry.
    """
    hashes: list[str] = []
    parent = digest("prefix-root", fingerprint)
    for start in range(0, len(token_ids) - chunk_size + 1, chunk_size):
        items: Iterable[str] = (
            image_keys_at.get(pos, str(int(token_ids[pos]))) for pos in range(start, start + chunk_size)
        )
        parent = digest(parent, json.dumps(list(items)))
        hashes.append(parent)
    return hashes
