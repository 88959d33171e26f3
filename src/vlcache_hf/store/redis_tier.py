"""`RedisTier`: entries shared across machines through an existing, proven store (redis-py).

An entry is the same safetensors blob as on disk (`store.codec`, no pickle), checksummed, split into chunks of
`chunk_bytes` under `<prefix><key>:<i>` with a small manifest `<prefix><key>` naming the chunk count and
checksum; the manifest is written last, so a reader sees a whole entry or a miss.

Byte budget: Redis' own `maxmemory` is checked *before* each command, so one large write can take the
server past it (measured: one entry over in the load run). With `budget_bytes` the tier keeps its own
account in Redis — an LRU sorted set, each entry's size, the total and its peak — and one Lua script
evicts least-recently-used entries until the new one fits, then writes it, all atomically: any number of
processes sharing the server never hold more than the budget between them. Set the budget below the
server's `maxmemory` so Redis never has to evict for us — Redis needs its startup memory (~0.9 MB) plus,
in the load run's small entries, ~60 % over the entries' bytes (allocator size classes, per-key overhead);
without a budget the account is still kept (for `stats()`), and eviction is left to Redis or the optional
TTL (an expired entry's bytes stay counted until it is the oldest: the account errs on the safe side).

Connection faults (`redis.RedisError`: refused, reset, timed out, restarted server) are raised, not
swallowed: `CacheStore` turns them into misses and backs off. Short socket timeouts and a single immediate
retry keep a dead server from stalling a request. The URL's password never leaves this module: names,
reprs and messages use `redact_url`.
"""

from __future__ import annotations

import json
import logging
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

from ..errors import VLCacheError
from .codec import check_key, decode, encode
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
    shown = urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    if parts.scheme and not netloc and url.startswith(f"{parts.scheme}://"):  # unix:///path, not unix:/path
        shown = f"{parts.scheme}://{shown[len(parts.scheme) + 1 :]}"
    return shown


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


#: Lua shared by the scripts: remove one entry (chunks, manifest, account) by its store key
_REMOVE = """
local function remove(k)
  local info = redis.call('HGET', KEYS[2], k)
  if info then
    local size, chunks = string.match(info, '(%d+) (%d+)')
    redis.call('DECRBY', KEYS[3], size)
    local name = ARGV[1] .. k
    for i = 0, tonumber(chunks) - 1 do redis.call('DEL', name .. ':' .. i) end
    redis.call('DEL', name)
    redis.call('HDEL', KEYS[2], k)
  end
  return redis.call('ZREM', KEYS[1], k)
end
"""
#: KEYS: lru, sizes, total, clock, peak; ARGV: prefix, key, budget (-1: none), ttl (0: none), bytes, manifest,
#: chunk 0, chunk 1, ... Returns the number of entries evicted, or -1 when the entry alone exceeds the budget.
_PUT = _REMOVE + """
local key, budget, ttl, size = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
if budget >= 0 and size > budget then return -1 end
remove(key)
local evicted = 0
while budget >= 0 and tonumber(redis.call('GET', KEYS[3]) or '0') + size > budget do
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0)[1]
  if not oldest then break end
  remove(oldest)
  evicted = evicted + 1
end
local name = ARGV[1] .. key
for i = 7, #ARGV do
  if ttl > 0 then redis.call('SET', name .. ':' .. (i - 7), ARGV[i], 'EX', ttl)
  else redis.call('SET', name .. ':' .. (i - 7), ARGV[i]) end
end
if ttl > 0 then redis.call('SET', name, ARGV[6], 'EX', ttl) else redis.call('SET', name, ARGV[6]) end
redis.call('HSET', KEYS[2], key, size .. ' ' .. (#ARGV - 6))
redis.call('ZADD', KEYS[1], redis.call('INCR', KEYS[4]), key)
local total = redis.call('INCRBY', KEYS[3], size)
if total > tonumber(redis.call('GET', KEYS[5]) or '0') then redis.call('SET', KEYS[5], total) end
return evicted
"""
_EVICT = _REMOVE + "return remove(ARGV[2])"
_TOUCH = "return redis.call('ZADD', KEYS[1], 'XX', redis.call('INCR', KEYS[4]), ARGV[2])"


class RedisTier:
    """Entries in Redis at `url` (e.g. "redis://127.0.0.1:6379/0", "redis://:password@host:6379/0"),
    at most `budget_bytes` of them (counted as their safetensors bytes) when given."""

    persistent = True

    def __init__(
        self,
        url: str,
        ttl: int | None = None,
        prefix: str = "vlcache:",
        chunk_bytes: int = 64 * 2**20,
        socket_timeout: float = 2.0,
        budget_bytes: int | None = None,
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
        if budget_bytes is not None and budget_bytes <= 0:
            raise VLCacheError(f"RedisTier budget_bytes must be positive, got {budget_bytes}")
        self.ttl, self.prefix, self.chunk_bytes, self.budget_bytes = ttl, prefix, int(chunk_bytes), budget_bytes
        # the account's names: `__` cannot occur in an entry's name (keys are `kind-<hex>`)
        self._account = [f"{prefix}__{part}" for part in ("lru", "sizes", "bytes", "clock", "peak")]
        self._put_script = self.client.register_script(_PUT)
        self._evict_script = self.client.register_script(_EVICT)
        self._touch_script = self.client.register_script(_TOUCH)
        self._stats = TierStats(self.name, byte_budget=budget_bytes or 0)

    def redact(self, text: str) -> str:
        """`text` with every secret of this tier's URL replaced by `***` (for messages and logs)."""
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        return text

    def __repr__(self) -> str:
        return f"RedisTier({self.url!r}, prefix={self.prefix!r}, ttl={self.ttl}, budget_bytes={self.budget_bytes})"

    def _name(self, key: str) -> str:
        return self.prefix + check_key(key)

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
        self._touch_script(keys=self._account, args=[self.prefix, key])  # LRU: a hit is a use
        self._stats.hits += 1
        return entry

    def _drop(self, key: str, reason: str) -> None:
        logger.warning("dropping unreadable Redis entry %s…: %s", key[:20], reason)
        self.evict(key)
        self._stats.misses += 1
        return None

    def put(self, key: str, entry: StoredEntry) -> list[tuple[str, StoredEntry]]:
        self._name(key)  # validates the key
        data, digest = encode(entry, embed_checksum=False)  # the checksum goes in the manifest
        chunks = [data[i : i + self.chunk_bytes] for i in range(0, len(data), self.chunk_bytes)] or [b""]
        manifest = json.dumps({"chunks": len(chunks), "checksum": digest, "bytes": len(data)})
        budget = -1 if self.budget_bytes is None else self.budget_bytes
        # one script: evict to fit, write chunks and manifest, account — atomic, so readers never see half
        # of a rewrite and concurrent writers never overshoot the budget between them
        evicted = int(self._put_script(keys=self._account, args=[self.prefix, key, budget, self.ttl or 0, len(data), manifest, *chunks]))
        if evicted < 0:
            logger.info("entry %s… (%d bytes) exceeds the Redis budget of %d bytes: not stored", key[:20], len(data), budget)
            return []
        self._stats.puts += 1
        self._stats.evictions += evicted
        return []

    def contains(self, key: str) -> bool:
        return bool(self.client.exists(self._name(key)))

    def evict(self, key: str) -> bool:
        name = self._name(key)
        removed = bool(self._evict_script(keys=self._account, args=[self.prefix, key]))
        if not removed:  # not in the account (written before it existed, or Redis evicted it): go by the manifest
            try:
                count = int(json.loads(self.client.get(name) or "{}").get("chunks", 0))
            except (ValueError, TypeError, AttributeError):
                count = 0
            removed = bool(self.client.delete(name, *[f"{name}:{i}" for i in range(count)]))
        if removed:
            self._stats.evictions += 1
        return removed

    def check_health(self) -> None:
        """Raise `redis.RedisError` if the server does not answer a PING now."""
        self.client.ping()

    def close(self) -> None:
        """Close this tier's connections (redis-py reopens them if the tier is used again)."""
        self.client.close()

    def peak_bytes(self) -> int:
        """The most bytes this prefix's entries ever held at once (kept by the put script; for the load run)."""
        return int(self.client.get(self._account[4]) or 0)

    def stats(self) -> TierStats:
        lru, _, total = self._account[:3]
        pipe = self.client.pipeline(transaction=False)
        pipe.zcard(lru)
        pipe.get(total)
        entries, used = pipe.execute()
        self._stats.entries = int(entries)
        self._stats.bytes_used = int(used or 0)
        return TierStats(**vars(self._stats))
