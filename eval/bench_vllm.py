"""TTFT of vLLM with `VLCacheECConnector` and a warm store vs plain vLLM, on the same requests, side by side.

The scenario the connector exists for: an engine (a restart, or another instance) receives images that some
instance has encoded before. Each engine below is a fresh process, so vLLM's own in-process encoder cache is
empty in both columns; only the shared store differs.

1. warm-up engine with the connector: encodes every image once and publishes it to the store;
2. `plain`: a fresh engine without the connector runs the requests;
3. `vlcache`: a fresh engine with the connector runs the same requests, loading every image from the store.
Engines 2 and 3 alternate `--rounds` times; TTFT is the wall time of a `max_tokens=1` request (prefill, encoder
and the first token), median over requests and rounds. The answers of both columns are compared too.

Run in the environment with vLLM (`.venv-vllm`, see `.ci/run`):

    python eval/bench_vllm.py --requests 12 --rounds 2 --out eval/results/vllm_ttft_cpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
from pathlib import Path

from vllm_engine import run_in_subprocess  # eval/ is this script's directory, first on sys.path


def events(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        kind = json.loads(line)["event"]
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=12, help="distinct synthetic test items (2-3 images each)")
    parser.add_argument("--rounds", type=int, default=2, help="plain/vlcache engine pairs")
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the embedded Qwen2.5-VL)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", type=Path, default=Path("vlcache-bench/vllm_ttft.md"))
    args = parser.parse_args(argv)

    import torch
    import vllm

    work = Path(tempfile.mkdtemp(prefix="vlcache-bench-vllm-"))
    store = [f"disk://{work / 'store'}"]
    requests = [{"index": i, "uuid": True} for i in range(args.requests)]
    base = {"model": args.model, "dtype": args.dtype, "max_tokens": 1, "requests": requests}
    run_in_subprocess({**base, "store": store, "events": str(work / "warm.jsonl")})
    rows: dict[str, list[float]] = {"plain": [], "vlcache": []}
    loads: dict[str, float] = {"plain": 0.0, "vlcache": 0.0}
    answers: dict[str, list] = {}
    log = work / "measured.jsonl"
    for _ in range(args.rounds):
        for mode in ("plain", "vlcache"):
            spec = dict(base) if mode == "plain" else {**base, "store": store, "events": str(log)}
            result = run_in_subprocess(spec)
            rows[mode] += [r["seconds"] for r in result["results"]]
            loads[mode] += result["load_s"] / args.rounds
            answers.setdefault(mode, [r["token_ids"] for r in result["results"]])
    counts, warm_counts = events(log), events(work / "warm.jsonl")
    plain, cached = statistics.median(rows["plain"]), statistics.median(rows["vlcache"])
    same = sum(a == b for a, b in zip(answers["plain"], answers["vlcache"], strict=True))
    lines = [
        "# vLLM TTFT: VLCacheECConnector with a warm store vs plain vLLM",
        "",
        f"Command: `python eval/bench_vllm.py --requests {args.requests} --rounds {args.rounds}`  ",
        f"vLLM {vllm.__version__}, torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs, dtype {args.dtype}, "
        f"model {args.model or 'embedded tiny Qwen2.5-VL'}  ",
        f"Each engine a fresh process; TTFT = wall time of a max_tokens=1 request; median of {len(rows['plain'])} per column.",
        "",
        "| engine | TTFT median (ms) | TTFT mean (ms) | engine start (s) |",
        "|---|---|---|---|",
        f"| plain vLLM | {plain * 1e3:.1f} | {statistics.mean(rows['plain']) * 1e3:.1f} | {loads['plain']:.1f} |",
        f"| vLLM + VLCacheECConnector (warm disk store) | {cached * 1e3:.1f} | {statistics.mean(rows['vlcache']) * 1e3:.1f} | {loads['vlcache']:.1f} |",
        "",
        f"**TTFT plain / with connector: {plain / cached:.2f}×** (median).  ",
        f"Warm-up engine: {warm_counts.get('save', 0)} encoder outputs published. Measured engines with the connector: "
        f"{counts.get('load', 0)} loaded, {counts.get('save', 0)} encoded (vision encoder runs).  ",
        f"Answers (first token) equal to plain vLLM: {same}/{len(answers['plain'])}.",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"rows_s": rows, "engine_start_s": loads, "events": counts, "warm_events": warm_counts}, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
