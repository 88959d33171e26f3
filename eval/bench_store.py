"""Store throughput, measured side by side in one run.

Disk (warm page cache): `DiskTier.get` (one safe_open, blake3 over every byte) against a plain `safetensors.torch.load_file` of the same file.
Redis: `RedisTier.put` + `get` round trips against a redis-server this script starts on 127.0.0.1.

    python eval/bench_store.py [--mib 64] [--entries 4] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from vlcache_hf.store.disk import SUFFIX, DiskTier
from vlcache_hf.store.entry import StoredEntry
from vlcache_hf.timing import median_seconds


def _entries(count: int, mib: int) -> dict[str, StoredEntry]:
    numel = mib * 2**20 // 4
    return {f"kv-{i:064x}": StoredEntry({"kv": torch.randn(numel)}, {"kind": "kv"}) for i in range(count)}


def bench_disk(entries: dict[str, StoredEntry], repeats: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as path:
        tier = DiskTier(path, 2**40)
        for key, entry in entries.items():
            tier.put(key, entry)
        total = sum(Path(path, f"{k}{SUFFIX}").stat().st_size for k in entries)
        # load_file memory-maps lazily; clone() makes it read the bytes, as our tier does
        plain = median_seconds(
            lambda: [{n: t.clone() for n, t in load_file(str(Path(path, f"{k}{SUFFIX}"))).items()} for k in entries],
            repeats,
        )
        ours = median_seconds(lambda: [tier.get(k) for k in entries], repeats)
    return {"bytes": total, "safetensors_load_file_gbps": total / plain / 1e9, "disk_tier_get_gbps": total / ours / 1e9}


def bench_redis(entries: dict[str, StoredEntry], repeats: int) -> dict[str, float] | None:
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    from vlcache_hf.store.redis_tier import RedisTier

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        tier = RedisTier(f"redis://127.0.0.1:{port}/0")
        total = sum(e.nbytes for e in entries.values())
        put = median_seconds(lambda: [tier.put(k, e) for k, e in entries.items()], repeats)
        get = median_seconds(lambda: [tier.get(k) for k in entries], repeats)
        return {"bytes": total, "put_gbps": total / put / 1e9, "get_gbps": total / get / 1e9}
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64, help="size of each entry")
    parser.add_argument("--entries", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="eval/results/bench_store.json")
    args = parser.parse_args()
    entries = _entries(args.entries, args.mib)
    disk = bench_disk(entries, args.repeats)
    redis = bench_redis(entries, args.repeats)
    print(f"| what | GB/s ({args.entries} × {args.mib} MiB, median of {args.repeats}) |\n|---|---|")
    print(f"| safetensors.torch.load_file + materialize (page cache) | {disk['safetensors_load_file_gbps']:.2f} |")
    print(f"| DiskTier.get (safe_open + blake3 checksum of every byte) | {disk['disk_tier_get_gbps']:.2f} |")
    if redis:
        print(f"| RedisTier.put (loopback) | {redis['put_gbps']:.2f} |\n| RedisTier.get (loopback) | {redis['get_gbps']:.2f} |")
    else:
        print("| Redis | skipped: redis-server not installed |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "disk": disk, "redis": redis}, indent=2))


if __name__ == "__main__":
    main()
