"""Fidelity report on the embedded trained model: answer accuracy of every reuse mode on the synthetic
multi-image VQA test split, when the images were first seen in another context (non-prefix reuse).

For each test item the images are first shown after another preamble, in another order (their encoder
outputs and K/V go to a fresh store), then the item's question is asked. Modes: full recomputation (the
reference), exact prefix reuse only, naive reuse, and first_k / cacheblend / vlcache / random at budgets
1, 2, 5, 10, 20 %. Per mode: accuracy, agreement of the whole greedy answer with full recomputation,
KL(full ‖ mode) of the first answer token, recomputed share of the moved tokens.

    python eval/fidelity.py --items 400            # ~6 min on 2 CPU cores
    python eval/fidelity.py --items 20 --name fidelity_smoke

Writes eval/results/<name>.json, .md and .png (accuracy and KL vs budget, one line per policy).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from collections import defaultdict
from pathlib import Path
from statistics import mean

import torch
import transformers
from tqdm import tqdm

from vlcache_hf import synthetic
from vlcache_hf.calibration import calibrate
from vlcache_hf.fidelity import compare_modes, moved_image_request, standard_modes
from vlcache_hf.pretrained import load_default

RESULTS = Path(__file__).resolve().parent / "results"
POLICIES = ["vlcache", "first_k", "cacheblend", "random"]
BUDGETS = [0.01, 0.02, 0.05, 0.1, 0.2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=400, help="test items (the first N of the test split)")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--budgets", default=",".join(f"{b:g}" for b in BUDGETS))
    parser.add_argument("--calibrate", type=int, default=16, help="calibration samples from the train split (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="fidelity_trained")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    policies = [p for p in args.policies.split(",") if p]
    budgets = [float(b) for b in args.budgets.split(",") if b]
    model, processor = load_default()

    profile = None
    if args.calibrate:
        calib_items = synthetic.make_split("train", 50_000 + args.calibrate)[50_000:]
        samples = [[synthetic.render(s) for s in item.scenes] for item in calib_items]
        profile = calibrate(model, processor, samples, seed=args.seed)
    modes = standard_modes(policies, budgets)
    items = synthetic.make_split("test", args.items)
    rng = random.Random(args.seed)
    rows, started = [], time.perf_counter()
    for item in tqdm(items, desc="fidelity", unit="item"):
        images = [synthetic.render(s) for s in item.scenes]
        request = moved_image_request(images, rng, probe=synthetic.messages(item, images))
        full_answer, results = compare_modes(model, processor, request, modes, profile=profile, max_new_tokens=2)
        rows.append({"mode": "full", "correct": full_answer == item.answer, "answer_agree": True, "kl": 0.0, "recomputed_fraction": 1.0, "kind": item.kind})
        for r in results:
            rows.append({
                "mode": r.mode, "correct": r.answer == item.answer, "answer_agree": r.answer_agree,
                "kl": r.kl, "recomputed_fraction": r.recomputed_fraction, "kind": item.kind,
            })
    by_mode = defaultdict(list)
    for row in rows:
        by_mode[row["mode"]].append(row)
    table = {
        label: {
            "accuracy": mean(float(r["correct"]) for r in group),
            "answer_agreement": mean(float(r["answer_agree"]) for r in group),
            "kl_mean": mean(r["kl"] for r in group),
            "recomputed_fraction": mean(r["recomputed_fraction"] for r in group),
        }
        for label, group in by_mode.items()
    }
    seconds = time.perf_counter() - started
    command = "python eval/fidelity.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        f"## Fidelity on the embedded trained model — {len(items)} synthetic test items, images moved",
        "",
        f"`{command}` — {platform.machine()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{seconds:.0f} s; vlcache budgets from {profile.describe() if profile else 'the default allocation'}.",
        "",
        "| mode | accuracy | answer = full's | KL(full‖mode), 1st token | recomputed (of moved) |",
        "|---|---|---|---|---|",
    ]
    for label, row in table.items():
        lines.append(
            f"| {label} | {row['accuracy'] * 100:.1f} % | {row['answer_agreement'] * 100:.1f} % | {row['kl_mean']:.3e} | "
            f"{row['recomputed_fraction'] * 100:.1f} % |"
        )
    md = "\n".join(lines) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(
        json.dumps({"command": command, "items": len(items), "table": table, "profile": json.loads(profile.to_json()) if profile else None, "rows": rows}, indent=1)
    )
    (RESULTS / f"{args.name}.md").write_text(md)
    _plot(table, policies, budgets, RESULTS / f"{args.name}.png", len(items))
    print(md)
    return 0


def _plot(table: dict, policies: list[str], budgets: list[float], path: Path, count: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, kl_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for policy in policies:
        rows = [table[f"{policy}@{b:g}"] for b in budgets]
        acc_ax.plot([b * 100 for b in budgets], [r["accuracy"] * 100 for r in rows], "o-", label=policy)
        kl_ax.plot([b * 100 for b in budgets], [r["kl_mean"] for r in rows], "o-", label=policy)
    for ax, key, scale in ((acc_ax, "accuracy", 100), (kl_ax, "kl_mean", 1)):
        ax.axhline(table["none"][key] * scale, color="grey", ls="--", label="naive reuse")
        ax.set_xscale("log")
        ax.set_xlabel("recompute budget (% of moved tokens)")
    acc_ax.axhline(table["full"]["accuracy"] * 100, color="black", ls=":", label="full recompute")
    acc_ax.set_ylabel("accuracy (%)")
    kl_ax.set_yscale("log")
    kl_ax.set_ylabel("KL(full ‖ mode), first answer token")
    acc_ax.legend(fontsize=8)
    fig.suptitle(f"Embedded trained tiny Qwen2.5-VL, {count} synthetic VQA items with moved images", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
