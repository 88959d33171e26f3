"""Where one request's time to first token goes: Python functions (cProfile) and device operators (torch.profiler).

    python eval/profile_ttft.py --size smoke --scenarios ab --modes naive,full --out /tmp/profile
    python eval/profile_ttft.py --size 7b --device cuda --out eval/results/profile_7b_cuda   # on a GPU

For each scenario × mode of `vlcache bench` (same requests, same seeded store): two warm-up requests, then one
request under cProfile (top functions by cumulative and by own time) and one under torch.profiler (operators
by own CPU time and by device time). One text file per pair, plus `summary.md` with each request's wall time.
The benchmark says how long a request takes; this says why — where it spends time the bound does not count.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from pathlib import Path

import torch

from vlcache_hf.compat import with_cache
from vlcache_hf.tools import toy
from vlcache_hf.tools.bench import (
    MODES,
    NAMED_ONLY_MODES,
    SIZES,
    ModeRunner,
    _on_device,
    _seeded_store,
    build_scenarios,
)


def decode_runner(model, inputs, tokens: int):
    """Plain generate of `tokens` new tokens (prefill included): its profile shows the per-step overhead."""

    def run() -> float:
        start = time.perf_counter()
        model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, **with_cache(model, None))
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        return time.perf_counter() - start

    return run


def profile(run, lines: int) -> tuple[float, str]:
    """(seconds of the cProfiled call, the report text)."""
    for _ in range(2):
        run()
    profiler = cProfile.Profile()
    profiler.enable()
    seconds = run()
    profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("cumulative").print_stats(lines)
    stats.sort_stats("tottime").print_stats(lines)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as traced:
        run()
    averages = traced.key_averages()
    text.write("\n## torch.profiler: operators by own CPU time\n\n")
    text.write(averages.table(sort_by="self_cpu_time_total", row_limit=lines))
    if torch.cuda.is_available():
        text.write("\n## torch.profiler: operators by device time\n\n")
        text.write(averages.table(sort_by="self_cuda_time_total", row_limit=lines))
    return seconds, text.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="smoke")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="default: bfloat16 on CUDA, else float32")
    parser.add_argument("--scenarios", default="ab", help="letters of 'abc' (as `vlcache bench`)")
    parser.add_argument("--modes", default="full,hf-prefix,naive,vlcache 2%", help="comma-separated `vlcache bench` modes")
    parser.add_argument("--decode-tokens", type=int, default=8, help="also profile plain generate of this many tokens (0: no)")
    parser.add_argument("--lines", type=int, default=40, help="rows per table")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    size = SIZES[args.size]
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    with torch.device(args.device):
        model = toy.build_model(size=size.model, dtype=dtype)
    processor = toy.build_processor(max_pixels=size.image_px * size.image_px, min_pixels=56 * 56)
    wanted = [name.strip() for name in args.modes.split(",")]
    modes = [mode for mode in MODES + NAMED_ONLY_MODES if mode.name in wanted]
    if len(modes) != len(wanted):
        parser.error(f"--modes: choose from {[m.name for m in MODES + NAMED_ONLY_MODES]}")
    args.out.mkdir(parents=True, exist_ok=True)
    summary = [f"# Profiles ({args.size}, {args.device}, {dtype})", "", "| scenario | mode | seconds (profiled call) |", "|---|---|---|"]
    for scenario in build_scenarios(processor, size, set(args.scenarios) - {"d"}):
        scenario = _on_device(scenario, model.device)
        seeded = _seeded_store(model, scenario, processor)
        for mode in modes:
            if mode.kind == "vlcache_processor" and scenario.target_messages is None:
                continue  # a chat-only mode
            seconds, text = profile(ModeRunner(model, scenario, mode, seeded, processor).request, args.lines)
            name = f"{scenario.name}_{mode.name.replace(' ', '_').replace('%', 'pct')}.txt"
            (args.out / name).write_text(text)
            summary.append(f"| {scenario.name} | {mode.name} | {seconds:.4f} |")
            print(f"  {scenario.name:16s} {mode.name:15s} {seconds * 1e3:9.1f} ms → {name}", flush=True)
        if args.decode_tokens and scenario.name.startswith("a"):
            seconds, text = profile(decode_runner(model, scenario.target, args.decode_tokens), args.lines)
            (args.out / "decode.txt").write_text(text)
            summary.append(f"| {scenario.name} | plain generate, {args.decode_tokens} tokens | {seconds:.4f} |")
    (args.out / "summary.md").write_text("\n".join(summary) + "\n")
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
