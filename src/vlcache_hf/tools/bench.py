"""TTFT benchmark: every reuse mode side by side on the same inputs, per scenario.

Run as `vlcache bench [--size smoke|small|medium] [--repeats N] [--sweep]` or `python eval/bench_ttft.py`.
Each timed request is served from a *copy* of the store as it was after the scenario's seed requests, so a
repetition never profits from what the previous repetition published. Ratios are TTFT(full) / TTFT(mode),
measured in the same run. Writes JSON, a Markdown table and PNG plots under `--out` (default ./vlcache-bench;
files of the same `--name` there are not overwritten without `--force`; `--out eval/results --force`
regenerates the committed results). One repeat (`--smoke`, `--repeats 1`) is flagged as noise.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..cache import VLCache
from ..compat import with_cache
from ..errors import VLCacheError
from ..models import get_adapter
from ..processor import VLCacheProcessor
from ..selection import POLICIES
from ..store.store import CacheStore
from ..store.tiers import MemoryTier
from ..timing import summarize, time_first_token
from . import toy
from .bound import BoundInputs, LayerFlops, copy_bandwidth, ideal_ttft, loaded_bytes
from .memory import peak_memory

FORCE_GQA_VARIABLE = "TRANSFORMERS_SDPA_FORCE_GQA"  # transformers.integrations.sdpa_attention.use_gqa_in_sdpa


@dataclass(frozen=True)
class Mode:
    """One way of serving a request: plain generate, HF prefix caching, or VLCache with a policy."""

    name: str
    kind: str  # "plain" | "hf_prefix" | "vlcache"
    policy: str = ""
    ratio: float = 0.0
    native_gqa: bool = False  # HF prefix caching with transformers' TRANSFORMERS_SDPA_FORCE_GQA=1


MODES = [
    Mode("full", "plain"),
    Mode("hf-prefix", "hf_prefix"),
    Mode("encoder-only", "vlcache", "full"),
    Mode("naive", "vlcache", "none"),
    Mode("first-k 5%", "vlcache", "first_k", 0.05),
    Mode("cacheblend 5%", "vlcache", "cacheblend", 0.05),
    Mode("vlcache 2%", "vlcache", "vlcache", 0.02),
    Mode("vlcache 5%", "vlcache", "vlcache", 0.05),
    # chat only: the request made by `VLCacheProcessor` (stored images are neither preprocessed nor hashed as
    # pixels); its processor call is timed too, as the plain processor's is for the other modes. Its report's
    # encoder time is the wrapper's store lookup, spent in that processor call (outside the TTFT)
    Mode("naive + processor", "vlcache_processor", "none"),
]
#: modes run only when named (`--modes`): HF prefix caching with SDPA's native grouped-query attention forced
#: by transformers' own switch, so its forward over the new text makes no per-group K/V copies either (as
#: VLCache's chat turn does on the CPU): the strongest form of that peer, to see where the rest of a gap comes from
NAMED_ONLY_MODES = [Mode("hf-prefix + native GQA", "hf_prefix", native_gqa=True)]


@dataclass(frozen=True)
class BenchSize:
    model: toy.ToySize
    image_px: int
    images: int
    repeats: int


SIZES = {
    "smoke": BenchSize(toy.TINY, 112, 2, 1),
    "small": BenchSize(toy.ToySize(hidden_size=256, intermediate_size=704, num_layers=6, num_heads=8, num_kv_heads=2, vision_depth=4, vision_hidden=128, vision_heads=4, mrope_section=(4, 6, 6)), 448, 4, 3),
    "medium": BenchSize(toy.MEDIUM, 896, 4, 3),
    # the text model of Qwen2.5-VL-7B (vision tower kept small: the benchmark is about the decoder's prefill);
    # 896 px = 64 × 64 patches of 14 px → 1,024 merged tokens per image. For a GPU (15 GB of bf16 weights).
    "7b": BenchSize(
        toy.ToySize(hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28, num_kv_heads=4,
                    vision_depth=4, vision_hidden=1280, vision_heads=16, mrope_section=(16, 24, 24)),
        896, 4, 3,
    ),
}


@dataclass
class Scenario:
    name: str
    description: str
    seeds: list[Any]  # requests served (and published) before the timed one
    target: Any
    hf_prefix_tokens: int  # tokens a token-prefix cache could reuse for the target
    cold: bool = False
    seed_messages: list[list[dict]] | None = None  # the chats behind `seeds` (chat scenario: for the processor)
    target_messages: list[dict] | None = None  # the chat behind `target`


@dataclass
class ModeResult:
    scenario: str
    mode: str
    ttft: dict[str, float]
    speedup: float = 1.0
    recomputed_fraction: float = 1.0
    ideal_ms: float | None = None  # the honest bound (`bound.ideal_ttft`): the work this mode must still do
    share_of_bound: float | None = None  # ideal / measured TTFT
    bound_parts_ms: dict[str, float] = field(default_factory=dict)
    split_ms: dict[str, float] = field(default_factory=dict)
    prompt_tokens: int = 0
    peak_mib: float | None = None  # peak memory growth of one untimed run (`memory.peak_memory`)
    copy_ms: float | None = None  # HF prefix caching: median per-request copy of its cache (part of its TTFT)
    loaded_mib: float | None = None  # bytes of the stored entries the request read
    processor_ms: float | None = None  # median processor call that makes the request (chat scenario only)


def _chat(processor, *parts):
    return toy.chat_inputs(processor, [toy.message("user", *parts)])


def build_scenarios(processor, size: BenchSize, kinds: set[str]) -> list[Scenario]:
    imgs = [toy.make_image(100 + i, size.image_px) for i in range(size.images + 1)]
    pages = imgs[: size.images]
    scenarios: list[Scenario] = []
    if "a" in kinds:
        turn1 = [toy.message("user", "Here are the pages of my report.", *pages, "Summarise page one.")]
        first = toy.chat_inputs(processor, turn1)
        turn2 = [*turn1, toy.message("assistant", "Page one shows coloured blocks."), toy.message("user", "And the last page?")]
        scenarios.append(Scenario(
            "a-chat", "multi-turn chat, turn 2 (prefix grows)", [first], toy.chat_inputs(processor, turn2), first["input_ids"].shape[1],
            seed_messages=[turn1], target_messages=turn2,
        ))
    if "b" in kinds:
        seed = _chat(processor, "Here are the pages of my report.", *pages, "Summarise them.")
        target = _chat(processor, "You are a careful analyst. Another user asks about the same document:", *pages, "Which page has the most red?")
        scenarios.append(Scenario("b-new-question", "same images, new preamble and question (non-prefix)", [seed], target, _first_image_token(target, processor)))
    if "c" in kinds:
        seed = _chat(processor, "Document:", *pages, "Read it.")
        reordered = [pages[1], pages[0], *pages[2:]]
        reordered[-1] = imgs[-1]  # the last page replaced by a new one
        target = _chat(processor, "Document:", *reordered, "Read it.")
        scenarios.append(Scenario("c-reordered", "images reordered, one replaced", [seed], target, _first_image_token(target, processor)))
    if "d" in kinds:
        target = _chat(processor, "Brand new pages:", *[toy.make_image(900 + i, size.image_px) for i in range(size.images)], "Describe.")
        scenarios.append(Scenario("d-cold", "cold store: nothing stored (overhead)", [], target, 0, cold=True))
    return scenarios


def _on_device(scenario: Scenario, device: torch.device) -> Scenario:
    """The scenario with its requests on the model's device (the processor leaves them on the CPU)."""
    return replace(scenario, seeds=[seed.to(device) for seed in scenario.seeds], target=scenario.target.to(device))


def _first_image_token(inputs, processor) -> int:
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    rows = (inputs["input_ids"][0] == image_id).nonzero()
    return int(rows[0]) if len(rows) else inputs["input_ids"].shape[1] - 1


def _clone_store(store: CacheStore) -> CacheStore:
    """A new in-memory store holding the same entries (tensors are shared, never mutated)."""
    tier = store.tiers[0]
    clone = MemoryTier(tier.byte_budget)
    for key in tier.keys():
        clone.put(key, tier.get(key))
    return CacheStore([clone])


def _seeded_store(model, scenario: Scenario, processor=None) -> CacheStore:
    """A store holding what the scenario's earlier requests published. With `processor` and the chats behind
    them, they are made through `VLCacheProcessor`, which also stores its aliases (raw image key → item key);
    every other entry is the same either way."""
    store = CacheStore([MemoryTier(64 * 1024**3)])
    if processor is not None and scenario.seed_messages:
        wrapper = VLCacheProcessor(processor, model, store)
        requests = [toy.chat_inputs(wrapper, messages).to(model.device) for messages in scenario.seed_messages]
    else:
        requests = scenario.seeds
    for request in requests:
        model.generate(**request, max_new_tokens=1, do_sample=False, **with_cache(model, VLCache(model, store=store)))
    return store


def processor_seconds(processor, messages: list[dict], repeats: int) -> list[float]:
    """Wall time of the plain processor call that makes the request, `repeats` times after a warm-up."""
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        toy.chat_inputs(processor, messages)
        times.append(time.perf_counter() - start)
    return times[1:]


class HFPrefixServer:
    """Prefix caching as HF users do it: a DynamicCache of the shared prefix, deep-copied per request."""

    def __init__(self, model, scenario: Scenario, native_gqa: bool = False):
        from transformers import DynamicCache

        self.model, self.target, self.native_gqa = model, scenario.target, native_gqa
        self.prefix = max(1, min(scenario.hf_prefix_tokens, scenario.target["input_ids"].shape[1] - 1))
        cache = DynamicCache(config=model.config)
        seed = scenario.seeds[0] if scenario.seeds else None
        with torch.no_grad():
            if seed is not None and seed["input_ids"].shape[1] == self.prefix:
                model(**seed, use_cache=True, **with_cache(model, cache))
            else:
                ids = scenario.target["input_ids"][:, : self.prefix]
                model(input_ids=ids, use_cache=True, **with_cache(model, cache))
        self.cache = cache
        self.copy_seconds: list[float] = []
        self.rope_deltas = getattr(model.model, "rope_deltas", None)
        adapter = get_adapter(model)
        image_id = adapter.image_token_id
        ids = self.target["input_ids"][0]
        grid = self.target.get("image_grid_thw")
        keep: list[int] = []
        if grid is not None:
            counts = [int(g.prod()) // 4 for g in grid]
            starts = (ids == image_id).nonzero().flatten().tolist()
            cursor = 0
            for index, count in enumerate(counts):
                if starts[cursor] >= self.prefix:
                    keep.append(index)
                cursor += count
        self.inputs = {k: v for k, v in self.target.items() if k not in ("pixel_values", "image_grid_thw")}
        if keep:
            pixels = adapter.split_pixels(self.target["pixel_values"], grid)
            self.inputs["pixel_values"] = torch.cat([pixels[i] for i in keep])
            self.inputs["image_grid_thw"] = grid[keep]

    def time(self) -> float:
        """TTFT of one request, the per-request copy of the prefix cache included: a server must copy it (else
        the request's own tokens are appended to the shared prefix), just as VLCache's TTFT includes copying
        stored K/V out of the store. The copy's seconds are kept in `copy_seconds`."""
        start = time.perf_counter()
        cache = copy.deepcopy(self.cache)
        self.copy_seconds.append(time.perf_counter() - start)
        self.model.model.rope_deltas = self.rope_deltas  # generate reads the stale model-level deltas otherwise
        with _forced_native_gqa(self.native_gqa):
            return self.copy_seconds[-1] + time_first_token(self.model, self.inputs, cache)


@contextmanager
def _forced_native_gqa(enabled: bool) -> Iterator[None]:
    """transformers' own switch (read at every attention call) that makes its SDPA path use native grouped-query
    attention even with a mask, set for the block only."""
    if not enabled:
        yield
        return
    previous = os.environ.get(FORCE_GQA_VARIABLE)
    os.environ[FORCE_GQA_VARIABLE] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[FORCE_GQA_VARIABLE]
        else:
            os.environ[FORCE_GQA_VARIABLE] = previous


@dataclass
class ModeRun:
    """What `run_mode` measured for one mode on one scenario."""

    times: list[float]  # TTFT of each timed run, seconds
    report: Any  # the last run's `PrefillReport` (None for plain and HF-prefix modes)
    peak_bytes: int | None  # peak memory growth of one more, untimed run (None: not measured)
    copy_seconds: list[float]  # HF prefix caching only: the per-request copy of its cache, timed runs
    processor_seconds: list[float] = field(default_factory=list)  # "naive + processor": its processor calls


class ModeRunner:
    """Serves the scenario's target in one mode, one request per `request()` call (a fresh cache and store clone
    each time; HF prefix caching copies its prefix cache). The "naive + processor" mode makes each request with
    `VLCacheProcessor` over `processor`, its call timed apart from the TTFT."""

    def __init__(self, model, scenario: Scenario, mode: Mode, seeded: CacheStore | None, processor=None):
        self.model, self.scenario, self.mode, self.seeded, self.processor = model, scenario, mode, seeded, processor
        self.server = HFPrefixServer(model, scenario, native_gqa=mode.native_gqa) if mode.kind == "hf_prefix" else None
        self.report: Any = None
        self.processor_seconds: list[float] = []

    def request(self) -> float:
        model, mode = self.model, self.mode
        cache, target = None, self.scenario.target
        if mode.kind not in ("plain", "hf_prefix"):
            store = CacheStore([MemoryTier(64 * 1024**3)]) if self.seeded is None else _clone_store(self.seeded)
            cache = VLCache(model, store=store, policy=mode.policy, recompute_ratio=mode.ratio)
            if mode.kind == "vlcache_processor":
                start = time.perf_counter()
                target = toy.chat_inputs(VLCacheProcessor(self.processor, model, store), self.scenario.target_messages).to(model.device)
                self.processor_seconds.append(time.perf_counter() - start)
        seconds = self.server.time() if self.server is not None else time_first_token(model, target, cache)
        if cache is not None:
            self.report = cache.report
        return seconds


def run_modes(
    model, scenario: Scenario, modes: list[Mode], repeats: int, seeded: CacheStore | None, measure_memory: bool = True,
    processor=None,
) -> list[ModeRun]:
    """Per mode, `repeats` timed runs after one dropped warm-up, taken in turns (mode 1, mode 2, …, then again):
    a machine that slows down or speeds up during the run then weighs on every mode alike, not on the modes
    that happened to run late. Then (with `measure_memory`) one more run per mode, not timed, under
    `peak_memory` (on the CPU it runs under the profiler, which would distort a timing)."""
    runners = [ModeRunner(model, scenario, mode, seeded, processor) for mode in modes]
    times: list[list[float]] = [[] for _ in runners]
    for _ in range(repeats + 1):  # the first round warms up allocators and is dropped
        for runner, taken in zip(runners, times, strict=True):
            taken.append(runner.request())
    runs = []
    for runner, taken in zip(runners, times, strict=True):
        timed_processor = runner.processor_seconds[1 : repeats + 1]
        peak = None
        if measure_memory:
            with peak_memory(model.device) as measured:
                runner.request()
            peak = measured.bytes
        copies = runner.server.copy_seconds[1:] if runner.server is not None else []
        runs.append(ModeRun(taken[1:], runner.report, peak, copies, timed_processor))
    return runs


def run_mode(
    model, scenario: Scenario, mode: Mode, repeats: int, seeded: CacheStore | None, measure_memory: bool = True,
    processor=None,
) -> ModeRun:
    """`run_modes` for one mode."""
    return run_modes(model, scenario, [mode], repeats, seeded, measure_memory, processor)[0]


def _images(scenario: Scenario) -> int:
    grid = scenario.target.get("image_grid_thw")
    return 0 if grid is None else int(grid.shape[0])


def _bound_inputs(model, scenario: Scenario, repeats: int) -> BoundInputs:
    """The measured costs of this scenario's honest bound: the vision tower per image (median of `repeats` + 1
    runs on the target's images), the device's copy bandwidth, the model's FLOPs (full prefill time is set
    once the plain mode has run)."""
    target, adapter = scenario.target, get_adapter(model)
    images = _images(scenario)
    per_image = 0.0
    if images:
        pixels = target["pixel_values"].to(model.device, model.dtype)
        times = []
        for _ in range(max(2, repeats + 1)):
            _sync_model(model)
            start = time.perf_counter()
            with torch.no_grad():
                model.model.get_image_features(pixels, target["image_grid_thw"].to(model.device))
            _sync_model(model)
            times.append(time.perf_counter() - start)
        per_image = sorted(times[1:])[len(times[1:]) // 2] / images
    text = model.config.text_config
    hidden_itemsize = torch.empty((), dtype=model.dtype).element_size()
    return BoundInputs(
        encoder_s_per_image=per_image,
        full_prefill_s=0.0,
        copy_bytes_per_s=copy_bandwidth(model.device),
        flops=LayerFlops.of(text),
        kv_bytes_per_token=adapter.kv_layout.bytes_per_token(),
        encoder_bytes_per_token=text.hidden_size * hidden_itemsize,
    )


def _sync_model(model) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


def available_modes(names: list[str] | None) -> tuple[list[Mode], list[str]]:
    modes, skipped = [], []
    for mode in MODES + [mode for mode in NAMED_ONLY_MODES if names and mode.name in names]:
        if names and mode.name not in names:
            continue
        if mode.kind == "vlcache" and mode.policy not in POLICIES:
            skipped.append(f"{mode.name} (policy {mode.policy!r} not available)")
            continue
        modes.append(mode)
    return modes, skipped


def bench_scenarios(model, processor, size: BenchSize, kinds: set[str], mode_names: list[str] | None) -> tuple[list[ModeResult], list[str]]:
    modes, skipped = available_modes(mode_names)
    results: list[ModeResult] = []
    for scenario in build_scenarios(processor, size, kinds):
        scenario = _on_device(scenario, model.device)
        seeded = None if scenario.cold else _seeded_store(model, scenario, processor)
        wanted = [m for m in modes if not scenario.cold or m.name in ("full", "naive")]
        if scenario.cold or not scenario.seeds:
            wanted = [m for m in wanted if m.kind != "hf_prefix"]
        plain_processor_ms = None
        if scenario.target_messages is None:
            wanted = [m for m in wanted if m.kind != "vlcache_processor"]
        elif any(m.kind == "vlcache_processor" for m in wanted):
            plain_processor_ms = summarize(processor_seconds(processor, scenario.target_messages, size.repeats))["median"] * 1e3
        full_median = None
        costs = _bound_inputs(model, scenario, size.repeats)
        for mode, run in zip(wanted, run_modes(model, scenario, wanted, size.repeats, seeded, processor=processor), strict=True):
            report, stats = run.report, summarize(run.times)
            result = ModeResult(scenario.name, mode.name, stats, prompt_tokens=int(scenario.target["input_ids"].shape[1]))
            result.processor_ms = summarize(run.processor_seconds)["median"] * 1e3 if run.processor_seconds else plain_processor_ms
            result.peak_mib = None if run.peak_bytes is None else run.peak_bytes / 2**20
            result.copy_ms = summarize(run.copy_seconds)["median"] * 1e3 if run.copy_seconds else None
            if mode.kind == "plain":
                full_median = stats["median"]
                costs = replace(costs, full_prefill_s=max(1e-9, full_median - costs.encoder_s_per_image * _images(scenario)))
            if full_median:
                result.speedup = full_median / stats["median"]
            if report is not None:
                fraction = sum(report.recomputed_per_layer) / (len(report.recomputed_per_layer) * report.total_tokens)
                result.recomputed_fraction = fraction
                ideal, parts = ideal_ttft(report, costs)
                result.ideal_ms, result.share_of_bound = ideal * 1e3, ideal / stats["median"]
                result.bound_parts_ms = {name: value * 1e3 for name, value in parts.items()}
                result.loaded_mib = loaded_bytes(report, costs) / 2**20
                t = report.timings
                other = max(0.0, stats["median"] - t.total_s)
                result.split_ms = {
                    "encoder": t.encoder_s * 1e3,
                    "store_load": t.store_load_s * 1e3,
                    "rerotation": t.rerotation_s * 1e3,
                    "selective_prefill": t.prefill_s * 1e3,
                    "publish": t.publish_s * 1e3,
                    "other": other * 1e3,
                }
            results.append(result)
            print(f"  {scenario.name:16s} {mode.name:15s} TTFT {stats['median'] * 1e3:9.1f} ms  x{result.speedup:6.2f}", flush=True)
    return results, skipped


def _sweep_point(model, processor, size: BenchSize, modes: list[Mode], axis: str, value: float) -> list[dict]:
    scenario = _on_device(build_scenarios(processor, size, {"b"})[0], model.device)
    seeded = _seeded_store(model, scenario)
    rows = []
    for mode in modes:
        run = run_mode(model, scenario, mode, size.repeats, seeded, measure_memory=False)
        times, report = run.times, run.report
        row = {
            "axis": axis,
            "value": value,
            "images": size.images,
            "image_tokens": toy.image_tokens(size.image_px),
            "prompt_tokens": int(scenario.target["input_ids"].shape[1]),
            "mode": mode.name,
            "ttft_s": summarize(times)["median"],
            "recomputed_tokens": report.recomputed_tokens if report else None,
        }
        rows.append(row)
        print(f"  sweep {axis}={value:<6g} {mode.name:15s} {row['prompt_tokens']:6d} tokens {row['ttft_s'] * 1e3:9.1f} ms", flush=True)
    return rows


def sweep(model, processor, size: BenchSize) -> list[dict]:
    """How TTFT grows, on the non-prefix scenario: with the number of images, with tokens per image, and
    (for selective policies) with the recompute budget."""
    repeats = max(1, size.repeats - 1)
    base, _ = available_modes(["full", "naive", "vlcache 5%"])
    rows: list[dict] = []
    for count in (1, 2, 4, 8):
        rows += _sweep_point(model, processor, BenchSize(size.model, size.image_px, count, repeats), base, "images", count)
    for px in sorted({size.image_px // 4, size.image_px // 2, size.image_px}):
        if px >= 56:
            rows += _sweep_point(model, processor, BenchSize(size.model, px, 2, repeats), base, "image_px", px)
    selective = [p for p in ("first_k", "cacheblend", "vlcache") if p in POLICIES]
    for ratio in (0.01, 0.02, 0.05, 0.1, 0.2):
        modes = [Mode(f"{p} {ratio:.0%}", "vlcache", p, ratio) for p in selective]
        if modes:
            rows += _sweep_point(model, processor, BenchSize(size.model, size.image_px, size.images, repeats), modes, "budget", ratio)
    return rows


def markdown(results: list[ModeResult], repeats: int | None = None) -> str:
    """The results table; with one repeat per mode (`repeats=1`) its speedup column is footnoted as noise."""
    mark = " †" if repeats == 1 else ""
    lines = [
        f"| scenario | mode | TTFT median ms (min–max) | speedup vs full{mark} | recomputed | ideal ms (encoder / prefill / load) | share of bound | encoder / load / rerotate / prefill / publish / other ms | peak MiB | entries loaded MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        split = " / ".join(f"{v:.0f}" for v in r.split_ms.values()) if r.split_ms else "–"
        ideal = "–" if r.ideal_ms is None else f"{r.ideal_ms:.1f} ({' / '.join(f'{v:.1f}' for v in r.bound_parts_ms.values())})"
        share = "–" if r.share_of_bound is None else f"{r.share_of_bound:.0%}"
        peak = "–" if r.peak_mib is None else f"{r.peak_mib:.0f}"
        loaded = "–" if r.loaded_mib is None else f"{r.loaded_mib:.0f}"
        lines.append(
            f"| {r.scenario} | {r.mode} | {r.ttft['median'] * 1e3:.1f} ({r.ttft['min'] * 1e3:.1f}–{r.ttft['max'] * 1e3:.1f}) | "
            f"{r.speedup:.2f}× | {r.recomputed_fraction:.1%} | {ideal} | {share} | {split} | {peak} | {loaded} |"
        )
    lines += against_hf_prefix(results)
    if repeats == 1:
        lines += ["", f"† {NOISE_WARNING[0].upper()}{NOISE_WARNING[1:]} (`--smoke` or `--repeats 1`)."]
    return "\n".join(lines)


def against_hf_prefix(results: list[ModeResult]) -> list[str]:
    """Per scenario, naive reuse against Hugging Face's own prefix caching in the same run (TTFT ratio HF / ours:
    above 1× means VLCache answers sooner)."""
    medians = {(r.scenario, r.mode): r.ttft["median"] for r in results}
    lines = []
    for scenario in dict.fromkeys(r.scenario for r in results):
        hf, naive = medians.get((scenario, "hf-prefix")), medians.get((scenario, "naive"))
        if hf and naive:
            copy_ms = next((r.copy_ms for r in results if (r.scenario, r.mode) == (scenario, "hf-prefix")), None)
            copied = f" (its per-request cache copy: {copy_ms:.1f} ms)" if copy_ms is not None else ""
            lines.append(f"- {scenario}: HF prefix cache {hf * 1e3:.1f} ms{copied} / naive reuse {naive * 1e3:.1f} ms = {hf / naive:.2f}×")
        forced = medians.get((scenario, NAMED_ONLY_MODES[0].name))
        if forced and naive:
            lines.append(
                f"- {scenario}: HF prefix cache with native GQA forced (`{FORCE_GQA_VARIABLE}=1`) {forced * 1e3:.1f} ms / "
                f"naive reuse {naive * 1e3:.1f} ms = {forced / naive:.2f}×"
            )
        lines += _end_to_end(results, scenario)
    return ["", "Against Hugging Face prefix caching (same run):", "", *lines] if lines else []


def _end_to_end(results: list[ModeResult], scenario: str) -> list[str]:
    """Processor call + TTFT of HF prefix caching (plain processor) against naive reuse with the request made by
    `VLCacheProcessor`, and that mode's TTFT alone against HF's."""
    rows = {r.mode: r for r in results if r.scenario == scenario}
    hf, ours = rows.get("hf-prefix"), rows.get("naive + processor")
    if hf is None or ours is None or hf.processor_ms is None or ours.processor_ms is None:
        return []
    hf_total, ours_total = hf.processor_ms + hf.ttft["median"] * 1e3, ours.processor_ms + ours.ttft["median"] * 1e3
    return [
        f"- {scenario}, the request made by `VLCacheProcessor`: TTFT alone {hf.ttft['median'] * 1e3:.1f} / "
        f"{ours.ttft['median'] * 1e3:.1f} ms = {hf.ttft['median'] / ours.ttft['median']:.2f}×; processor call + TTFT: HF prefix cache "
        f"{hf_total:.1f} ms (plain processor {hf.processor_ms:.1f} ms) / naive reuse {ours_total:.1f} ms "
        f"(`VLCacheProcessor` {ours.processor_ms:.1f} ms) = {hf_total / ours_total:.2f}×"
    ]


def plot(results: list[ModeResult], sweep_rows: list[dict], out: Path, stem: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    scenarios = sorted({r.scenario for r in results})
    modes = [m.name for m in MODES + NAMED_ONLY_MODES if any(r.mode == m.name for r in results)]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / max(1, len(modes))
    for i, mode in enumerate(modes):
        values = [next((r.speedup for r in results if r.scenario == s and r.mode == mode), 0) for s in scenarios]
        ax.bar([x + i * width for x in range(len(scenarios))], values, width, label=mode)
    ax.set_xticks([x + width * (len(modes) - 1) / 2 for x in range(len(scenarios))], scenarios)
    ax.set_ylabel("TTFT(full) / TTFT(mode)")
    ax.set_yscale("log")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.legend(fontsize=8, ncol=2)
    ax.set_title("vlcache-hf: TTFT speedup by scenario and mode")
    fig.tight_layout()
    path = out / f"{stem}_speedup.png"
    fig.savefig(path, dpi=120)
    files.append(str(path))
    plt.close(fig)
    growth = [r for r in sweep_rows if r["axis"] in ("images", "image_px")]
    if growth:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, axis, label in ((axes[0], "images", "number of images"), (axes[1], "image_px", "tokens per image (2 images)")):
            for mode in sorted({r["mode"] for r in growth}):
                rows = sorted((r for r in growth if r["mode"] == mode and r["axis"] == axis), key=lambda r: r["prompt_tokens"])
                ax.plot([r["prompt_tokens"] for r in rows], [r["ttft_s"] * 1e3 for r in rows], marker="o", label=mode)
            ax.set_xlabel(f"prompt tokens (varying {label})")
            ax.set_ylabel("TTFT ms")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.legend()
        fig.suptitle("TTFT vs prompt length, non-prefix scenario (b)")
        fig.tight_layout()
        path = out / f"{stem}_growth.png"
        fig.savefig(path, dpi=120)
        files.append(str(path))
        plt.close(fig)
    budget = [r for r in sweep_rows if r["axis"] == "budget"]
    if budget:
        fig, ax = plt.subplots(figsize=(6, 4))
        for policy in sorted({r["mode"].split()[0] for r in budget}):
            rows = sorted((r for r in budget if r["mode"].split()[0] == policy), key=lambda r: r["value"])
            ax.plot([r["value"] * 100 for r in rows], [r["ttft_s"] * 1e3 for r in rows], marker="o", label=policy)
        ax.set_xlabel("recompute budget (% of reused tokens)")
        ax.set_ylabel("TTFT ms")
        ax.legend()
        ax.set_title("TTFT vs recompute budget, scenario (b)")
        fig.tight_layout()
        path = out / f"{stem}_budget.png"
        fig.savefig(path, dpi=120)
        files.append(str(path))
        plt.close(fig)
    return files


def environment() -> dict[str, str]:
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_threads": str(torch.get_num_threads()),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }


NOISE_WARNING = "one repeat per mode: TTFTs and speedups are noise, not measurements; use --repeats 3 or more"


#: the files one run writes (a `--force` run removes those of an earlier run it does not rewrite)
BENCH_OUTPUT_SUFFIXES = (".json", ".md", "_speedup.png", "_growth.png", "_budget.png")


def _output_paths(out: Path, stem: str) -> list[Path]:
    return [out / f"{stem}{suffix}" for suffix in BENCH_OUTPUT_SUFFIXES]


def run(args: argparse.Namespace) -> int:
    """Run the benchmark the parsed `vlcache bench` arguments describe (`tools.cli.add_bench_arguments`)."""
    size_name = "smoke" if args.smoke else args.size
    size = SIZES[size_name]
    if args.repeats:
        size = BenchSize(size.model, size.image_px, size.images, args.repeats)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise VLCacheError(f"--device {device}: no CUDA device is available here; use --device cpu")
    unknown = sorted(set(args.scenarios) - set("abcd"))
    if unknown or not args.scenarios:
        raise VLCacheError(f"--scenarios {args.scenarios!r}: use letters of 'abcd'")
    mode_names = [name.strip() for name in args.modes.split(",")] if args.modes else None
    known = [m.name for m in MODES + NAMED_ONLY_MODES]
    unknown = [name for name in mode_names or [] if name not in known]
    if unknown:
        raise VLCacheError(f"--modes: unknown {unknown}; choose from {known}")
    out = Path(args.out).expanduser()
    stem = args.name or f"ttft_{size_name}_{device}"
    if out.exists() and not out.is_dir():
        raise VLCacheError(f"--out {out} is a file, not a directory")
    existing = [path for path in _output_paths(out, stem) if path.exists()]
    if existing and not args.force:
        raise VLCacheError(
            f"{existing[0]} already exists; pass --force to overwrite it, or choose another --out or --name"
        )
    noisy = size.repeats == 1
    if noisy:
        print(f"vlcache bench: warning: {NOISE_WARNING}", file=sys.stderr, flush=True)
    elif args.sweep and size.repeats == 2:
        print("vlcache bench: warning: the sweep uses one repeat per point (repeats - 1): its TTFTs are noise",
              file=sys.stderr, flush=True)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    model = toy.build_model(size=size.model, dtype=dtype).to(device)
    processor = toy.build_processor(max_pixels=size.image_px * size.image_px, min_pixels=56 * 56)
    print(f"vlcache bench: size={size_name} device={device} dtype={dtype} images={size.images}×{toy.image_tokens(size.image_px)} tokens", flush=True)
    start = time.perf_counter()
    results, skipped = bench_scenarios(model, processor, size, set(args.scenarios), mode_names)
    sweep_rows = sweep(model, processor, size) if args.sweep else []
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(results, size.repeats)
    layout = get_adapter(model).kv_layout
    typed = getattr(args, "argv", None)
    command = shlex.join(typed[1:] if typed and typed[0] == "bench" else (typed or []))  # quoted as typed in a shell
    payload = {
        "command": ("vlcache bench " + command).strip(),
        "environment": environment(),
        "size": {"name": size_name, **asdict(size)},
        "kv_bytes_per_token": layout.bytes_per_token(),
        "skipped_modes": skipped,
        "warning": NOISE_WARNING if noisy else "",
        "results": [asdict(r) for r in results],
        "sweep": sweep_rows,
        "seconds": time.perf_counter() - start,
    }
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=2))
    header = f"# TTFT benchmark ({size_name}, {device}, {dtype})\n\nCommand: `{payload['command']}`\n\n"
    env = ", ".join(f"{k} {v}" for k, v in payload["environment"].items())
    (out / f"{stem}.md").write_text(header + f"Environment: {env}. KV bytes per token: {layout.bytes_per_token()}.\n\n" + table + "\n")
    files = plot(results, sweep_rows, out, stem)
    written = {str(out / f"{stem}.json"), str(out / f"{stem}.md"), *files}
    for path in _output_paths(out, stem):  # with --force: no plot of an earlier run left beside this run's
        if str(path) not in written and path.exists():
            path.unlink()
    print(table)
    if skipped:
        print("skipped: " + "; ".join(skipped))
    print(f"wrote {out / (stem + '.json')}, {out / (stem + '.md')}, " + ", ".join(files))
    return 0
