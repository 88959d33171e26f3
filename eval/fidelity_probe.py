"""Fidelity probe: how close does each selection policy get to full recomputation, per budget and per layer?

For N moved-image requests (images seen first in another context, then asked about at new positions) it
runs every policy at every budget and reports, against full recomputation: KL of the first-token
distribution, top-1 agreement, the recomputed fraction actually spent, and the per-layer relative K/V
error; `random` at the same budget is the control. Optionally calibrates a LayerProfile first (on other
samples than the probe's) and gives it to the `vlcache` policy.

    python eval/fidelity_probe.py --model default --requests 64 --calibrate 16     # the embedded trained model
    python eval/fidelity_probe.py --model toy --requests 32 --calibrate 8          # random-weight toy Qwen2.5-VL
    python eval/fidelity_probe.py --smoke                                          # seconds; CI

Writes eval/results/<name>.json, .md and .png plots (KL vs budget; per-layer K/V error at 5 %; the profile).
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
from vlcache_hf.probe import MovedImageRequest, compare_modes, moved_image_request, standard_modes
from vlcache_hf.selection import LayerProfile
from vlcache_hf.tools import synthetic, toy
from vlcache_hf.tools.demo import load_demo_model

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_POLICIES = ["vlcache", "first_k", "cacheblend", "random"]
DEFAULT_BUDGETS = [0.01, 0.02, 0.05, 0.1, 0.2]


def load_model(name: str, family: str, seed: int):
    """('default' → embedded trained model) | ('toy' → random-weight toy of `family`) | a directory."""
    if name == "toy":
        return toy.build_model(family, seed=seed), toy.build_processor(family), f"random-weight toy {family}", False
    model, processor, description = load_demo_model(None if name == "default" else name)
    return model, processor, description, name == "default"


def make_requests(count: int, trained: bool, seed: int, split: str = "validation", offset: int = 0) -> list[MovedImageRequest]:
    """Moved-image requests: synthetic VQA items for the trained model, seeded toy pictures otherwise."""
    rng = random.Random(seed)
    requests = []
    if trained:
        for item in synthetic.make_split(split, offset + count)[offset:]:
            images = [synthetic.render(s) for s in item.scenes]
            requests.append(moved_image_request(images, rng, probe=synthetic.messages(item, images)))
    else:
        for index in range(count):
            images = [toy.make_image(seed * 1000 + offset + 3 * index + k) for k in range(3)]
            requests.append(moved_image_request(images, rng))
    return requests


def aggregate(rows: list[dict], labels: list[str]) -> dict[str, dict]:
    by_mode: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_mode[row["mode"]].append(row)
    table = {}
    for label in labels:
        group = by_mode[label]
        layers = len(group[0]["layer_kv_error"])
        table[label] = {
            "kl_mean": mean(r["kl"] for r in group),
            "kl_median": sorted(r["kl"] for r in group)[len(group) // 2],
            "top1_agreement": mean(float(r["top1_agree"]) for r in group),
            "recomputed_fraction": mean(r["recomputed_fraction"] for r in group),
            "layer_kv_error": [mean(r["layer_kv_error"][layer] for r in group) for layer in range(layers)],
            "requests": len(group),
        }
    return table


def markdown(table: dict[str, dict], header: str) -> str:
    lines = [header, "", "| mode | KL(full‖mode) mean | KL median | top-1 agreement | recomputed (of moved) |", "|---|---|---|---|---|"]
    for label, row in table.items():
        lines.append(
            f"| {label} | {row['kl_mean']:.3e} | {row['kl_median']:.3e} | {row['top1_agreement'] * 100:.1f} % | "
            f"{row['recomputed_fraction'] * 100:.1f} % |"
        )
    return "\n".join(lines) + "\n"


def plot(table: dict[str, dict], policies: list[str], budgets: list[float], profile: LayerProfile | None, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if profile is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.2))
    ax = axes[0]
    for policy in policies:
        rows = [table[f"{policy}@{b:g}"] for b in budgets]
        ax.plot([r["recomputed_fraction"] * 100 for r in rows], [r["kl_mean"] for r in rows], "o-", label=policy)
    ax.axhline(table["none"]["kl_mean"], color="grey", ls="--", label="naive reuse")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("recomputed share of moved tokens (%, mean over layers)")
    ax.set_ylabel("KL(full ‖ policy), first token")
    ax.legend(fontsize=8)
    ax.set_title("error vs budget")
    ax = axes[1]
    budget = 0.05 if 0.05 in budgets else budgets[len(budgets) // 2]
    for label in ["none"] + [f"{p}@{budget:g}" for p in policies]:
        errors = table[label]["layer_kv_error"]
        ax.plot(range(len(errors)), errors, "o-", label=label)
    ax.set_xlabel("layer")
    ax.set_ylabel("relative K/V error vs full recompute")
    ax.set_title(f"per-layer K/V error at {budget:g}")
    ax.legend(fontsize=8)
    if profile is not None:
        ax = axes[2]
        layers = range(profile.num_layers)
        ax.bar(layers, profile.sensitivity, color="C3", alpha=0.6, label="layer's own sensitivity")
        ax.plot(layers, profile.remaining_error, "ko-", label="remaining error w_l (budget weight)")
        ax.set_xlabel("layer")
        ax.set_ylabel("KL of first token")
        ax.set_title("calibration profile")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="'default' (embedded trained), 'toy' (random weights) or a directory")
    parser.add_argument("--family", default="qwen2_5_vl", help="toy family when --model toy")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--policies", default=",".join(DEFAULT_POLICIES))
    parser.add_argument("--budgets", default=",".join(f"{b:g}" for b in DEFAULT_BUDGETS))
    parser.add_argument("--calibrate", type=int, default=8, metavar="N", help="calibrate on N other samples first (0: no profile)")
    parser.add_argument("--profile", default=None, help="use this LayerProfile JSON instead of calibrating")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default=None, help="results file stem (default: fidelity_probe_<model>)")
    parser.add_argument("--smoke", action="store_true", help="tiny run for CI: toy model, 2 requests, 2 budgets")
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.requests, args.budgets, args.calibrate = "toy", 2, "0.05,0.2", 1
    torch.manual_seed(args.seed)
    policies = [p for p in args.policies.split(",") if p]
    budgets = [float(b) for b in args.budgets.split(",") if b]
    model, processor, description, trained = load_model(args.model, args.family, args.seed)
    name = args.name or ("fidelity_probe_smoke" if args.smoke else f"fidelity_probe_{'trained' if trained else args.model}")

    profile = LayerProfile.load(args.profile) if args.profile else None
    if profile is None and args.calibrate > 0:  # calibration samples are disjoint from the probe's requests
        calib = make_requests(args.calibrate, trained, args.seed + 1, split="train" if trained else "validation", offset=10_000)
        samples = [[i["image"] for m in r.probe for i in m["content"] if i["type"] == "image"] for r in calib]
        profile = calibrate(model, processor, samples, seed=args.seed)
    modes = standard_modes(policies, budgets)
    requests = make_requests(args.requests, trained, args.seed)
    rows = []
    started = time.perf_counter()
    for request in tqdm(requests, desc="fidelity probe", unit="request"):
        _, results = compare_modes(model, processor, request, modes, profile=profile)
        rows += [r.__dict__ for r in results]
    table = aggregate(rows, [m.label for m in modes])
    header = (
        f"## Fidelity probe — {description}, {len(requests)} moved-image requests\n\n"
        f"`python eval/fidelity_probe.py {' '.join(argv if argv is not None else sys.argv[1:])}` — "
        f"{platform.machine()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{time.perf_counter() - started:.0f} s. vlcache budgets: "
        f"{profile.describe() + ' (calibrated)' if profile else 'default allocation'}."
    )
    md = markdown(table, header)
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {
        "model": description,
        "requests": len(requests),
        "policies": policies,
        "budgets": budgets,
        "profile": json.loads(profile.to_json()) if profile else None,
        "table": table,
        "rows": rows,
    }
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=1))
    (RESULTS / f"{name}.md").write_text(md)
    plot(table, policies, budgets, profile, RESULTS / f"{name}.png", f"{description}: {len(requests)} moved-image requests")
    print(md)
    print(f"wrote {RESULTS / name}.json/.md/.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
