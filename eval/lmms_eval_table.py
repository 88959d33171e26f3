"""The synthetic VQA task through lmms-eval's own command line, one run per policy, as one committed table.

    python eval/lmms_eval_table.py --limit 100 --out eval/results/lmms_eval_synthetic.md
    python eval/lmms_eval_table.py --pretrained deep --task synthetic_vqa_deep --limit 1000 \
        --policies full,coverage,vlcache,none --out eval/results/lmms_eval_synthetic_deep.md

Each policy is a separate `python -m lmms_eval --model vlcache ...` run on an embedded model (warm-up on:
each item's pictures are first published from another context, so every request reuses them at new
positions). The table holds lmms-eval's exact_match and its standard error from the results JSON it wrote,
and the request summary our model wrote (`stats_path`): encoder and K/V hit rates, share of prompt tokens
recomputed, mean prefill time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ("full", "vlcache", "none")


def run_policy(policy: str, limit: int, ratio: float, work: Path, pretrained: str = "default", task: str = "synthetic_vqa") -> dict:
    """One lmms-eval run; its figures from the files it wrote (lmms-eval exits 0 even when evaluation failed)."""
    output, stats = work / f"out-{policy}", work / f"stats-{policy}.json"
    command = [
        sys.executable, "-m", "lmms_eval",
        "--model", "vlcache",
        "--model_args", f"pretrained={pretrained},policy={policy},recompute_ratio={ratio},stats_path={stats}",
        "--tasks", task,
        "--include_path", str(ROOT / "eval" / "tasks"),
        "--limit", str(limit),
        "--output_path", str(output),
        "--verbosity", "WARNING",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    start = time.perf_counter()
    run = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    log = run.stdout + run.stderr
    if run.returncode != 0 or "Error during evaluation" in log or "Traceback" in log:
        raise SystemExit(f"lmms-eval failed for policy {policy}:\n{log[-4000:]}")
    found = [
        results[task]
        for path in sorted(output.rglob("*results*.json"))
        if task in (results := json.loads(path.read_text()).get("results", {}))
    ]
    if len(found) != 1:
        raise SystemExit(f"expected one results file with {task} for policy {policy}, found {len(found)}")
    summary = json.loads(stats.read_text())["summary"]
    return {
        "policy": policy,
        "exact_match": found[0]["exact_match,none"],
        "stderr": found[0]["exact_match_stderr,none"],
        "summary": summary,
        "seconds": round(seconds, 1),
    }


def _rate(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=100, help="items of the test split")
    parser.add_argument("--ratio", type=float, default=0.05, help="recompute_ratio of the reuse policies")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--pretrained", default="default", help="model: default, deep, or a model directory")
    parser.add_argument("--task", default="synthetic_vqa", help="synthetic_vqa or synthetic_vqa_deep")
    parser.add_argument("--out", type=Path, default=ROOT / "eval" / "results" / "lmms_eval_synthetic.md")
    args = parser.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for policy in tqdm(args.policies.split(","), desc="lmms-eval runs", unit="policy"):
            rows.append(run_policy(policy, args.limit, args.ratio, Path(tmp), args.pretrained, args.task))
    shown = " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        f"# lmms-eval, {args.task}, {args.limit} items, model {args.pretrained}",
        "",
        f"Command: `python eval/lmms_eval_table.py {shown}`".rstrip() + f" — {platform.machine()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}; recompute_ratio {args.ratio} for the reuse policies.",
        "",
        "| policy | exact_match | stderr | encoder hit rate | KV hit rate | recomputed (of prompt tokens) | prefill ms (mean) | run s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        s = row["summary"]
        lines.append(
            f"| {row['policy']} | {row['exact_match']:.2f} | {row['stderr']:.3f} | {_rate(s['encoder_hit_rate'])} | "
            f"{_rate(s['kv_hit_rate'])} | {s['recomputed_fraction_tokens']:.3f} | {s['prefill_ms_mean']:.1f} | {row['seconds']} |"
        )
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
