"""Fidelity report on the embedded trained model: answer accuracy of every reuse mode on the synthetic
multi-image VQA test split, when the images were first seen in another context (non-prefix reuse).

For each test item the images are first shown after another preamble, in another order (their encoder
outputs and K/V go to a fresh store), then the item's question is asked. Modes: full recomputation (the
reference), exact prefix reuse only, naive reuse, and vlcache / stratified / coverage / first_k / cacheblend / random at budgets
1, 2, 5, 10, 20 %. Per mode: accuracy, agreement of the whole greedy answer with full recomputation,
KL(full ‖ mode) of the first answer token, recomputed share of the moved tokens.

    python eval/fidelity.py --items 400            # ~6 min on 2 CPU cores
    python eval/fidelity.py --items 20 --name fidelity_smoke
    python eval/fidelity.py --model deep --items 1000 --name fidelity_deep   # the 8-layer model, 64 tokens/image

Every figure comes with a 95 % bootstrap interval over items (`--bootstrap` resamples); accuracy is also
given per question kind. With a calibration profile, `vlcache` runs both with the profile's layer budgets
and with uniform budgets (`vlcache-uniform`), side by side.

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

from vlcache_hf.calibration import calibrate
from vlcache_hf.probe import Mode, compare_modes, moved_image_request, standard_modes
from vlcache_hf.selection import VLCachePolicy
from vlcache_hf.tools import synthetic
from vlcache_hf.tools.pretrained import load_deep, load_default

RESULTS = Path(__file__).resolve().parent / "results"
POLICIES = ["vlcache", "stratified", "coverage", "first_k", "cacheblend", "random"]
BUDGETS = [0.01, 0.02, 0.05, 0.1, 0.2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=400, help="test items (the first N of the test split)")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--budgets", default=",".join(f"{b:g}" for b in BUDGETS))
    parser.add_argument("--calibrate", type=int, default=16, help="calibration samples from the train split (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="fidelity_trained")
    parser.add_argument("--model", default="default", choices=["default", "deep"], help="which embedded model")
    parser.add_argument("--bootstrap", type=int, default=1000, help="resamples for the 95 %% intervals")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    policies = [p for p in args.policies.split(",") if p]
    budgets = [float(b) for b in args.budgets.split(",") if b]
    model, processor = load_deep() if args.model == "deep" else load_default()
    variant = synthetic.task_spec(args.model)

    profile = None
    if args.calibrate:
        calib_items = synthetic.make_split("train", 50_000 + args.calibrate, variant=variant)[50_000:]
        samples = [synthetic.render_item(item, variant) for item in calib_items]
        profile = calibrate(model, processor, samples, seed=args.seed)
    modes = standard_modes(policies, budgets)
    if profile is not None and "vlcache" in policies:  # the same policy without the profile's budgets
        modes += [Mode(f"vlcache-uniform@{b:g}", VLCachePolicy(b), b) for b in budgets]
    items = synthetic.make_split("test", args.items, variant=variant)
    rng = random.Random(args.seed)
    rows, started = [], time.perf_counter()
    for index, item in enumerate(tqdm(items, desc="fidelity", unit="item")):
        images = synthetic.render_item(item, variant)
        request = moved_image_request(images, rng, probe=synthetic.messages(item, images))
        full_answer, results = compare_modes(model, processor, request, modes, profile=profile, max_new_tokens=2)
        rows.append({"item": index, "mode": "full", "correct": full_answer == item.answer, "answer_agree": True, "kl": 0.0,
                     "recomputed_fraction": 1.0, "kind": item.kind})
        for r in results:
            rows.append({
                "item": index, "mode": r.mode, "correct": r.answer == item.answer, "answer_agree": r.answer_agree,
                "kl": r.kl, "recomputed_fraction": r.recomputed_fraction, "kind": item.kind,
            })
    by_mode = defaultdict(list)
    for row in rows:
        by_mode[row["mode"]].append(row)
    boot = random.Random(args.seed + 1)
    draws = [[boot.randrange(len(items)) for _ in items] for _ in range(args.bootstrap)]
    table = {label: summarise(group, draws) for label, group in by_mode.items()}
    kinds = sorted({item.kind for item in items})
    per_kind = {
        label: {kind: mean(float(r["correct"]) for r in group if r["kind"] == kind) for kind in kinds}
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
        f"Intervals: 95 % bootstrap over items ({args.bootstrap} resamples).",
        "",
        "| mode | accuracy | answer = full's | KL(full‖mode), 1st token | recomputed (of moved) |",
        "|---|---|---|---|---|",
    ]
    for label, row in table.items():
        lines.append(
            f"| {label} | {_pct(row, 'accuracy')} | {_pct(row, 'answer_agreement')} | {row['kl_mean']:.3e} "
            f"[{row['kl_mean_ci'][0]:.2e}, {row['kl_mean_ci'][1]:.2e}] | {row['recomputed_fraction'] * 100:.1f} % |"
        )
    lines += ["", "Accuracy per question kind:", "", "| mode | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for label in [m for m in ("full", "none", "prefix-only", "coverage@0.05", "coverage-shift@0.05", "random@0.05", "vlcache@0.05", "vlcache-uniform@0.05", "first_k@0.05") if m in per_kind]:
        lines.append(f"| {label} | " + " | ".join(f"{per_kind[label][k] * 100:.1f} %" for k in kinds) + " |")
    md = "\n".join(lines) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(
        json.dumps({"command": command, "model": args.model, "items": len(items), "table": table, "per_kind": per_kind,
                    "profile": json.loads(profile.to_json()) if profile else None, "rows": rows}, indent=1)
    )
    (RESULTS / f"{args.name}.md").write_text(md)
    _plot(table, policies + (["vlcache-uniform"] if profile is not None and "vlcache" in policies else []), budgets,
          RESULTS / f"{args.name}.png", len(items), args.model)
    print(md)
    return 0


def summarise(group: list[dict], draws: list[list[int]]) -> dict:
    """Means over the items of one mode, each with its 95 % bootstrap interval (items resampled)."""
    by_item = {row["item"]: row for row in group}
    result = {}
    for key, value in (("accuracy", "correct"), ("answer_agreement", "answer_agree"), ("kl_mean", "kl")):
        result[key] = mean(float(row[value]) for row in group)
        samples = sorted(mean(float(by_item[i][value]) for i in draw) for draw in draws) if draws else [result[key]]
        result[f"{key}_ci"] = (samples[int(0.025 * (len(samples) - 1))], samples[int(0.975 * (len(samples) - 1))])
    result["recomputed_fraction"] = mean(row["recomputed_fraction"] for row in group)
    return result


def _pct(row: dict, key: str) -> str:
    low, high = row[f"{key}_ci"]
    return f"{row[key] * 100:.1f} % [{low * 100:.1f}, {high * 100:.1f}]"


def _plot(table: dict, policies: list[str], budgets: list[float], path: Path, count: int, model: str = "default") -> None:
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
    name = "deep (8 layers, 64 tokens per image)" if model == "deep" else "tiny (4 layers, 16 tokens per image)"
    fig.suptitle(f"Embedded trained Qwen2.5-VL, {name}: {count} synthetic VQA items with moved images", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
