"""Which per-layer budgets serve the `vlcache` policy best: uniform, or proportional to a calibrated profile?

Same ranking of tokens (earliest of each moved image first, deviation filtering where budgets shrink), same
budget, different allocation over layers: uniform (the default without a profile), the calibrated profile
(k_l ∝ remaining error w_l) and a flatter k_l ∝ sqrt(w_l). On the embedded trained model, over moved-image
test items (the same requests as eval/fidelity.py), KL(full ‖ policy) of the first answer token and accuracy.

    python eval/compare_allocations.py --items 200

Writes eval/results/compare_allocations.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
from pathlib import Path
from statistics import mean

from tqdm import tqdm

from vlcache_hf.calibration import calibrate
from vlcache_hf.probe import Mode, compare_modes, moved_image_request
from vlcache_hf.selection import VLCachePolicy
from vlcache_hf.tools import synthetic
from vlcache_hf.tools.pretrained import load_default

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--budgets", default="0.02,0.05,0.1,0.2")
    parser.add_argument("--calibrate", type=int, default=16, help="calibration samples (as eval/fidelity.py)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    budgets = [float(b) for b in args.budgets.split(",")]
    model, processor = load_default()
    calib_items = synthetic.make_split("train", 50_000 + args.calibrate)[50_000:]
    profile = calibrate(model, processor, [[synthetic.render(s) for s in i.scenes] for i in calib_items], seed=args.seed)
    flatter = dataclasses.replace(profile, remaining_error=[w**0.5 for w in profile.remaining_error])
    allocations = {"uniform": None, "profile": profile, "sqrt(profile)": flatter}
    labels = [f"{name}@{b:g}" for b in budgets for name in allocations]
    kls: dict[str, list[float]] = {label: [] for label in labels}
    correct: dict[str, list[bool]] = {label: [] for label in labels}
    rng = random.Random(args.seed)
    for item in tqdm(synthetic.make_split("test", args.items), desc="allocations", unit="item"):
        images = [synthetic.render(s) for s in item.scenes]
        request = moved_image_request(images, rng, probe=synthetic.messages(item, images))
        modes = [
            Mode(f"{name}@{b:g}", VLCachePolicy(b, profile=p), b) for b in budgets for name, p in allocations.items()
        ]
        _, results = compare_modes(model, processor, request, modes, max_new_tokens=2)
        for result in results:
            kls[result.mode].append(result.kl)
            correct[result.mode].append(result.answer == item.answer)
    table = {label: {"kl_mean": mean(kls[label]), "accuracy": mean(map(float, correct[label]))} for label in labels}
    command = "python eval/compare_allocations.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"## vlcache layer budgets: uniform vs calibrated — {args.items} moved-image test items", "", f"`{command}`", ""]
    lines += ["| allocation @ budget | KL(full‖vlcache) | accuracy |", "|---|---|---|"]
    lines += [f"| {label} | {row['kl_mean']:.3e} | {row['accuracy'] * 100:.1f} % |" for label, row in table.items()]
    md = "\n".join(lines) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "compare_allocations.json").write_text(json.dumps({"command": command, "table": table, "profile": json.loads(profile.to_json())}, indent=1))
    (RESULTS / "compare_allocations.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
