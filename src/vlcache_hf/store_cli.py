"""`vlcache store ls|stats|verify|gc --path DIR`: look after a disk cache directory."""

from __future__ import annotations

import argparse
import os
import time

from tqdm import tqdm

from .store.disk import SUFFIX, DiskTier
from .store.store import parse_bytes


def _tier(path: str) -> DiskTier:
    return DiskTier(path, 2**62)


def _files(tier: DiskTier):
    return sorted(tier.files(), key=lambda p: p.stat().st_mtime)


def cmd_ls(args: argparse.Namespace) -> int:
    tier = _tier(args.path)
    now = time.time()
    for file in _files(tier):
        stat = file.stat()
        key = file.name[: -len(SUFFIX)]
        print(f"{key.split('-')[0]:4s} {key}  {stat.st_size / 2**20:9.2f} MiB  used {now - stat.st_mtime:8.0f} s ago")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    tier = _tier(args.path)
    kinds: dict[str, list[int]] = {}
    for file in _files(tier):
        kinds.setdefault(file.name.split("-")[0], []).append(file.stat().st_size)
    total = sum(sum(v) for v in kinds.values())
    for kind, sizes in sorted(kinds.items()):
        print(f"{kind:4s} {len(sizes):7d} entries {sum(sizes) / 2**20:10.2f} MiB")
    print(f"all  {sum(len(v) for v in kinds.values()):7d} entries {total / 2**20:10.2f} MiB in {tier.path}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Re-read every entry; unreadable or checksum-failing ones are removed by the tier's own read path."""
    tier = _tier(args.path)
    keys = tier.keys()
    bad = sum(tier.get(key) is None for key in tqdm(keys, desc="verifying", unit="entry", disable=None))
    print(f"verified {len(keys)} entries: {len(keys) - bad} good, {bad} removed")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    tier = _tier(args.path)
    budget = parse_bytes(args.budget)
    files = _files(tier)
    used = sum(f.stat().st_size for f in files)
    removed = 0
    for file in tqdm(files, desc="trimming", unit="entry", disable=None):
        if used <= budget:
            break
        size = file.stat().st_size
        os.unlink(file)
        used, removed = used - size, removed + 1
    print(f"removed {removed} least recently used entries; {used / 2**20:.2f} MiB left (budget {budget / 2**20:.2f} MiB)")
    return 0


def add_store_commands(subparsers) -> None:
    store = subparsers.add_parser("store", help="inspect and maintain a disk cache directory")
    sub = store.add_subparsers(dest="store_command", required=True)
    for name, handler, text in (
        ("ls", cmd_ls, "list entries, least recently used first"),
        ("stats", cmd_stats, "entries and bytes per kind"),
        ("verify", cmd_verify, "re-check every checksum; remove bad entries"),
        ("gc", cmd_gc, "trim to a byte budget, least recently used first"),
    ):
        command = sub.add_parser(name, help=text)
        command.add_argument("--path", required=True, help="the DiskTier directory")
        if name == "gc":
            command.add_argument("--budget", required=True, help="e.g. 10GiB")
        command.set_defaults(handler=handler)
