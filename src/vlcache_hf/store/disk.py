"""`DiskTier`: one safetensors file per entry in a directory that several processes may share.

Why each piece is there:
- safetensors, never pickle: loading a file cannot run code, and the header carries our metadata;
- a blake3 checksum of the tensor bytes in the header: a flipped byte or truncated file is detected on read
  and the file is removed (a miss), never handed back as K/V;
- write to a temp file in the same directory, fsync, `os.replace`: readers see a whole entry or none, even
  if the writer is killed mid-write;
- a `filelock` around budget accounting: processes sharing the directory never evict past each other;
- LRU by file modification time, touched on every hit.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path

import torch
from filelock import FileLock
from safetensors import safe_open
from safetensors.torch import save as save_bytes

from ..errors import VLCacheError
from .entry import StoredEntry
from .keys import digest, tensor_parts
from .tiers import TierStats

logger = logging.getLogger(__name__)

KEY_PATTERN = re.compile(r"^[a-z]+-[0-9a-f]{64}$")
SUFFIX = ".safetensors"
_CHECKSUM = "__checksum__"


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    parts: list = []
    for name in sorted(tensors):
        parts += [name, *tensor_parts(tensors[name])]
    return digest(*parts)


def header_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors blob, read from the same bytes as its tensors (one read, no race)."""
    size = int.from_bytes(data[:8], "little")
    return dict(json.loads(data[8 : 8 + size]).get("__metadata__") or {})


class DiskTier:
    """Entries as files under `path`, LRU within `byte_budget` bytes of files."""

    persistent = True  # written through by CacheStore, so entries survive restarts

    def __init__(self, path: str | os.PathLike, byte_budget: int, name: str | None = None):
        if byte_budget <= 0:
            raise ValueError(f"byte_budget must be positive, got {byte_budget}")
        self.path = Path(path).expanduser()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=self.path, prefix=".probe-", delete=True)
            probe.close()
        except OSError as err:
            raise VLCacheError(f"cannot use {self.path} as a disk cache directory: {err}") from err
        self.byte_budget = int(byte_budget)
        self.name = name or f"disk:{self.path}"
        self._lock = FileLock(str(self.path / ".lock"))
        self._stats = TierStats(self.name, byte_budget=self.byte_budget)

    def _file(self, key: str) -> Path:
        if not KEY_PATTERN.match(key):
            raise ValueError(f"invalid store key {key!r}")
        return self.path / f"{key}{SUFFIX}"

    def _drop(self, file: Path, reason: str) -> None:
        logger.warning("removing unreadable cache file %s: %s", file.name, reason)
        file.unlink(missing_ok=True)

    def get(self, key: str) -> StoredEntry | None:
        file = self._file(key)
        try:
            # one open: metadata and tensors come from the same file version even if a writer replaces it
            with safe_open(str(file), framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        except FileNotFoundError:
            self._stats.misses += 1
            return None
        except Exception as err:  # truncated or not a safetensors file
            self._drop(file, str(err))
            self._stats.misses += 1
            return None
        expected = metadata.pop(_CHECKSUM, None)
        if expected is None or checksum(tensors) != expected:
            self._drop(file, "checksum mismatch")
            self._stats.misses += 1
            return None
        os.utime(file)  # LRU: touched on every hit
        self._stats.hits += 1
        return StoredEntry(tensors, metadata)

    def put(self, key: str, entry: StoredEntry) -> list[tuple[str, StoredEntry]]:
        file = self._file(key)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in entry.tensors.items()}
        metadata = {**entry.metadata, _CHECKSUM: checksum(tensors)}
        data = save_bytes(tensors, metadata)
        self._stats.puts += 1
        if len(data) > self.byte_budget:
            return [(key, entry)]
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=".tmp-", suffix=SUFFIX)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            with self._lock:
                os.replace(tmp, file)
                self._evict_to_budget(keep=file)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return []

    def files(self) -> list[Path]:
        return [p for p in self.path.glob(f"*{SUFFIX}") if KEY_PATTERN.match(p.name[: -len(SUFFIX)])]

    def _evict_to_budget(self, keep: Path) -> None:
        entries = []
        for file in self.files():
            try:
                stat = file.stat()
            except FileNotFoundError:
                continue
            entries.append((stat.st_mtime, stat.st_size, file))
        used = sum(size for _, size, _ in entries)
        for _, size, file in sorted(entries, key=lambda item: item[0]):
            if used <= self.byte_budget:
                break
            if file == keep:
                continue
            file.unlink(missing_ok=True)
            used -= size
            self._stats.evictions += 1

    def contains(self, key: str) -> bool:
        return self._file(key).exists()

    def evict(self, key: str) -> bool:
        file = self._file(key)
        if not file.exists():
            return False
        file.unlink(missing_ok=True)
        self._stats.evictions += 1
        return True

    def keys(self) -> list[str]:
        return [p.name[: -len(SUFFIX)] for p in self.files()]

    def stats(self) -> TierStats:
        files = self.files()
        self._stats.entries = len(files)
        self._stats.bytes_used = sum(p.stat().st_size for p in files if p.exists())
        return TierStats(**vars(self._stats))
