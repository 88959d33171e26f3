"""DiskTier details that mutation testing (issue 17) found unchecked: modes, the shared account, eviction
boundaries, counters, temp files, health checks and messages. Expected values are written out by hand
(permission bits, byte counts, messages) or observed on disk (file sizes, file modes), never taken from the tier.

Root ignores permission bits, so the two conditions a root test cannot create for real (a directory this
user may not write, a full filesystem) are simulated at the OS call the tier makes (`tempfile`, `os.access`,
`os.statvfs`); everything else is real files in `tmp_path`.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
import tempfile
from pathlib import Path

import pytest
import torch

from vlcache_hf import VLCacheError
from vlcache_hf.store import disk as disk_module
from vlcache_hf.store.disk import DiskTier, check_mode, directory_mode
from vlcache_hf.store.entry import StoredEntry

MODE_MESSAGE = (
    "invalid disk_mode {!r}: give file permission bits with owner read/write and no execute bits, "
    "e.g. 0o600 (private, the default), 0o660 (share within a group) or 0o664"
)


def key(i: int) -> str:
    return f"kv-{i:064x}"


def entry(i: int, numel: int = 100) -> StoredEntry:
    return StoredEntry({"kv": torch.full((numel,), float(i))}, {"kind": "kv"})


def file_of(path: Path, i: int) -> Path:
    return path / f"{key(i)}.safetensors"


def mode_of(file: Path) -> int:
    return stat.S_IMODE(file.stat().st_mode)


def entry_size(tmp_path: Path, numel: int = 100) -> int:
    """The bytes one entry of `numel` floats takes on disk, measured on a scratch tier."""
    scratch = DiskTier(tmp_path / "scratch", 10**8)
    scratch.put(key(0), entry(0, numel))
    return file_of(scratch.path, 0).stat().st_size


def usage(path: Path) -> int:
    return int((path / ".usage").read_text())


def test_check_mode_by_hand():
    assert check_mode(None) == 0o600
    for good in (0o600, 0o640, 0o644, 0o660, 0o664, 0o666, 0o620, 0o602):
        assert check_mode(good) == good
    for bad in (True, False, "0o660", 384.0, 0o700, 0o601, 0o610, 0o400, 0o200, 0o060, 0o1600, 0o2660, 0o4600):
        with pytest.raises(VLCacheError) as raised:
            check_mode(bad)
        assert str(raised.value) == MODE_MESSAGE.format(bad)


def test_directory_mode_by_hand():
    # owner rwx always; group/other search wherever they may read; setgid when the group may read or write
    cases = {
        0o600: 0o700,
        0o660: 0o2770,
        0o664: 0o2775,
        0o640: 0o2750,
        0o644: 0o2755,
        0o620: 0o2720,
        0o604: 0o705,
        0o606: 0o707,
        0o602: 0o702,
    }
    for file_mode, expected in cases.items():
        assert directory_mode(file_mode) == expected, oct(file_mode)


def test_a_new_directory_is_made_with_its_parents_and_the_tiers_mode(tmp_path):
    private = DiskTier(tmp_path / "a" / "b" / "private", 1000)
    assert mode_of(private.path) == 0o700 and mode_of(private.path / ".lock") == 0o600
    assert sorted(p.name for p in private.path.iterdir()) == [".lock"]  # the write probe is gone
    shared = DiskTier(tmp_path / "c" / "shared", 1000, mode=0o664)
    assert mode_of(shared.path) == 0o2775  # setgid: new files keep the group
    assert mode_of(shared.path / ".lock") == 0o664
    assert shared.lock.lock_file == str(shared.path / ".lock")


def test_an_existing_directory_is_widened_for_a_shared_tier_and_never_narrowed(tmp_path):
    path = tmp_path / "existing"
    path.mkdir()
    os.chmod(path, 0o755)
    DiskTier(path, 1000)  # private: an existing directory is left as it is
    assert mode_of(path) == 0o755
    assert mode_of(path / ".lock") == 0o600
    DiskTier(path, 1000, mode=0o660)  # shared, and ours: directory and lock file are widened
    assert mode_of(path) == 0o2770
    assert mode_of(path / ".lock") == 0o660
    DiskTier(path, 1000)  # a private tier opening the shared directory does not narrow it
    assert mode_of(path) == 0o2770 and mode_of(path / ".lock") == 0o660


def test_shared_mode_reaches_every_file_the_tier_writes(tmp_path):
    shared = DiskTier(tmp_path / "shared", 10**6, mode=0o660)
    shared.put(key(1), entry(1))
    assert mode_of(file_of(shared.path, 1)) == 0o660 and mode_of(shared.path / ".usage") == 0o660
    (shared.path / ".lock").unlink()  # an operator cleans up: the lock file is made again with the tier's mode
    shared.put(key(2), entry(2))
    assert mode_of(shared.path / ".lock") == 0o660
    private = DiskTier(tmp_path / "private", 10**6)
    private.put(key(1), entry(1))
    assert mode_of(file_of(private.path, 1)) == 0o600 and mode_of(private.path / ".usage") == 0o600


def test_temp_files_live_in_the_cache_directory_under_the_temp_prefix(tmp_path, monkeypatch):
    """Temp files are made next to the entries (an atomic rename; `remove_stale_temp_files` finds a killed
    writer's leftovers by the `.tmp-` prefix), never in the system's temp directory."""
    tier = DiskTier(tmp_path / "store", 10**6)
    replaced = []
    real_replace = os.replace

    def recording_replace(src, dst):
        replaced.append((Path(src), Path(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-directory"))
    monkeypatch.setattr(os, "replace", recording_replace)
    tier.put(key(1), entry(1))
    DiskTier(tmp_path / "other", 10**6)  # the write probe, too, is made in the cache directory
    monkeypatch.undo()
    assert [dst.name for _, dst in replaced] == [f"{key(1)}.safetensors", ".usage"]
    assert all(src.parent == tier.path for src, _ in replaced)
    assert re.fullmatch(r"\.tmp-.+\.safetensors", replaced[0][0].name) and re.fullmatch(r"\.tmp-.+\.usage", replaced[1][0].name)


def test_an_unwritable_directory_is_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "theirs"
    real = tempfile.NamedTemporaryFile

    def refuse_inside(*args, dir=None, **kwargs):  # what the OS answers a user who may not write `path`
        if dir is not None and Path(dir) == path:
            raise PermissionError(errno.EACCES, "Permission denied", str(path / ".probe-x"))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", refuse_inside)
    with pytest.raises(VLCacheError) as raised:
        DiskTier(path, 1000)
    err = f"[Errno 13] Permission denied: '{path / '.probe-x'}'"
    assert str(raised.value) == (
        f"cannot use {path} as a disk cache directory: it is not writable by this user (uid {os.geteuid()}): {err}. "
        "To share one directory between users, let one member of a common group create it with "
        "CacheStore(disk=..., disk_mode=0o660) (DiskTier(mode=0o660)): the directory, lock file and entries are "
        "then group-writable; or give each user a directory of their own."
    )


def test_budget_name_repr_and_counters(tmp_path):
    for bad in (0, -5):
        with pytest.raises(ValueError) as raised:
            DiskTier(tmp_path, bad)
        assert str(raised.value) == f"byte_budget must be positive, got {bad}"
    assert DiskTier(tmp_path / "one", 1).byte_budget == 1
    tier = DiskTier(tmp_path / "t", 10**6)
    assert repr(tier) == f"DiskTier({str(tmp_path / 't')!r}, byte_budget=1000000, mode=0o600)"
    assert repr(DiskTier(tmp_path / "s", 5, mode=0o660)) == f"DiskTier({str(tmp_path / 's')!r}, byte_budget=5, mode=0o660)"
    assert DiskTier(tmp_path / "n", 10, name="mine").stats().name == "mine"
    for i in range(3):
        tier.put(key(i), entry(i))
    for i in (0, 1, 5, 6, 7):
        tier.get(key(i))
    assert tier.evict(key(0)) and tier.evict(key(1)) and not tier.evict(key(1))
    stats = tier.stats()
    assert (stats.name, stats.byte_budget, stats.puts, stats.hits, stats.misses, stats.evictions) == (
        f"disk:{tmp_path / 't'}", 10**6, 3, 2, 3, 2
    )
    assert stats.entries == 1


def test_an_entry_of_exactly_the_budget_is_stored(tmp_path):
    size = entry_size(tmp_path)
    tier = DiskTier(tmp_path / "exact", size)
    assert tier.put(key(1), entry(1)) == []
    assert tier.contains(key(1)) and usage(tier.path) == size
    small = DiskTier(tmp_path / "small", size - 1)
    assert small.put(key(1), entry(1))[0][0] == key(1) and not small.contains(key(1))


def test_eviction_stops_once_the_directory_fits_exactly(tmp_path):
    size = entry_size(tmp_path)
    tier = DiskTier(tmp_path / "t", 2 * size)
    for i in range(2):
        tier.put(key(i), entry(i))
        os.utime(file_of(tier.path, i), (1_000_000 + i, 1_000_000 + i))
    tier.put(key(2), entry(2))  # three entries in a budget of two: only the oldest goes
    assert sorted(tier.keys()) == [key(1), key(2)] and usage(tier.path) == 2 * size
    tier.put(key(3), entry(3))
    tier.put(key(4), entry(4))
    assert tier.stats().evictions == 3


def test_the_new_entry_is_kept_even_when_its_file_is_the_oldest(tmp_path):
    """The file just written is never evicted for itself, even if the others look newer (their times set in
    the future, as a clock step or another host's clock can make them)."""
    size = entry_size(tmp_path)
    tier = DiskTier(tmp_path / "t", 2 * size)
    for i in range(2):
        tier.put(key(i), entry(i))
        os.utime(file_of(tier.path, i), (4_000_000_000 + i, 4_000_000_000 + i))
    tier.put(key(2), entry(2))
    assert sorted(tier.keys()) == [key(1), key(2)] and tier.stats().evictions == 1


def test_the_account_is_trusted_between_resyncs_and_listed_every_256_puts(tmp_path):
    size = entry_size(tmp_path, numel=4)
    tier = DiskTier(tmp_path / "t", 10**8)
    tier.put(key(0), entry(0, 4))
    assert usage(tier.path) == size
    (tier.path / ".usage").write_text(str(size + 1000))  # 1000 bytes counted that are not there
    for i in range(1, 255):
        tier.put(key(i), entry(i, 4))
    assert usage(tier.path) == 255 * size + 1000  # 255 puts: the account is added to, never listed
    tier.put(key(255), entry(255, 4))  # this tier's 256th put lists the directory
    assert usage(tier.path) == 256 * size
    (tier.path / ".usage").write_text("0")  # an account of zero is an account, not a missing one
    tier.put(key(1000), entry(1000, 4))
    assert usage(tier.path) == size


def test_a_negative_or_unreadable_account_is_set_from_a_listing(tmp_path):
    size = entry_size(tmp_path)
    tier = DiskTier(tmp_path / "t", 10**6)
    tier.put(key(0), entry(0))
    for bad in ("-5", "lots", None):
        if bad is None:
            (tier.path / ".usage").unlink()
        else:
            (tier.path / ".usage").write_text(bad)
        tier.put(key(1), entry(1))
        assert usage(tier.path) == 2 * size
    assert tier.evict(key(0)) and tier.evict(key(1)) and usage(tier.path) == 0


def test_an_account_at_the_budget_on_paper_evicts_nothing(tmp_path):
    size = entry_size(tmp_path)
    tier = DiskTier(tmp_path / "t", 10 * size)
    tier.put(key(0), entry(0))
    (tier.path / ".usage").write_text(str(9 * size))  # on paper, the next entry fills the budget exactly
    tier.put(key(1), entry(1))
    assert usage(tier.path) == 10 * size and sorted(tier.keys()) == [key(0), key(1)]


def test_a_failed_account_write_leaves_no_temp_file(tmp_path, monkeypatch):
    tier = DiskTier(tmp_path / "t", 10**6)
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(dst).endswith(".usage"):
            raise OSError(errno.EIO, "I/O error")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError) as raised:
        tier.put(key(1), entry(1))
    monkeypatch.undo()
    assert raised.value.errno == errno.EIO
    assert sorted(p.name for p in tier.path.iterdir()) == [".lock", f"{key(1)}.safetensors"]


def test_corrupt_file_removal_reports_what_it_did(tmp_path, caplog):
    tier = DiskTier(tmp_path, 10**6)
    tier.put(key(1), entry(1))
    file = file_of(tmp_path, 1)
    good = file.read_bytes()
    file.write_bytes(good[:-10])
    read = tier.read_version(key(1))
    assert read.entry is None and isinstance(read.reason, str) and read.reason
    tier.put(key(1), entry(1))  # replaced meanwhile: not removed
    assert tier.drop_if_unchanged(read) is False and file.exists()
    file.unlink()  # gone meanwhile: nothing removed
    assert tier.drop_if_unchanged(read) is False
    file.write_bytes(good[:-10])
    read = tier.read_version(key(1))
    with caplog.at_level(logging.WARNING, logger="vlcache_hf"):
        assert tier.drop_if_unchanged(read) is True and not file.exists()
    assert [r.getMessage() for r in caplog.records] == [f"removed corrupt cache file {file.name}: {read.reason}"]


def test_a_corrupt_file_that_cannot_be_removed_is_a_logged_miss(tmp_path, caplog, monkeypatch):
    tier = DiskTier(tmp_path, 10**6)
    tier.put(key(1), entry(1))
    file_of(tmp_path, 1).write_bytes(b"garbage")
    failure = PermissionError(errno.EROFS, "Read-only file system")

    def refuse(version):
        raise failure

    monkeypatch.setattr(tier, "drop_if_unchanged", refuse)
    with caplog.at_level(logging.DEBUG, logger="vlcache_hf"):
        assert tier.get(key(1)) is None
    assert [r.getMessage() for r in caplog.records] == [f"could not remove corrupt {key(1)}.safetensors: {failure}"]
    assert tier.stats().misses == 1


def test_health_checks_name_the_problem(tmp_path, monkeypatch):
    path = tmp_path / "t"
    tier = DiskTier(path, 10**6)
    assert tier.check_health() is None
    monkeypatch.setattr(os, "statvfs", lambda p: os.statvfs_result((4096,) * 4 + (1,) + (0,) * 6))  # one block free
    assert tier.check_health() is None
    monkeypatch.setattr(os, "statvfs", lambda p: os.statvfs_result((4096,) * 4 + (0,) + (0,) * 6))  # none free
    with pytest.raises(OSError) as raised:
        tier.check_health()
    assert (raised.value.errno, raised.value.strerror, raised.value.filename) == (
        errno.ENOSPC, "no space left on the cache's filesystem", str(path)
    )
    monkeypatch.undo()
    monkeypatch.setattr(os, "access", lambda p, mode: not mode & (os.W_OK | os.X_OK))  # may look, not write
    with pytest.raises(PermissionError) as raised:
        tier.check_health()
    monkeypatch.undo()
    assert (raised.value.errno, raised.value.strerror, raised.value.filename) == (
        errno.EACCES, "cache directory is not writable by this user", str(path)
    )
    for name in os.listdir(path):
        os.unlink(path / name)
    path.rmdir()
    with pytest.raises(FileNotFoundError) as raised:
        tier.check_health()
    assert (raised.value.errno, raised.value.strerror, raised.value.filename) == (
        errno.ENOENT, "cache directory is missing", str(path)
    )


def test_stale_temp_files_by_age_and_count(tmp_path, monkeypatch):
    tier = DiskTier(tmp_path, 10**6)
    now = 2_000_000_000.0
    ages = {".tmp-a.safetensors": 3600.5, ".tmp-b.safetensors": 5000.0, ".tmp-c.usage": 3601.0,
            ".tmp-young.safetensors": 3599.0, ".tmp-edge.safetensors": 100.0}
    for name, age in ages.items():
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, ns=(int((now - age) * 1e9),) * 2)
    for i in range(4):  # writers' leftovers that vanish while listed (dangling links stand for them)
        os.symlink(tmp_path / f"gone-{i}", tmp_path / f".tmp-gone-{i}")
    monkeypatch.setattr(disk_module.time, "time", lambda: now)
    assert tier.remove_stale_temp_files() == 3  # the default is one hour
    left = sorted(p.name for p in tmp_path.glob(".tmp-*") if p.exists())
    assert left == [".tmp-edge.safetensors", ".tmp-young.safetensors"]
    assert tier.remove_stale_temp_files(older_than=100.0) == 1  # exactly 100 s old is not older than 100 s
    assert sorted(p.name for p in tmp_path.glob(".tmp-*") if p.exists()) == [".tmp-edge.safetensors"]
    assert tier.remove_stale_temp_files(older_than=99.0) == 1


def test_only_entry_files_are_listed(tmp_path):
    """Temp files and other names are not entries; an entry that vanishes while listed (a dangling link stands
    for one another process evicted) is left out, and the listing goes on past it."""
    tier = DiskTier(tmp_path, 10**6)
    for i in range(6):
        (tmp_path / f".tmp-{i}.safetensors").write_bytes(b"partial")
        (tmp_path / f"notes-{i}.txt").write_text("x")
        os.symlink(tmp_path / f"gone-{i}", file_of(tmp_path, 100 + i))
        tier.put(key(i), entry(i))
    assert sorted(tier.keys()) == [key(i) for i in range(6)]
    assert tier.stats().entries == 6
