"""One command for a machine with CUDA: exactness of every family, then the TTFT benchmark at 7B shape.

    python eval/gpu_check.py                 # on a CUDA machine: writes eval/results/gpu_<card>.{md,json}
    python eval/gpu_check.py --dry-run       # anywhere (CI): the same steps on CPU at toy sizes, to a temp dir

Steps, each written to the report as it finishes (a later failure keeps the earlier figures):
1. environment: card, CUDA capability, torch / transformers / accelerate versions, FlashAttention-2 present;
2. exactness, for every family × float32 / bfloat16 × SDPA (and FlashAttention-2 where installed, half
   precision only): policy "full" and an exact repeat with policy "none" against the model's own `generate`
   (greedy tokens; largest logit difference), and a moved request with policy "vlcache" at 5 % (runs,
   reports moved tokens);
3. load bandwidth host → device from pageable and from pinned memory (what a CPU-tier hit costs);
4. store tiers: an exact repeat served from each tier alone (GPU memory, CPU memory — loaded through pinned
   memory — and disk), equal to plain `generate`, with the tier's load time;
5. device map: the model saved and reloaded by accelerate with its decoder layers split between the GPU and
   the CPU (`device_map` by hand, and `device_map="auto"` under a `max_memory` that forces CPU offload; a dry
   run splits CPU and disk), policy "full" and an exact repeat equal to the offloaded model's plain `generate`;
6. TTFT benchmark (`vlcache_hf.tools.bench`) on a Qwen2.5-VL with a 7B-shaped text model (28 layers,
   hidden 3584, 28 heads / 4 KV heads) and random weights in bfloat16, 4 images × 1,024 tokens, every mode
   side by side, with peak GPU memory per scenario and decode ms/token after a full and after a VLCache
   prefill.

`--dry-run` keeps every step but runs it on CPU at toy sizes (one repeat), so CI proves the script works.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import torch

from vlcache_hf import CacheStore, VLCache
from vlcache_hf.compat import with_cache
from vlcache_hf.tools import toy
from vlcache_hf.tools.bench import SIZES, BenchSize, bench_scenarios, markdown

ROOT = Path(__file__).resolve().parents[1]


def environment(device: str) -> dict[str, str]:
    import accelerate
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "flash_attn": "installed" if importlib.util.find_spec("flash_attn") else "not installed",
        "device": device,
    }
    if device == "cuda":
        env["card"] = torch.cuda.get_device_name(0)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        env["cuda"] = str(torch.version.cuda)
    return env


def _generate(model, inputs, cache=None, max_new_tokens: int = 4):
    return model.generate(
        **inputs, max_new_tokens=max_new_tokens, do_sample=False, output_scores=True, return_dict_in_generate=True,
        **with_cache(model, cache),
    )


def _compare(plain, ours) -> tuple[bool, float]:
    same = bool(torch.equal(plain.sequences, ours.sequences))
    diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(plain.scores, ours.scores, strict=True))
    return same, diff


def exactness_row(family: str, dtype: torch.dtype, attn: str, device: str) -> dict:
    """Policy "full" and an exact repeat ("none") against plain generate; a moved request with "vlcache" 5 %."""
    with torch.device(device):
        model = toy.build_model(family, dtype=dtype, attn_implementation=attn)
    processor = toy.build_processor(family)
    images = [toy.make_image(seed) for seed in range(3)]
    inputs = toy.chat_inputs(processor, [toy.message("user", images[0], images[1], "What is shown?")]).to(device)
    store = CacheStore()
    row = _tokens_equal_row(model, inputs, store, family=family, dtype=str(dtype).removeprefix("torch."), attention=attn)
    moved_inputs = toy.chat_inputs(processor, [toy.message("user", "Now:", images[1], images[0], "What is shown?")]).to(device)
    moved = VLCache(model, store=store, policy="vlcache", recompute_ratio=0.05)
    _generate(model, moved_inputs, moved)
    return {**row, "moved_tokens": moved.report.moved_tokens}


def exactness(device: str) -> list[dict]:
    rows = []
    attentions = ["sdpa"] + (["flash_attention_2"] if device == "cuda" and importlib.util.find_spec("flash_attn") else [])
    for family in toy.FAMILIES:
        for dtype in (torch.float32, torch.bfloat16):
            for attn in attentions:
                if attn == "flash_attention_2" and dtype == torch.float32:
                    continue  # FlashAttention-2 runs in half precision only
                try:
                    row = exactness_row(family, dtype, attn, device)
                except Exception as err:  # one family failing must not hide the others' results
                    row = {"family": family, "dtype": str(dtype).removeprefix("torch."), "attention": attn,
                           "error": "".join(traceback.format_exception_only(err)).strip()}
                rows.append(row)
                print(f"  exactness {json.dumps(row)}", flush=True)
    return rows


def load_bandwidth(device: str, megabytes: int) -> dict[str, float]:
    """GB/s of a host → device copy from pageable and from pinned memory (median of 5)."""
    target = "cuda" if device == "cuda" else "cpu"
    source = torch.empty(megabytes * 2**20, dtype=torch.uint8)
    pinned = source.pin_memory() if device == "cuda" else source.clone()
    result = {}
    for name, tensor in (("pageable", source), ("pinned", pinned)):
        times = []
        for _ in range(6):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            tensor.to(target, non_blocking=name == "pinned")
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        result[f"{name}_GBps"] = tensor.numel() / sorted(times[1:])[2] / 1e9
    return result


def _tokens_equal_row(model, inputs, store, **extra) -> dict:
    """Policy "full" (publishes), then an exact repeat with policy "none", each against plain `generate`."""
    plain = _generate(model, inputs)
    full_same, full_diff = _compare(plain, _generate(model, inputs, VLCache(model, store=store, policy="full")))
    store.flush()
    repeat = VLCache(model, store=store)
    repeat_same, repeat_diff = _compare(plain, _generate(model, inputs, repeat))
    report = repeat.report
    return {
        **extra, "full_tokens_equal": full_same, "full_max_logit_diff": full_diff,
        "repeat_tokens_equal": repeat_same, "repeat_max_logit_diff": repeat_diff,
        "repeat_encoder_hits": report.encoder_hits, "repeat_reused_tokens": report.reused_tokens,
        "repeat_store_load_ms": report.timings.store_load_s * 1e3,
    }


def store_tiers(device: str) -> list[dict]:
    """An exact repeat served from each tier alone; a dry run replaces the GPU tier by CPU memory."""
    with torch.device(device):
        model = toy.build_model()
    processor = toy.build_processor()
    images = [toy.make_image(seed) for seed in range(2)]
    inputs = toy.chat_inputs(processor, [toy.message("user", images[0], images[1], "What is shown?")]).to(device)
    rows = []
    with tempfile.TemporaryDirectory(prefix="vlcache-gpu-check-disk-") as disk:
        tiers = {"gpu": {"gpu": "1GiB"} if device == "cuda" else {"cpu": "1GiB"}, "cpu": {"cpu": "1GiB"}, "disk": {"disk": disk}}
        for name, settings in tiers.items():
            with CacheStore(**settings) as store:
                try:
                    row = _tokens_equal_row(model, inputs, store, tier=name)
                    row["entry_devices"] = sorted({str(t.device) for tier in store.tiers for k in tier.keys() for t in tier.get(k).tensors.values()})
                except Exception as err:
                    row = {"tier": name, "error": "".join(traceback.format_exception_only(err)).strip()}
            rows.append(row)
            print(f"  tier {json.dumps(row)}", flush=True)
    return rows


def device_maps(device: str) -> list[dict]:
    """The toy model saved, then reloaded by accelerate with its decoder layers split across devices."""
    from transformers import AutoModelForImageTextToText

    model, processor = toy.build_model(), toy.build_processor()
    images = [toy.make_image(seed) for seed in range(2)]
    layers = model.config.text_config.num_hidden_layers
    rows = []
    with tempfile.TemporaryDirectory(prefix="vlcache-gpu-check-map-") as directory:
        model.save_pretrained(directory)
        near, far = (0, "cpu") if device == "cuda" else ("cpu", "disk")
        by_hand = {name: near for name in ("model.visual", "model.language_model.embed_tokens", "model.language_model.norm", "model.language_model.rotary_emb", "lm_head")}
        by_hand.update({f"model.language_model.layers.{layer}": far if layer % 2 else near for layer in range(layers)})
        maps: dict[str, dict] = {"by hand": {"device_map": by_hand}}
        if device == "cuda":
            weights = sum(p.numel() * p.element_size() for p in model.parameters())
            maps["auto"] = {"device_map": "auto", "max_memory": {0: int(weights * 0.6), "cpu": 8 * 2**30}}
        for name, settings in maps.items():
            try:
                loaded = AutoModelForImageTextToText.from_pretrained(
                    directory, offload_folder=str(Path(directory) / "offload"), attn_implementation="sdpa", **settings
                ).eval()
                placed = sorted({str(getattr(loaded, "hf_device_map", {}).get(k)) for k in getattr(loaded, "hf_device_map", {})})
                inputs = toy.chat_inputs(processor, [toy.message("user", images[0], images[1], "What is shown?")]).to(loaded.device)
                row = _tokens_equal_row(loaded, inputs, CacheStore(), device_map=name, placed_on=placed)
                del loaded
            except Exception as err:
                row = {"device_map": name, "error": "".join(traceback.format_exception_only(err)).strip()}
            rows.append(row)
            print(f"  device map {json.dumps(row)}", flush=True)
    return rows


def decode_ms_per_token(model, inputs, cache_factory, tokens: int) -> float:
    """ms per generated token after the prefill: (time for 1 + tokens) − (time for 1), over `tokens` (median of 3)."""

    def timed(count: int) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(**inputs, max_new_tokens=count, min_new_tokens=count, do_sample=False, **with_cache(model, cache_factory()))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - start

    timed(1)  # warm-up
    # median of 3 pairs: one pair's difference carries the noise of two full prefills
    differences = sorted(timed(1 + tokens) - timed(1) for _ in range(3))
    return differences[1] / tokens * 1e3


def benchmark(device: str, dry_run: bool) -> dict:
    size = BenchSize(toy.TINY, 112, 2, 1) if dry_run else SIZES["7b"]
    dtype = torch.float32 if dry_run else torch.bfloat16
    with torch.device(device):
        model = toy.build_model(size=size.model, dtype=dtype)
    processor = toy.build_processor(max_pixels=size.image_px * size.image_px, min_pixels=56 * 56)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    results, skipped = bench_scenarios(model, processor, size, set("abcd"), None)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    images = [toy.make_image(seed, size.image_px) for seed in range(size.images)]
    inputs = toy.chat_inputs(processor, [toy.message("user", *images, "Describe the pictures.")]).to(device)
    store = CacheStore()
    _generate(model, inputs, VLCache(model, store=store), max_new_tokens=1)
    decode = {
        "after_plain_prefill": decode_ms_per_token(model, inputs, lambda: None, 8 if dry_run else 32),
        "after_vlcache_prefill": decode_ms_per_token(model, inputs, lambda: VLCache(model, store=store), 8 if dry_run else 32),
    }
    return {
        "size": asdict(size), "dtype": str(dtype), "table": markdown(results, size.repeats), "skipped": skipped,
        "results": [asdict(r) for r in results], "peak_gpu_GiB": peak, "decode_ms_per_token": decode,
    }


def write_report(out: Path, stem: str, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str))
    lines = [f"# GPU check ({report['environment'].get('card', report['environment']['device'])})", ""]
    lines.append("Command: `" + report["command"] + "`" + (" — dry run on CPU at toy sizes" if report["dry_run"] else ""))
    lines += ["", "Environment: " + ", ".join(f"{k} {v}" for k, v in report["environment"].items()), ""]
    if report.get("exactness"):
        lines += ["## Exactness against plain `generate`", "",
                  "| family | dtype | attention | full: tokens equal | full: max Δlogit | repeat: tokens equal | repeat: max Δlogit | repeat reused | moved (vlcache 5 %) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in report["exactness"]:
            if "error" in row:
                lines.append(f"| {row['family']} | {row['dtype']} | {row['attention']} | error: {row['error']} | | | | | |")
                continue
            lines.append(
                f"| {row['family']} | {row['dtype']} | {row['attention']} | {row['full_tokens_equal']} | {row['full_max_logit_diff']:.2e} "
                f"| {row['repeat_tokens_equal']} | {row['repeat_max_logit_diff']:.2e} | {row['repeat_reused_tokens']} | {row['moved_tokens']} |"
            )
        lines.append("")
    for section, title, label in (("tiers", "Exact repeat from each store tier", "tier"), ("device_maps", "accelerate device maps", "device_map")):
        if report.get(section):
            lines += [f"## {title}", "", "| " + label + " | full: tokens equal | full: max Δlogit | repeat: tokens equal | repeat: max Δlogit | repeat encoder hits | repeat reused | store load ms | placed |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for row in report[section]:
                if "error" in row:
                    lines.append(f"| {row[label]} | error: {row['error']} | | | | | | | |")
                    continue
                lines.append(
                    f"| {row[label]} | {row['full_tokens_equal']} | {row['full_max_logit_diff']:.2e} | {row['repeat_tokens_equal']} | {row['repeat_max_logit_diff']:.2e} "
                    f"| {row['repeat_encoder_hits']} | {row['repeat_reused_tokens']} | {row['repeat_store_load_ms']:.2f} | {', '.join(row.get('entry_devices') or row.get('placed_on') or [])} |"
                )
            lines.append("")
    if report.get("bandwidth"):
        lines += ["## Host → device load bandwidth", "", " ".join(f"{k}: {v:.2f}" for k, v in report["bandwidth"].items()), ""]
    bench = report.get("benchmark")
    if bench:
        peak = "–" if bench["peak_gpu_GiB"] is None else f"{bench['peak_gpu_GiB']:.2f} GiB"
        decode = bench["decode_ms_per_token"]
        lines += ["## TTFT benchmark", "", f"Size: {bench['size']}, {bench['dtype']}; peak GPU memory {peak}; decode ms/token "
                  f"(median of 3): {decode['after_plain_prefill']:.1f} after a plain prefill, {decode['after_vlcache_prefill']:.1f} "
                  "after a VLCache prefill", "", bench["table"], ""]
    for name, error in report.get("errors", {}).items():
        lines += [f"## {name}: failed", "", "```", error, "```", ""]
    (out / f"{stem}.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, toy sizes, one repeat (CI)")
    parser.add_argument("--out", type=Path, default=None, help="report directory (default: eval/results; dry run: a temp dir)")
    parser.add_argument("--skip-bench", action="store_true", help="exactness and bandwidth only")
    args = parser.parse_args(argv)
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: error: no CUDA device here; run with --dry-run to check the script on CPU", file=sys.stderr)
        return 2
    out = args.out or (Path(tempfile.mkdtemp(prefix="vlcache-gpu-check-")) if args.dry_run else ROOT / "eval" / "results")
    env = environment(device)
    stem = "gpu_check_dry_run" if args.dry_run else "gpu_" + env["card"].lower().replace(" ", "_").replace("-", "_")
    report: dict = {"command": "python eval/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                    "dry_run": args.dry_run, "environment": env, "errors": {}}
    steps = [("exactness", lambda: exactness(device)), ("bandwidth", lambda: load_bandwidth(device, 8 if args.dry_run else 1024)),
             ("tiers", lambda: store_tiers(device)), ("device_maps", lambda: device_maps(device))]
    if not args.skip_bench:
        steps.append(("benchmark", lambda: benchmark(device, args.dry_run)))
    for name, step in steps:
        print(f"gpu_check: {name} …", flush=True)
        try:
            report[name] = step()
        except Exception:  # keep what the other steps measured
            report["errors"][name] = traceback.format_exc()
            print(report["errors"][name], file=sys.stderr, flush=True)
        write_report(out, stem, report)
    print(f"gpu_check: report in {out / (stem + '.md')}")
    checked = report.get("exactness", []) + report.get("tiers", []) + report.get("device_maps", [])
    failed_exactness = [r for r in checked if "error" in r or (r.get("dtype", "float32") == "float32" and not (r["full_tokens_equal"] and r["repeat_tokens_equal"]))]
    return 1 if report["errors"] or failed_exactness else 0


if __name__ == "__main__":
    sys.exit(main())
