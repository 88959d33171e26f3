"""`RedisTier`: entries shared across machines through an existing, proven store (redis-py).

An entry is the same safetensors blob as on disk (no pickle), checksummed, split into chunks of
`chunk_bytes` under `<prefix><key>:<i>` with a small manifest `<prefix><key>` naming the chunk count and
checksum; the manifest is written last, so a reader sees a whole entry or a miss. Eviction is left to
Redis (`maxmemory-policy allkeys-lru`) or to the optional TTL.

Connection faults (`redis.RedisError`: refused, reset, timed out, restarted server) are raised, not
swallowed: `CacheStore` turns them into misses and backs off. Short socket timeouts and a single immediate
retry keep a dead server from stalling a request. The URL's password never leaves this module: names,
reprs and messages use `redact_url`.
"""

from __future__ import annotations

import json
import logging
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

from safetensors.torch import save as save_bytes

from ..errors import VLCacheError
from .disk import KEY_PATTERN, checksum, decode
from .entry import StoredEntry
from .tiers import TierStats

logger = logging.getLogger(__name__)

REDACTED = "***"
_SECRET_PARAMS = {"password", "pass", "pwd", "token", "secret"}


def redact_url(url: str) -> str:
    """`url` with its password (userinfo or `?password=`) replaced by `***`, safe to print and log."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:{REDACTED}@{host}" if ":" in userinfo else f"{REDACTED}@{host}"
        if user == "" and ":" in userinfo:
            netloc = f":{REDACTED}@{host}"
    query = urlencode(
        [(k, REDACTED if k.lower() in _SECRET_PARAMS else v) for k, v in parse_qsl(parts.query, keep_blank_values=True)],
        safe="*",
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def url_secrets(url: str) -> list[str]:
    """The secret strings inside `url` (raw and percent-encoded forms), to scrub from any text."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return [url]
    found = [v for k, v in parse_qsl(parts.query) if k.lower() in _SECRET_PARAMS and v]
    if parts.password:
        found.append(parts.password)
    if "@" in parts.netloc:
        userinfo = parts.netloc.rsplit("@", 1)[0]
        if ":" not in userinfo and userinfo:  # redis://token@host: the lone userinfo is the password
            found.append(userinfo)
    forms = {s for secret in found for s in (secret, unquote(secret), quote(secret, safe=""))}
    return sorted((s for s in forms if s), key=len, reverse=True)


class RedisTier:
    """Entries in Redis at `url` (e.g. "redis://127.0.0.1:6379/0", "redis://:password@host:6379/0")."""

    persistent = True

    def __init__(
        self,
        url: str,
        ttl: int | None = None,
        prefix: str = "vlcache:",
        chunk_bytes: int = 64 * 2**20,
        socket_timeout: float = 2.0,
    ):
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError as err:
            raise VLCacheError("RedisTier needs redis-py: pip install 'vlcache-hf[redis]'") from err
        self.url = redact_url(url)
        self._secrets = url_secrets(url)
        self.name = f"redis:{self.url}"
        # one immediate retry reconnects a pooled connection after a server restart; no sleeping backoff
        self.client = redis.Redis.from_url(
            url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout, retry=Retry(NoBackoff(), 1)
        )
        try:
            self.client.ping()
        except redis.RedisError as err:
            raise VLCacheError(f"cannot reach Redis at {self.url}: {self.redact(str(err))}") from None
        self.ttl, self.prefix, self.chunk_bytes = ttl, prefix, int(chunk_bytes)
        self._stats = TierStats(self.name)

    def redact(self, text: str) -> str:
        """`text` with every secret of this tier's URL replaced by `***` (for messages and logs)."""
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        return text

    def __repr__(self) -> str:
        return f"RedisTier({self.url!r}, prefix={self.prefix!r}, ttl={self.ttl})"

    def _name(self, key: str) -> str:
        if not KEY_PATTERN.match(key):
            raise ValueError(f"invalid store key {key!r}")
        return self.prefix + key

    def get(self, key: str) -> StoredEntry | None:
        name = self._name(key)
        manifest = self.client.get(name)
        if manifest is None:
            self._stats.misses += 1
            return None
        try:
            info = json.loads(manifest)
            count = int(info["chunks"])
        except (ValueError, KeyError, TypeError):
            return self._drop(key, "unreadable manifest")
        chunks = self.client.mget([f"{name}:{i}" for i in range(count)])  # a connection fault propagates
        if any(chunk is None for chunk in chunks):
            # expired, evicted by Redis, or a writer's chunks replaced under us: a miss, and the next put heals it
            self._stats.misses += 1
            return None
        entry, reason = decode(b"".join(chunks), expected=info.get("checksum"))
        if entry is None:
            # another writer may have replaced the chunks between our two reads: drop only if still the same
            if self.client.get(name) == manifest:
                return self._drop(key, reason)
            self._stats.misses += 1
            return None
        self._stats.hits += 1
        return entry

    def _drop(self, key: str, reason: str) -> None:
        logger.warning("dropping unreadable Redis entry %s…: %s", key[:20], reason)
        self.evict(key)
        self._stats.misses += 1
        return None

    def put(self, key: str, entry: StoredEntry) -> list[tuple[str, StoredEntry]]:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in entry.tensors.items()}
        data = save_bytes(tensors, dict(entry.metadata))
        chunks = [data[i : i + self.chunk_bytes] for i in range(0, len(data), self.chunk_bytes)] or [b""]
        name = self._name(key)
        pipe = self.client.pipeline(transaction=True)  # MULTI/EXEC: readers never see half of a rewrite
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
        sizes = 0
        for raw in self.client.mget(manifests) if manifests else []:
            try:
                sizes += int(json.loads(raw)["bytes"]) if raw is not None else 0
            except (ValueError, KeyError, TypeError):
                continue
        self._stats.entries = len(manifests)
        self._stats.bytes_used = sizes
        return TierStats(**vars(self._stats))
