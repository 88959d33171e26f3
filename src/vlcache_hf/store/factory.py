"""Tiers built from URLs or keywords, through one constructor (`build_tier`).

    memory://?budget=8GiB             in memory on the model's device (default budget 4 GiB)
    memory://cpu?budget=8GiB          in CPU memory (`memory://cuda`, `memory://cuda:1`: on that GPU)
    cpu://8GiB, gpu://2GiB            shorthands: CPU memory, CUDA memory (`cuda://` = `gpu://`)
    disk:///data/vlcache?budget=50GiB&mode=0660
                                      a directory (`disk://~/cache`, `disk://relative/dir`); budget default
                                      50 GiB, mode default 0600 (private)
    redis://host:6379/0?budget=1GiB&prefix=vlcache:&ttl=3600
                                      Redis (also `rediss://` for TLS, `unix:///path/redis.sock?db=0`)

`budget` takes bytes or a size such as `512MB`, `8GiB`. The query parameters named above are ours and are
removed before a Redis URL reaches redis-py; the others of a Redis URL (`password`, `db`, `socket_timeout`,
`ssl_*`, ...) are redis-py's. Any other parameter, an unknown scheme or a bad value is a `VLCacheError`
naming the URL with its password redacted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, unquote_plus, urlsplit

import torch

from ..errors import VLCacheError
from .redis_tier import redact_url
from .tiers import MemoryTier, Tier

DEFAULT_MEMORY_BUDGET = 4 * 1024**3
DEFAULT_DISK_BUDGET = "50GiB"

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(size: int | str) -> int:
    """Bytes from an int or a human string such as "512MB", "2GiB", "1.5 gb"."""
    if isinstance(size, bool):
        raise VLCacheError(f"invalid size {size!r}")
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(size))
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise VLCacheError(f"invalid size {size!r}; use bytes or a string like '512MB' or '2GiB'")
        value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise VLCacheError(f"size must be positive, got {size!r}")
    return value


@dataclass(frozen=True)
class TierSpec:
    """What to build: `kind` ("memory", "disk", "redis"), where (`location`: a device, a directory or a Redis
    URL without our parameters), `budget` in bytes (None: the kind's default) and the kind's own `options`."""

    kind: str
    location: str | None = None
    budget: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    shown: str = ""  # how messages name it (a Redis URL's password redacted)


def build_tier(spec: TierSpec) -> Tier:
    """The one place where `CacheStore`'s tiers are constructed."""
    if spec.kind == "memory":
        device = spec.location
        if device is not None and torch.device(device).type == "cuda" and not torch.cuda.is_available():
            raise VLCacheError(f"{spec.shown or 'CacheStore(gpu=...)'} needs CUDA; use cpu=... (cpu://) on this machine")
        return MemoryTier(spec.budget or DEFAULT_MEMORY_BUDGET, device=device)
    if spec.kind == "disk":
        from .disk import DiskTier

        budget = spec.budget or parse_bytes(DEFAULT_DISK_BUDGET)
        return DiskTier(spec.location or "", budget, mode=spec.options.get("mode"))
    if spec.kind == "redis":
        from .redis_tier import RedisTier

        return RedisTier(spec.location or "", budget_bytes=spec.budget, **spec.options)
    raise VLCacheError(f"unknown tier kind {spec.kind!r}")


# -- URLs ------------------------------------------------------------------------------------------------

_MEMORY_SCHEMES = {"memory": None, "cpu": "cpu", "gpu": "cuda", "cuda": "cuda"}
_REDIS_SCHEMES = ("redis", "rediss", "unix")
_SCHEMES = (*_MEMORY_SCHEMES, "disk", *_REDIS_SCHEMES)
#: our query parameters per kind; a Redis URL's other parameters are redis-py's
_OURS = {"memory": ("budget",), "disk": ("budget", "mode"), "redis": ("budget", "prefix", "ttl")}


def _redis_parameters() -> set[str]:
    """Query parameters redis-py's `from_url` understands (beyond ours)."""
    known = {"db", "password", "username", "client_name", "socket_timeout", "socket_connect_timeout", "health_check_interval"}
    try:
        from redis.connection import URL_QUERY_ARGUMENT_PARSERS
    except ImportError:  # redis-py missing (RedisTier will say so) or without the table
        return known
    return known | set(URL_QUERY_ARGUMENT_PARSERS)


def _split_query(url: str, shown: str, kind: str, query: str) -> tuple[dict[str, str], str]:
    """(our parameters, the rest of the query as written): a password keeps its exact encoding."""
    ours: dict[str, str] = {}
    rest: list[str] = []
    for part in filter(None, query.split("&")):
        raw_name, _, raw_value = part.partition("=")
        name = unquote_plus(raw_name)
        if name in _OURS[kind]:
            if name in ours:
                raise VLCacheError(f"{shown}: query parameter {name!r} given twice")
            ours[name] = unquote_plus(raw_value)
        elif kind == "redis" and (name in _redis_parameters() or name.startswith("ssl_")):
            rest.append(part)
        else:
            allowed = ", ".join(_OURS[kind]) + (", and redis-py's own (password, db, socket_timeout, ssl_*, ...)" if kind == "redis" else "")
            raise VLCacheError(f"{shown}: unknown query parameter {name!r}; a {kind} tier takes {allowed}")
    return ours, "&".join(rest)


def _budget(shown: str, text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return parse_bytes(text)
    except VLCacheError as err:
        raise VLCacheError(f"{shown}: budget: {err}") from None


def _mode(shown: str, text: str) -> int:
    digits = text[2:] if text.lower().startswith("0o") else text
    if not re.fullmatch(r"[0-7]{3,4}", digits):
        raise VLCacheError(f"{shown}: mode must be octal permission bits such as 0600, 0660 or 0664, got {text!r}")
    return int(digits, 8)


def parse_tier_url(url: str) -> TierSpec:
    """The `TierSpec` a tier URL describes (see the module's docstring); nothing is opened or connected."""
    if not isinstance(url, str):
        raise VLCacheError(f"a tier URL must be a string, got {type(url).__name__}")
    shown = redact_url(url)
    try:
        parts = urlsplit(url.strip())
    except ValueError as err:
        raise VLCacheError(f"{shown}: not a tier URL ({err})") from None
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        hint = f"; for a directory write disk://{url}" if url.startswith(("/", "~", ".")) else ""
        raise VLCacheError(
            f"{shown}: unknown tier URL scheme {parts.scheme + '://' if parts.scheme else '(none)'}; use one of "
            + ", ".join(f"{s}://" for s in _SCHEMES)
            + hint
        )
    kind = "memory" if scheme in _MEMORY_SCHEMES else "disk" if scheme == "disk" else "redis"
    ours, rest = _split_query(url, shown, kind, parts.query)
    budget = _budget(shown, ours.get("budget"))

    if kind == "redis":
        options: dict[str, Any] = {}
        if "prefix" in ours:
            if not ours["prefix"]:
                raise VLCacheError(f"{shown}: prefix must not be empty")
            options["prefix"] = ours["prefix"]
        if "ttl" in ours:
            if not ours["ttl"].isdigit() or int(ours["ttl"]) <= 0:
                raise VLCacheError(f"{shown}: ttl must be a positive number of seconds, got {ours['ttl']!r}")
            options["ttl"] = int(ours["ttl"])
        # the URL as written, less our parameters (urlunsplit would turn unix:///path into unix:/path)
        location = f"{parts.scheme}://{parts.netloc}{parts.path}" + (f"?{rest}" if rest else "")
        location += f"#{parts.fragment}" if parts.fragment else ""
        return TierSpec("redis", location, budget, options, redact_url(location))

    if parts.fragment:
        raise VLCacheError(f"{shown}: unexpected '#{parts.fragment}' (write '#' in a path as %23)")
    if kind == "disk":
        path = unquote(parts.netloc + parts.path)
        if not path:
            raise VLCacheError(f"{shown}: no directory; write disk:///absolute/path, disk://~/dir or disk://relative/dir")
        mode = _mode(shown, ours["mode"]) if "mode" in ours else None
        return TierSpec("disk", path, budget, {"mode": mode}, shown)

    # memory: memory://[device] or cpu://[budget] / gpu://[budget]
    if parts.path not in ("", "/"):
        raise VLCacheError(f"{shown}: a memory tier has no path")
    device = _MEMORY_SCHEMES[scheme]
    if scheme == "memory":
        if parts.netloc:
            try:
                device = str(torch.device(unquote(parts.netloc)))
            except RuntimeError:
                raise VLCacheError(f"{shown}: unknown device {parts.netloc!r}; use memory://cpu or memory://cuda") from None
    elif parts.netloc:
        if budget is not None:
            raise VLCacheError(f"{shown}: budget given twice (in the host part and as ?budget=)")
        budget = _budget(shown, unquote(parts.netloc))
    return TierSpec("memory", device, budget, {}, shown)


def tier_from_url(url: str) -> Tier:
    """A tier from its URL, e.g. `tier_from_url("disk:///data/vlcache?budget=50GiB&mode=0660")`."""
    return build_tier(parse_tier_url(url))


def keyword_specs(
    *,
    gpu: int | str | None = None,
    cpu: int | str | None = None,
    disk: str | None = None,
    disk_budget: int | str = DEFAULT_DISK_BUDGET,
    disk_mode: int | None = None,
    redis: str | None = None,
    redis_budget: int | str | None = None,
) -> list[TierSpec]:
    """The tiers `CacheStore(gpu=..., cpu=..., disk=..., redis=...)` describes, top-down."""
    specs: list[TierSpec] = []
    if gpu is not None:
        specs.append(TierSpec("memory", "cuda", parse_bytes(gpu), shown="CacheStore(gpu=...)"))
    if cpu is not None:
        specs.append(TierSpec("memory", "cpu", parse_bytes(cpu)))
    if disk is not None:
        specs.append(TierSpec("disk", disk, parse_bytes(disk_budget), {"mode": disk_mode}))
    elif disk_mode is not None:
        raise VLCacheError("disk_mode is a setting of the disk tier: give disk=... too")
    if redis is not None:
        spec = parse_tier_url(redis)
        if spec.kind != "redis":
            raise VLCacheError(f"redis={spec.shown!r} is not a Redis URL; write redis://host:6379/0")
        if redis_budget is not None:
            if spec.budget is not None:
                raise VLCacheError(f"{spec.shown}: budget given twice (?budget= and redis_budget=)")
            spec = TierSpec("redis", spec.location, parse_bytes(redis_budget), spec.options, spec.shown)
        specs.append(spec)
    elif redis_budget is not None:
        raise VLCacheError("redis_budget is a setting of the Redis tier: give redis=... too")
    return specs
