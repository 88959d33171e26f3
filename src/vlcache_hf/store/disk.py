"""`DiskTier`: one safetensors file per entry in a directory that several processes (and users) may share.

Why each piece is there:
- the entry format of `store.codec` (shared with Redis): safetensors, never pickle, so loading a file cannot
  run code, and the header carries our metadata and a blake3 checksum of the tensor bytes: a flipped byte or
  truncated file is detected on read and is a miss, never handed back as K/V;
- the file is read into memory with one `read` (no mmap): a file truncated under us is a short read we
  detect, not a SIGBUS;
- write to a temp file in the same directory, fsync, `os.replace`: readers see a whole entry or none, even
  if the writer is killed mid-write;
- a corrupt file is unlinked only under the lock and only if it is still the very file version that was
  read (same inode, mtime and size): another process may have just replaced it with a valid entry;
- a file that vanishes between listing and reading (evicted by another process) is a plain miss;
- a `filelock` around budget accounting: processes sharing the directory never evict past each other;
- the bytes in the directory are kept in a small shared account file (`.usage`), updated under the lock by
  every put and removal, so a put costs O(1) instead of listing the directory: the directory is listed only
  when the account says the budget is passed (then entries are evicted oldest first and the account is set
  from the listing) and every `RESYNC_EVERY` puts of a process (files removed or added behind the account's
  back — an external `rm`, an older writer — are caught there);
- `mode`: files, the lock file and the directory are created with these permission bits (0o600, private,
  by default; 0o660 or 0o664 to share the directory within a Unix group, whose setgid bit keeps new files
  in the directory's group);
- LRU by file modification time, touched on every hit.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from ..errors import VLCacheError
from .codec import KEY_PATTERN, check_key, checksum, decode, encode, header_metadata
from .entry import StoredEntry
from .tiers import TierStats

__all__ = ["KEY_PATTERN", "PRIVATE_MODE", "SUFFIX", "TEMP_PREFIX", "DiskTier", "checksum", "decode", "header_metadata"]

logger = logging.getLogger(__name__)

SUFFIX = ".safetensors"
TEMP_PREFIX = ".tmp-"
PRIVATE_MODE = 0o600
USAGE_FILE = ".usage"
#: a process lists the directory to re-check the shared account after this many of its own puts
RESYNC_EVERY = 256


def check_mode(mode: int | None) -> int:
    """The file mode to use: owner read/write always, no execute bits; `None` is private (0o600)."""
    if mode is None:
        return PRIVATE_MODE
    if isinstance(mode, bool) or not isinstance(mode, int) or mode & ~0o666 or mode & 0o600 != 0o600:
        raise VLCacheError(
            f"invalid disk_mode {mode!r}: give file permission bits with owner read/write and no execute bits, "
            "e.g. 0o600 (private, the default), 0o660 (share within a group) or 0o664"
        )
    return mode


def directory_mode(file_mode: int) -> int:
    """Directory bits for files of `file_mode`: search (x) wherever read is allowed, setgid when shared."""
    bits = file_mode | 0o700
    for read, search in ((0o040, 0o010), (0o004, 0o001)):
        if file_mode & read:
            bits |= search
    return bits | (stat.S_ISGID if file_mode & 0o060 else 0)


@dataclass(frozen=True)
class FileVersion:
    """One read of an entry file: what it decoded to and which file version (inode, mtime, size) it was."""

    file: Path
    identity: tuple[int, int, int, int]
    entry: StoredEntry | None
    reason: str = ""


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


class DiskTier:
    """Entries as files under `path`, LRU within `byte_budget` bytes of files."""

    persistent = True  # written through by CacheStore, so entries survive restarts

    def __init__(self, path: str | os.PathLike, byte_budget: int, name: str | None = None, mode: int | None = None):
        if byte_budget <= 0:
            raise ValueError(f"byte_budget must be positive, got {byte_budget}")
        self.path = Path(path).expanduser()
        self.mode = check_mode(mode)
        self.byte_budget = int(byte_budget)
        self.name = name or f"disk:{self.path}"
        self._open_directory()
        self.lock = FileLock(str(self.path / ".lock"), mode=self.mode)  # held while files are replaced or evicted
        self._stats = TierStats(self.name, byte_budget=self.byte_budget)
        self._puts = 0  # own puts, for the periodic re-check of the shared account

    def _open_directory(self) -> None:
        """Create the directory (and lock file) with the tier's mode, and prove this user can write there."""
        try:
            created = not self.path.exists()
            self.path.mkdir(parents=True, exist_ok=True)
            if created or (self.mode != PRIVATE_MODE and self.path.stat().st_uid == os.geteuid()):
                os.chmod(self.path, directory_mode(self.mode))
            lock = self.path / ".lock"
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, self.mode)
            try:
                # widen only: a private tier (or `vlcache store`) opening a shared directory must not narrow it
                if self.mode != PRIVATE_MODE and os.fstat(fd).st_uid == os.geteuid():
                    os.fchmod(fd, self.mode)
            finally:
                os.close(fd)
            probe = tempfile.NamedTemporaryFile(dir=self.path, prefix=".probe-", delete=True)
            probe.close()
        except PermissionError as err:
            raise VLCacheError(
                f"cannot use {self.path} as a disk cache directory: it is not writable by this user "
                f"(uid {os.geteuid()}): {err}. To share one directory between users, let one member of a common "
                "group create it with CacheStore(disk=..., disk_mode=0o660) (DiskTier(mode=0o660)): the directory, "
                "lock file and entries are then group-writable; or give each user a directory of their own."
            ) from err
        except OSError as err:
            raise VLCacheError(f"cannot use {self.path} as a disk cache directory: {err}") from err

    def _file(self, key: str) -> Path:
        return self.path / f"{check_key(key)}{SUFFIX}"

    def read_version(self, key: str) -> FileVersion | None:
        """Read `key`'s file once; None if there is no such file (never was, or evicted meanwhile)."""
        file = self._file(key)
        try:
            with open(file, "rb") as handle:
                identity = _identity(os.fstat(handle.fileno()))
                data = handle.read()
        except FileNotFoundError:
            return None
        entry, reason = decode(data)
        return FileVersion(file, identity, entry, reason)

    def drop_if_unchanged(self, version: FileVersion) -> bool:
        """Unlink a file found corrupt, but only if it is still the version that was read: True if removed."""
        with self.lock:  # writers replace files under this lock, so the file cannot change between check and unlink
            try:
                current = version.file.stat()
                if _identity(current) != version.identity:
                    return False
                version.file.unlink()
            except FileNotFoundError:
                return False
            self._account_removed(current.st_size)
        logger.warning("removed corrupt cache file %s: %s", version.file.name, version.reason)
        return True

    def get(self, key: str) -> StoredEntry | None:
        version = self.read_version(key)
        if version is None or version.entry is None:
            if version is not None:
                try:
                    self.drop_if_unchanged(version)
                except OSError as err:  # e.g. a read-only directory: the corrupt file stays, the read is a miss
                    logger.debug("could not remove corrupt %s: %s", version.file.name, err)
            self._stats.misses += 1
            return None
        try:
            os.utime(version.file)  # LRU: touched on every hit
        except OSError:  # evicted meanwhile, or another user's file: the hit stands
            pass
        self._stats.hits += 1
        return version.entry

    def put(self, key: str, entry: StoredEntry) -> list[tuple[str, StoredEntry]]:
        file = self._file(key)
        data, _ = encode(entry)  # the checksum rides in the header: the file verifies itself
        self._stats.puts += 1
        if len(data) > self.byte_budget:
            return [(key, entry)]
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=TEMP_PREFIX, suffix=SUFFIX)
        try:
            if self.mode != PRIVATE_MODE:
                os.fchmod(fd, self.mode)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            with self.lock:
                try:
                    replaced = file.stat().st_size
                except FileNotFoundError:
                    replaced = 0
                os.replace(tmp, file)
                self._puts += 1
                used = self._read_usage()
                if used is None or self._puts % RESYNC_EVERY == 0:
                    used = sum(size for _, size, _ in self.scan())
                else:
                    used += len(data) - replaced
                if used > self.byte_budget:
                    used = self._evict_to_budget(keep=file)
                self._write_usage(used)
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        return []

    def scan(self) -> list[tuple[float, int, Path]]:
        """(mtime, size, file) of every entry file; files that vanish while listed are left out."""
        found = []
        try:
            listing = list(os.scandir(self.path))
        except FileNotFoundError:
            return []
        for item in listing:
            name = item.name
            if not (name.endswith(SUFFIX) and KEY_PATTERN.match(name[: -len(SUFFIX)])):
                continue
            try:
                st = item.stat()
            except FileNotFoundError:
                continue
            found.append((st.st_mtime, st.st_size, Path(item.path)))
        return found

    def files(self) -> list[Path]:
        return [file for _, _, file in self.scan()]

    def _evict_to_budget(self, keep: Path) -> int:
        """Evict least recently used files until the directory fits the budget (call under the lock); returns the
        bytes left, from a listing of the directory."""
        entries = self.scan()
        used = sum(size for _, size, _ in entries)
        for _, size, file in sorted(entries, key=lambda item: item[0]):
            if used <= self.byte_budget:
                break
            if file == keep:
                continue
            try:
                file.unlink()
                self._stats.evictions += 1
            except FileNotFoundError:
                pass
            used -= size
        return used

    def _read_usage(self) -> int | None:
        """The shared account of bytes in the directory (call under the lock); None if missing or unreadable."""
        try:
            text = (self.path / USAGE_FILE).read_text()
            value = int(text)
        except (OSError, ValueError):
            return None
        return value if value >= 0 else None

    def _write_usage(self, used: int) -> None:
        """Set the shared account (call under the lock): a whole small file, replaced atomically."""
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=TEMP_PREFIX, suffix=".usage")
        try:
            if self.mode != PRIVATE_MODE:
                os.fchmod(fd, self.mode)
            with os.fdopen(fd, "w") as handle:
                handle.write(str(max(0, used)))
            os.replace(tmp, self.path / USAGE_FILE)
        except OSError:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def _account_removed(self, size: int) -> None:
        """Take `size` bytes off the shared account after a removal (call under the lock)."""
        used = self._read_usage()
        if used is not None:
            self._write_usage(used - size)

    def remove_stale_temp_files(self, older_than: float = 3600.0) -> int:
        """Remove temp files of writers killed mid-write (older than `older_than` seconds); returns how many."""
        removed, now = 0, time.time()
        for file in self.path.glob(f"{TEMP_PREFIX}*"):
            try:
                if now - file.stat().st_mtime > older_than:
                    file.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    def contains(self, key: str) -> bool:
        return self._file(key).exists()

    def evict(self, key: str) -> bool:
        file = self._file(key)
        with self.lock:
            try:
                size = file.stat().st_size
                file.unlink()
            except FileNotFoundError:
                return False
            self._account_removed(size)
        self._stats.evictions += 1
        return True

    def keys(self) -> list[str]:
        return [file.name[: -len(SUFFIX)] for file in self.files()]

    def stats(self) -> TierStats:
        entries = self.scan()
        self._stats.entries = len(entries)
        self._stats.bytes_used = sum(size for _, size, _ in entries)
        return TierStats(**vars(self._stats))

    def check_health(self) -> None:
        """Raise OSError if entries cannot be written now: the directory is gone, not writable, or full."""
        if not self.path.is_dir():
            raise FileNotFoundError(errno.ENOENT, "cache directory is missing", str(self.path))
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "cache directory is not writable by this user", str(self.path))
        if os.statvfs(self.path).f_bavail == 0:
            raise OSError(errno.ENOSPC, "no space left on the cache's filesystem", str(self.path))

    def close(self) -> None:
        """Nothing to release: files are complete after every `put` and the lock is held only inside calls."""

    def __repr__(self) -> str:
        return f"DiskTier({str(self.path)!r}, byte_budget={self.byte_budget}, mode={oct(self.mode)})"
