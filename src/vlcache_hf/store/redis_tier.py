"""`RedisTier`: entries shared across machines through an existing, proven store (redis-py).

An entry is the same safetensors blob as on disk (no pickle), checksummed, split into chunks of
`chunk_bytes` under `<prefix><key>:<i>` with a small manifest `<prefix><key>` naming the chunk count and
checksum; the manifest is written last, so a reader sees a whole entry or a miss. Eviction is left to
Redis (`maxmemory-policy allkeys-lru`) or to the optional TTL.
"""

from __future__ import annotations

import json
import logging

from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from ..errors import VLCacheError
from .disk import KEY_PATTERN, checksum, header_metadata
from .entry import StoredEntry
from .tiers import TierStats

logger = logging.getLogger(__name__)


class RedisTier:
    """Entries in Redis at `url` (e.g. "redis://127.0.0.1:6379/0")."""

    persistent = True

    def __init__(self, url: str, ttl: int | None = None, prefix: str = "vlcache:", chunk_bytes: int = 64 * 2**20):
        try:
            import redis
        except ImportError as err:
            raise VLCacheError("RedisTier needs redis-py: pip install 'vlcache-hf[redis]'") from err
        self.client = redis.Redis.from_url(url)
        try:
            self.client.ping()
        except redis.RedisError as err:
            raise VLCacheError(f"cannot reach Redis at {url}: {err}") from err
        self.ttl, self.prefix, self.chunk_bytes = ttl, prefix, int(chunk_bytes)
        self.name = f"redis:{url}"
        self._stats = TierStats(self.name)

    def _name(self, key: str) -> str:
        if not KEY_PATTERN.match(key):
            raise ValueError(f"invalid store key {key!r}")
        return self.prefix + key

    def get(self, key: str) -> StoredEntry | None:
        manifest = self.client.get(self._name(key))
        if manifest is None:
            self._stats.misses += 1
            return None
        try:
            info = json.loads(manifest)
            chunks = self.client.mget([f"{self._name(key)}:{i}" for i in range(int(info["chunks"]))])
            if any(chunk is None for chunk in chunks):
                raise ValueError("missing chunk")
            data = b"".join(chunks)
            tensors, metadata = load_bytes(data), header_metadata(data)
            if checksum(tensors) != info["checksum"]:
                raise ValueError("checksum mismatch")
        except Exception as err:
            logger.warning("dropping unreadable Redis entry %s…: %s", key[:20], err)
            self.evict(key)
            self._stats.misses += 1
            return None
        self._stats.hits += 1
        metadata.pop("__checksum__", None)
        return StoredEntry(tensors, metadata)

    def put(self, key: str, entry: StoredEntry) -> list[tuple[str, StoredEntry]]:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in entry.tensors.items()}
        data = save_bytes(tensors, dict(entry.metadata))
        chunks = [data[i : i + self.chunk_bytes] for i in range(0, len(data), self.chunk_bytes)] or [b""]
        name = self._name(key)
        pipe = self.client.pipeline()
        for i, chunk in enumerate(chunks):
            pipe.set(f"{name}:{i}", chunk, ex=self.ttl)
        pipe.set(name, json.dumps({"chunks": len(chunks), "checksum": checksum(tensors), "bytes": len(data)}), ex=self.ttl)
        pipe.execute()
        self._stats.puts += 1
        return []

    def contains(self, key: str) -> bool:
        return bool(self.client.exists(self._name(key)))

    def evict(self, key: str) -> bool:
        name = self._name(key)
        chunk_keys = list(self.client.scan_iter(f"{name}:*"))
        removed = self.client.delete(name, *chunk_keys)
        if removed:
            self._stats.evictions += 1
        return bool(removed)

    def stats(self) -> TierStats:
        manifests = [k for k in self.client.scan_iter(f"{self.prefix}*") if b":" not in k[len(self.prefix) :]]
        self._stats.entries = len(manifests)
        self._stats.bytes_used = sum(json.loads(self.client.get(k) or b'{"bytes": 0}')["bytes"] for k in manifests)
        return TierStats(**vars(self._stats))
