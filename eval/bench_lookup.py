"""Store lookup cost against store size: does a request's planning and lookup time grow with what is stored?

    python eval/bench_lookup.py [--sizes 10,100,1000,10000] [--out eval/results/lookup_sweep.md]

For each size N, a store (memory tier over a disk tier, write-behind flushed) holds N entries of other images
(real entries: encoder outputs and K/V of the toy model's kind and shape, under keys of other contents), plus
what one chat turn published. Then the next turn of that chat is served through `VLCache` (policy "none")
`--repeats` times, each from a copy of the memory tier so no repetition profits from the one before, and the
engine's own timings are read from the report: store load (lookups and copies), the planning and hashing
before it, and TTFT. A store whose lookups scale with N would show it here; the goal is flat.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import torch
from tqdm import tqdm

from vlcache_hf import CacheStore, VLCache
from vlcache_hf.compat import with_cache
from vlcache_hf.store.entry import StoredEntry
from vlcache_hf.store.keys import ENCODER_KIND, KV_KIND, entry_key
from vlcache_hf.store.tiers import MemoryTier
from vlcache_hf.tools import toy


def filler(store: CacheStore, count: int, kv_shape: tuple[int, ...], fingerprint: str) -> None:
    """`count` entries of other contents: half encoder outputs, half image K/V, of realistic shapes."""
    kv = torch.zeros(kv_shape)
    embeddings = torch.zeros(16, 64)
    for i in tqdm(range(count), desc=f"filling {count}", unit="entry", leave=False):
        kind = ENCODER_KIND if i % 2 else KV_KIND
        key = entry_key(kind, fingerprint, f"filler-{i}")
        tensors = {"embeddings": embeddings} if kind == ENCODER_KIND else {"kv": kv, "positions": torch.zeros(3, kv_shape[3], dtype=torch.long)}
        store.put(key, StoredEntry(tensors, {"kind": "filler"}))
    store.flush()


def measure(count: int, repeats: int, work: Path) -> dict:
    model, processor = toy.build_model(), toy.build_processor()
    images = [toy.make_image(seed) for seed in range(2)]
    turn1 = [toy.message("user", "Two pictures:", images[0], images[1], "Describe the first.")]
    turn2 = [*turn1, toy.message("assistant", "Blocks of colour."), toy.message("user", "And the second?")]
    first, second = toy.chat_inputs(processor, turn1), toy.chat_inputs(processor, turn2)
    memory = MemoryTier(2**34)
    store = CacheStore([memory, f"disk://{work / f'disk-{count}'}?budget=64GiB"])
    cache = VLCache(model, store=store)
    model.generate(**first, max_new_tokens=1, do_sample=False, **with_cache(model, cache))
    layout = cache.adapter.kv_layout
    filler(store, count, (layout.num_layers, 2, layout.num_kv_heads, 16, layout.head_dim), cache.fingerprint)
    snapshot = dict(memory._entries)
    loads, hashing, ttfts = [], [], []
    for _ in range(repeats + 1):
        memory._entries.clear()
        memory._entries.update(snapshot)
        cache = VLCache(model, store=store)
        start = time.perf_counter()
        model.generate(**second, max_new_tokens=1, do_sample=False, **with_cache(model, cache))
        ttfts.append(time.perf_counter() - start)
        t = cache.report.timings
        loads.append(t.store_load_s)
        hashing.append(t.total_s - t.encoder_s - t.store_load_s - t.rerotation_s - t.prefill_s - t.publish_s)
    store.flush()
    return {
        "stored": len(snapshot),
        "store_load_ms": median(loads[1:]) * 1e3,
        "plan_and_hash_ms": median(hashing[1:]) * 1e3,
        "ttft_ms": median(ttfts[1:]) * 1e3,
        "prefix_tokens": cache.report.prefix_tokens,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10,100,1000,10000")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="vlcache-lookup-") as work:
        for size in [int(s) for s in args.sizes.split(",")]:
            rows.append({"filler": size, **measure(size, args.repeats, Path(work))})
            print(rows[-1], flush=True)
    lines = ["| entries in the store | store load ms | planning + hashing ms | TTFT ms | prefix reused |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['stored']} | {r['store_load_ms']:.2f} | {r['plan_and_hash_ms']:.2f} | {r['ttft_ms']:.1f} | {r['prefix_tokens']} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        command = "python eval/bench_lookup.py " + " ".join(argv if argv is not None else sys.argv[1:])
        args.out.write_text(
            "# Store lookup cost against store size\n\n"
            f"`{command}` (CPU, 1 thread; toy Qwen2.5-VL; memory tier over a disk tier; median of {args.repeats}).\n"
            "A chat's second turn, served with policy \"none\" from a store that also holds N entries of other "
            "images. Store load = the engine's lookups and copies; planning + hashing = the rest of the engine "
            "outside encoder, re-rotation, prefill and publish.\n\n" + table + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
