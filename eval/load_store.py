"""Load run: several processes share one disk tier and one Redis under small byte budgets.

The entries are real: a toy Qwen2.5-VL (random weights) serves `--distinct` requests of two images each
once, and every entry those requests publish (encoder outputs, image K/V, prefix chunks) is kept as the
reference. Then `--procs` processes each run `--requests` "requests" through their own
`CacheStore([MemoryTier, DiskTier(shared dir), RedisTier(shared server)])`: a request looks up every entry
of one of the distinct requests (a hit must equal the reference bit for bit) and puts the ones that missed,
as `VLCache` does. Full `generate` in 4 processes would measure the 2-core CPU, not the store, so requests
are direct store calls on real entries. Measured: hits per tier, wrong entries, exceptions, and the peak
bytes of each shared tier against its budget — the disk directory listed under the tier's lock after
every request (what the tier guarantees) and without it (what another process may see mid-put), and
the Redis tier's own account against its budget, and Redis' `used_memory_peak` against `maxmemory`.

    python eval/load_store.py [--procs 4] [--requests 500] [--out eval/results/load_store.md]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from faults import RedisServer  # noqa: E402

from vlcache_hf import CacheStore, VLCache  # noqa: E402
from vlcache_hf.compat import with_cache  # noqa: E402
from vlcache_hf.store.disk import DiskTier  # noqa: E402
from vlcache_hf.store.entry import StoredEntry  # noqa: E402
from vlcache_hf.store.redis_tier import RedisTier  # noqa: E402
from vlcache_hf.store.tiers import MemoryTier  # noqa: E402
from vlcache_hf.tools import toy  # noqa: E402


def make_reference(path: Path, distinct: int) -> list[list[str]]:
    """Serve `distinct` requests once; store every published entry under `path`; the keys of each request."""
    model, processor = toy.build_model(), toy.build_processor()
    memory = MemoryTier(2**30, device="cpu")
    store = CacheStore([memory])
    reference = DiskTier(path, 2**40)
    groups: list[list[str]] = []
    for r in range(distinct):
        before = set(memory.keys())
        inputs = toy.chat_inputs(processor, [toy.message(
            "user", f"Request {r}: compare", toy.make_image(300 + 2 * r), "with", toy.make_image(301 + 2 * r), "?")])
        model.generate(**inputs, max_new_tokens=2, do_sample=False, **with_cache(model, VLCache(model, store=store)))
        keys = sorted(set(memory.keys()) - before)
        for key in keys:
            reference.put(key, memory.get(key))
        groups.append(keys)
    return groups


def same(a: StoredEntry, b: StoredEntry) -> bool:
    return a.metadata == b.metadata and a.tensors.keys() == b.tensors.keys() and all(
        torch.equal(a.tensors[k].cpu(), b.tensors[k]) for k in a.tensors)


def worker(args: dict, seed: int, queue, barrier) -> None:
    result = {"requests": 0, "lookups": 0, "hits": 0, "wrong": 0, "exceptions": 0, "examples": [],
              "disk_peak_locked": 0, "disk_peak_unlocked": 0, "hits_by_tier": {}}
    try:
        reference = DiskTier(args["reference"], 2**40)
        groups = args["groups"]
        entries = {key: reference.get(key) for group in groups for key in group}
        memory = MemoryTier(args["memory_budget"], device="cpu")
        disk = DiskTier(args["disk"], args["disk_budget"])
        redis = RedisTier(args["redis"], budget_bytes=args["redis_budget"])
        store = CacheStore([memory, disk, redis])
        rng = random.Random(seed)
        barrier.wait(300)
        started = time.time()
        for _ in range(args["requests"]):
            result["requests"] += 1
            group = groups[min(int(rng.paretovariate(1.2)) - 1, len(groups) - 1)]  # a few hot requests, a long tail
            try:
                for key in group:
                    result["lookups"] += 1
                    found = {tier.name.split(":")[0]: tier.contains(key) for tier in store.tiers}
                    got = store.get(key)
                    if got is None:
                        store.put(key, entries[key])
                        continue
                    result["hits"] += 1
                    top = next((name for name, present in found.items() if present), "?")
                    result["hits_by_tier"][top] = result["hits_by_tier"].get(top, 0) + 1
                    result["wrong"] += not same(got, entries[key])
                with disk.lock:
                    result["disk_peak_locked"] = max(result["disk_peak_locked"], sum(s for _, s, _ in disk.scan()))
                result["disk_peak_unlocked"] = max(result["disk_peak_unlocked"], sum(s for _, s, _ in disk.scan()))
            except Exception as err:  # counted: the run's claim is that there are none
                result["exceptions"] += 1
                if len(result["examples"]) < 3:
                    result["examples"].append(traceback.format_exception_only(err)[-1].strip())
        result["seconds"] = time.time() - started
        result["store_errors"] = {s.name.split(":")[0]: s.errors for s in store.stats()}
    except Exception as err:
        result["exceptions"] += 1
        result["examples"].append(f"setup: {err!r}")
    queue.put(result)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--distinct", type=int, default=24)
    parser.add_argument("--memory-budget", type=int, default=64 * 1024)
    parser.add_argument("--disk-budget", type=int, default=512 * 1024)
    parser.add_argument("--redis-maxmemory", type=int, default=4 * 2**20)
    parser.add_argument("--redis-budget", type=int, default=3 * 2**19, help="the Redis tier's own byte budget (below maxmemory)")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="vlcache-load-") as work:
        work_path = Path(work)
        groups = make_reference(work_path / "reference", args.distinct)
        sizes = [(work_path / "reference" / f"{k}.safetensors").stat().st_size for g in groups for k in g]
        server = RedisServer(work_path / "redis")
        redis_cli = ["redis-cli", "-p", str(server.port)]
        subprocess.run([*redis_cli, "config", "set", "maxmemory", str(args.redis_maxmemory)], capture_output=True)
        config = {"reference": str(work_path / "reference"), "groups": groups, "disk": str(work_path / "disk"),
                  "redis": server.url, "requests": args.requests, "memory_budget": args.memory_budget,
                  "disk_budget": args.disk_budget, "redis_budget": args.redis_budget}
        ctx = mp.get_context("spawn")
        queue, barrier = ctx.Queue(), ctx.Barrier(args.procs)
        procs = [ctx.Process(target=worker, args=(config, seed, queue, barrier)) for seed in range(args.procs)]
        for proc in procs:
            proc.start()
        results = [queue.get(timeout=3600) for _ in procs]
        for proc in procs:
            proc.join(60)
        info = subprocess.run([*redis_cli, "info", "memory"], capture_output=True, text=True).stdout
        info += subprocess.run([*redis_cli, "info", "stats"], capture_output=True, text=True).stdout
        fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
        redis_peak, redis_evicted = int(fields["used_memory_peak"]), int(fields["evicted_keys"])
        redis_tier = RedisTier(server.url, budget_bytes=args.redis_budget)
        redis_account_peak, redis_final = redis_tier.peak_bytes(), redis_tier.stats()
        server.kill()
    total = {k: sum(r[k] for r in results) for k in ("requests", "lookups", "hits", "wrong", "exceptions")}
    by_tier: dict[str, int] = {}
    for r in results:
        for tier, n in r["hits_by_tier"].items():
            by_tier[tier] = by_tier.get(tier, 0) + n
    summary = {
        **total,
        "hits_by_tier": by_tier,
        "disk_peak_locked": max(r["disk_peak_locked"] for r in results),
        "disk_peak_unlocked": max(r["disk_peak_unlocked"] for r in results),
        "disk_budget": args.disk_budget,
        "redis_used_memory_peak": redis_peak,
        "redis_maxmemory": args.redis_maxmemory,
        "redis_evicted_keys": redis_evicted,
        "redis_used_memory_startup": int(fields["used_memory_startup"]),
        "redis_tier_peak_bytes": redis_account_peak,
        "redis_tier_budget": args.redis_budget,
        "redis_tier_final": {"entries": redis_final.entries, "bytes": redis_final.bytes_used, "evictions_seen_here": redis_final.evictions},
        "memory_budget_per_process": args.memory_budget,
        "entries": len(sizes),
        "entry_bytes": {"min": min(sizes), "max": max(sizes), "total": sum(sizes)},
        "store_errors": [r.get("store_errors") for r in results],
        "examples": [e for r in results for e in r["examples"]][:5],
        "procs": args.procs,
        "seconds": round(max(r.get("seconds", 0.0) for r in results), 1),
    }
    text = json.dumps(summary, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(
            "# Store load run\n\n"
            f"`python eval/load_store.py --procs {args.procs} --requests {args.requests}` on {os.cpu_count()} CPU cores: "
            f"{args.procs} processes × {args.requests} requests sharing one disk tier and one Redis; each process "
            "has its own memory tier. Requests are direct `CacheStore` get/put calls on real entries of a toy "
            "Qwen2.5-VL (full `generate` in 4 processes would measure the CPU, not the store).\n\n"
            "| | value |\n|---|---|\n"
            f"| requests / lookups | {total['requests']} / {total['lookups']} |\n"
            f"| hits (memory / disk / redis) | {total['hits']} ({by_tier.get('memory', 0)} / {by_tier.get('disk', 0)} / "
            f"{by_tier.get('redis', 0)}) |\n"
            f"| wrong entries | {total['wrong']} |\n"
            f"| exceptions | {total['exceptions']} |\n"
            f"| disk peak bytes, listed under the lock / without it | {summary['disk_peak_locked']} / "
            f"{summary['disk_peak_unlocked']} (budget {args.disk_budget}) |\n"
            f"| Redis tier: peak bytes held (its account) | {redis_account_peak} (budget {args.redis_budget}) |\n"
            f"| Redis server: used_memory_peak | {redis_peak} (maxmemory {args.redis_maxmemory}, allkeys-lru; "
            f"{redis_evicted} keys evicted by Redis itself; {fields['used_memory_startup']} bytes at startup) |\n"
            f"| memory tier budget per process | {args.memory_budget} |\n"
            f"| distinct entries | {len(sizes)}, {min(sizes)}–{max(sizes)} bytes, {sum(sizes)} in all |\n"
            f"| run time (slowest process, after all started) | {summary['seconds']} s |\n\n"
            "The disk tier holds its budget: a put renames its file in and evicts under the directory's lock, so "
            "listed under the lock the directory is never over budget (listed without the lock, a reader could "
            "catch the moment between a put's rename and its eviction). The Redis tier holds its own budget: one "
            "Lua script evicts least-recently-used entries until a new one fits and writes it, atomically for all "
            "processes. Its budget sits below the server's `maxmemory`, so Redis — which checks `maxmemory` only "
            "before each command and can pass it by one write — never has to evict, and its own overhead has "
            "room: the server needs its startup memory plus ~60 % over the entries' bytes here (allocator size "
            "classes, per-key overhead of many small entries).\n\n"
            "```json\n" + text + "\n```\n"
        )
    within_budgets = (
        summary["disk_peak_locked"] <= args.disk_budget
        and redis_account_peak <= args.redis_budget
        and redis_peak <= args.redis_maxmemory
        and redis_evicted == 0
    )
    return 0 if total["wrong"] == 0 and total["exceptions"] == 0 and within_budgets else 1


if __name__ == "__main__":
    sys.exit(main())
