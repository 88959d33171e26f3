"""`vlcache store ls|stats|verify|gc --path DIR`: look after a disk cache directory.

Light at import (the parsers are built for `vlcache --help` without torch); the handlers import the store.
No command creates a missing directory: a wrong `--path` is an error, not a new empty cache.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import VLCacheError

if TYPE_CHECKING:
    from ..store.disk import DiskTier


def _tier(path: str) -> DiskTier:
    """The existing DiskTier directory at `path` (DiskTier itself would create a missing one)."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise VLCacheError(f"no cache directory at {path}")
    if not folder.is_dir():
        raise VLCacheError(f"{path} is not a directory")
    from ..store.disk import DiskTier

    return DiskTier(folder, 2**62)


def _progress(items, desc: str):
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="entry", disable=None)


def _files(tier: DiskTier) -> list[tuple[float, int, Path]]:
    """(mtime, size, file), least recently used first; files evicted by another process meanwhile are left out."""
    return sorted(tier.scan(), key=lambda item: item[0])


def cmd_ls(args: argparse.Namespace) -> int:
    tier = _tier(args.path)
    from ..store.disk import SUFFIX

    now = time.time()
    for mtime, size, file in _files(tier):
        key = file.name[: -len(SUFFIX)]
        print(f"{key.split('-')[0]:4s} {key}  {size / 2**20:9.2f} MiB  used {now - mtime:8.0f} s ago")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    tier = _tier(args.path)
    kinds: dict[str, list[int]] = {}
    for _, size, file in _files(tier):
        kinds.setdefault(file.name.split("-")[0], []).append(size)
    total = sum(sum(v) for v in kinds.values())
    for kind, sizes in sorted(kinds.items()):
        print(f"{kind:4s} {len(sizes):7d} entries {sum(sizes) / 2**20:10.2f} MiB")
    print(f"all  {sum(len(v) for v in kinds.values()):7d} entries {total / 2**20:10.2f} MiB in {tier.path}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Re-read every entry; unreadable or checksum-failing ones are removed by the tier's own read path."""
    tier = _tier(args.path)
    keys = tier.keys()
    bad = sum(tier.get(key) is None for key in _progress(keys, "verifying"))
    print(f"verified {len(keys)} entries: {len(keys) - bad} good, {bad} removed")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    """Trim to the budget under the tier's lock (safe while servers use the directory), and remove the temp
    files of writers killed mid-write."""
    from ..store.store import parse_bytes

    try:
        budget = parse_bytes(args.budget)
    except VLCacheError as err:
        raise VLCacheError(f"--budget: {err}") from None
    if args.temp_age < 0:
        raise VLCacheError(f"--temp-age must be >= 0 seconds, got {args.temp_age}")
    tier = _tier(args.path)
    stale = tier.remove_stale_temp_files(older_than=args.temp_age)
    removed = 0
    with tier.lock:
        files = _files(tier)
        used = sum(size for _, size, _ in files)
        for _, size, file in _progress(files, "trimming"):
            if used <= budget:
                break
            try:
                file.unlink()
                removed += 1
            except FileNotFoundError:  # another process evicted it first
                pass
            used -= size
    print(
        f"removed {removed} least recently used entries and {stale} stale temp files; {used / 2**20:.2f} MiB left "
        f"(budget {budget / 2**20:.2f} MiB)"
    )
    return 0


def add_store_commands(subparsers) -> None:
    store = subparsers.add_parser(
        "store", help="inspect and maintain a disk cache directory", description="Inspect and maintain a disk cache directory."
    )
    sub = store.add_subparsers(dest="store_command", required=True)
    for name, handler, text in (
        ("ls", cmd_ls, "list entries, least recently used first"),
        ("stats", cmd_stats, "entries and bytes per kind"),
        ("verify", cmd_verify, "re-check every checksum; remove bad entries"),
        ("gc", cmd_gc, "trim to a byte budget, least recently used first"),
    ):
        command = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        command.add_argument("--path", required=True, help="an existing DiskTier directory (never created)")
        if name == "gc":
            command.add_argument("--budget", required=True, help="a positive size, e.g. 10GiB or 500MB")
            command.add_argument("--temp-age", type=float, default=3600.0,
                                 help="remove temp files of killed writers older than this many seconds")
        command.set_defaults(handler=handler)
