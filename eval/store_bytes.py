"""Bytes a request leaves in the store, against what it computed: its K/V plus its encoder outputs.

    python eval/store_bytes.py [--out eval/results/store_bytes.md]

Each scenario starts from an empty memory store, serves its requests through `VLCache`, and reads
`store.stats()`: bytes held per entry kind (encoder outputs, image K/V, prefix chunks, aliases) against the
prompt's K/V (tokens × bytes per token, from the model's KV layout) plus the encoder outputs' bytes. A row
stored twice (an image's K/V inside a prefix chunk *and* as an image entry) shows as a ratio above 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from vlcache_hf import CacheStore, VLCache
from vlcache_hf.compat import with_cache
from vlcache_hf.models import get_adapter
from vlcache_hf.store.keys import ENCODER_KIND
from vlcache_hf.tools import toy

#: a LLaVA-1.5-7B-shaped decoder cut to 2 layers (as issue 18 measured), and the default toy Qwen2.5-VL
SHAPES = {
    "qwen2_5_vl toy": ("qwen2_5_vl", toy.TINY, 112),
    "qwen2_5_vl medium": ("qwen2_5_vl", toy.MEDIUM, 448),
}


def bytes_by_kind(store: CacheStore) -> dict[str, int]:
    tier = store.tiers[0]
    totals: dict[str, int] = {}
    for key in tier.keys():
        entry = tier.get(key)
        kind = key.split("-")[0]
        totals[kind] = totals.get(kind, 0) + entry.nbytes
    return totals


def measure(label: str, family: str, size: toy.ToySize, image_px: int) -> dict:
    torch.manual_seed(0)
    model = toy.build_model(family, size)
    processor = toy.build_processor(family, max_pixels=image_px * image_px, min_pixels=56 * 56)
    images = [toy.make_image(seed, image_px) for seed in range(2)]
    inputs = toy.chat_inputs(processor, [toy.message("user", "Compare the two pictures.", images[0], images[1], "Which is brighter?")])
    store = CacheStore()
    cache = VLCache(model, store=store)
    model.generate(**inputs, max_new_tokens=1, do_sample=False, **with_cache(model, cache))
    kinds = bytes_by_kind(store)
    prompt_tokens = int(inputs["input_ids"].shape[1])
    kv_bytes = (prompt_tokens - 1) * get_adapter(model).kv_layout.bytes_per_token()  # the last token is not prefilled
    encoder_bytes = kinds.get(ENCODER_KIND, 0)
    stored = sum(store.stats()[0].bytes_used for _ in [0])
    return {
        "scenario": label,
        "prompt_tokens": prompt_tokens,
        "kv_bytes": kv_bytes,
        "encoder_bytes": encoder_bytes,
        "stored_bytes": stored,
        "by_kind": kinds,
        "ratio": stored / (kv_bytes + encoder_bytes),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = [measure(label, *shape) for label, shape in SHAPES.items()]
    lines = [
        "| scenario | prompt tokens | K/V bytes | encoder bytes | stored bytes | by kind | stored / (K/V + encoder) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(r["by_kind"].items()))
        lines.append(f"| {r['scenario']} | {r['prompt_tokens']} | {r['kv_bytes']} | {r['encoder_bytes']} | {r['stored_bytes']} | {kinds} | {r['ratio']:.2f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text("# Bytes stored per request\n\n`python eval/store_bytes.py --out " + str(args.out) + "`: one request "
                            "(two images) into an empty memory store.\n\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
