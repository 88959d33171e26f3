"""Every supported model family on the same moved-image workload, through the same API.

For each family a random-weight toy model (built offline in seconds) first sees three pictures in one order,
then gets a new question with the pictures in another order. The table shows what VLCache reused and how far
naive reuse and the vlcache policy (5 % of the moved tokens recomputed) are from full recomputation
(first-token KL, averaged over a few requests; random weights make the numbers small — the ordering is the
point, see eval/fidelity.py for a trained model):

    python examples/model_families.py [--requests 4] [--out eval/results/model_families.md]
"""

from __future__ import annotations

import argparse
import platform
import random
import sys
from pathlib import Path
from statistics import mean

import torch
import transformers

from vlcache_hf import CacheStore, VLCache
from vlcache_hf.compat import with_cache
from vlcache_hf.models import get_adapter
from vlcache_hf.probe import Mode, chat_inputs, compare_modes, moved_image_request, warm_store
from vlcache_hf.tools import toy

MODES = [Mode("none", "none"), Mode("vlcache", "vlcache", 0.05)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=4, help="moved-image requests per family")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this Markdown file")
    args = parser.parse_args()

    lines = ["| family | model class | image tokens | encoder hits | KL naive | KL vlcache 5 % |", "|---|---|---|---|---|---|"]
    print("\n".join(lines))
    for family in toy.FAMILIES:
        model, processor = toy.build_model(family), toy.build_processor(family)
        size = 128 if family == "qwen3_vl" else 112  # Qwen3-VL's 16-px patches
        rng = random.Random(0)
        kls: dict[str, list[float]] = {mode.label: [] for mode in MODES}
        for index in range(args.requests):
            pictures = [toy.make_image(100 + 3 * index + k, size) for k in range(3)]
            request = moved_image_request(pictures, rng)
            _, results = compare_modes(model, processor, request, MODES)
            for result in results:
                kls[result.mode].append(result.kl)

        # what one moved request reuses: warm a store, then look at the probe's report
        store = CacheStore()
        warm_store(model, chat_inputs(processor, request.warmup), store)
        probe = chat_inputs(processor, request.probe)
        cache = VLCache(model, store=store, policy="vlcache", recompute_ratio=0.05)
        model.generate(**probe, max_new_tokens=1, do_sample=False, **with_cache(model, cache))
        report = cache.report
        lines.append(
            f"| {get_adapter(model).family} | {type(model).__name__} | {report.image_tokens} | "
            f"{report.encoder_hits}/{report.images} | {mean(kls['none']):.3e} | {mean(kls['vlcache']):.3e} |"
        )
        print(lines[-1])
    if args.out:
        header = [
            "# Every family on one moved-image workload (random-weight toys)",
            "",
            f"Command: `python examples/model_families.py {' '.join(sys.argv[1:])}` — {platform.machine()}, "
            f"torch {torch.__version__}, transformers {transformers.__version__}, float32; {args.requests} requests per family.",
            "",
        ]
        args.out.write_text("\n".join(header + lines) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
