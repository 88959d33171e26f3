"""`vlcache demo`: a short multi-turn conversation over several images, plain vs VLCache, turn by turn."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from . import toy
from .cache import VLCache
from .compat import with_cache
from .store.store import CacheStore
from .timing import time_first_token


@dataclass
class TurnResult:
    title: str
    answer: str
    same_as_plain: bool
    ttft_plain_ms: float
    ttft_vlcache_ms: float
    report: object
    expected: str | None = None


def load_demo_model(model_path: str | None = None):
    """The embedded trained model when present, a path if given, else a seeded random-weight toy model."""
    if model_path:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        return AutoModelForImageTextToText.from_pretrained(model_path).eval(), AutoProcessor.from_pretrained(model_path), model_path
    try:
        from .pretrained import load_default  # the embedded trained model (eval/synthetic/train.py)

        model, processor = load_default()
        return model, processor, "embedded vlcache-tiny-qwen2.5-vl"
    except (ImportError, OSError, FileNotFoundError):
        return toy.build_model(), toy.build_processor(), "random-weight toy Qwen2.5-VL"


def _generate(model, inputs, cache=None, max_new_tokens: int = 12):
    start = time.perf_counter()
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, **with_cache(model, cache))
    return out, time.perf_counter() - start


def _conversation(trained: bool):
    """(images, [(title, first-turn text, image indices, question, expected answer or None), ...]).

    With the embedded trained model the pictures and questions come from its synthetic VQA task, so the
    answers can be checked; with the random-weight fallback they are arbitrary.
    """
    if trained:
        from . import synthetic

        scenes = [
            synthetic.Scene("red", "circle", 1, ()),
            synthetic.Scene("blue", "triangle", 1, ()),
            synthetic.Scene("yellow", "square", 1, ()),
        ]
        images = [synthetic.render(scene) for scene in scenes]
        questions = [
            ("Do the first image and the second image have the same color? Answer with one word.", "no"),
            ("What shape is in the third image? Answer with one word.", "square"),
            ("What shape is in the second image? Answer with one word.", "circle"),
        ]
    else:
        images = [toy.make_image(seed) for seed in (11, 12, 13)]
        questions = [("What is in the first image?", None), ("And how does this one compare?", None), ("Which one is brighter?", None)]
    return images, questions


def run_demo(policy: str = "vlcache", recompute_ratio: float = 0.05, model_path: str | None = None, max_new_tokens: int = 12):
    """Run the conversation; returns (model description, per-turn results)."""
    torch.manual_seed(0)
    model, processor, description = load_demo_model(model_path)
    trained = description.startswith("embedded")
    images, questions = _conversation(trained)
    store = CacheStore()
    results: list[TurnResult] = []

    def play(title: str, messages: list[dict], expected: str | None) -> str:
        inputs = toy.chat_inputs(processor, messages)
        plain_ids, _ = _generate(model, inputs, max_new_tokens=max_new_tokens)
        ttft_plain = time_first_token(model, inputs)
        # the timed VLCache run is the first to see this prompt: no exact repeat helps it
        cache = VLCache(model, store=store, policy=policy, recompute_ratio=recompute_ratio, prefix_chunk_size=16)
        ttft_ours = time_first_token(model, inputs, cache)
        cache_full = VLCache(model, store=store, policy=policy, recompute_ratio=recompute_ratio, prefix_chunk_size=16)
        ids, _ = _generate(model, inputs, cache_full, max_new_tokens=max_new_tokens)
        prompt_len = inputs["input_ids"].shape[1]
        answer = processor.decode(ids[0, prompt_len:], skip_special_tokens=True).strip()
        results.append(
            TurnResult(title, answer, torch.equal(ids, plain_ids), ttft_plain * 1e3, ttft_ours * 1e3, cache.report, expected)
        )
        return answer

    label = [" first image: ", " second image: ", " third image: "]
    chat = [toy.message("user", "Look at the pictures below.", label[0], images[0], label[1], images[1], " " + questions[0][0])]
    answer = play("turn 1: two new images", chat, questions[0][1])
    chat += [toy.message("assistant", answer), toy.message("user", "One more.", label[2], images[2], " " + questions[1][0])]
    play("turn 2: same chat, one more image", chat, questions[1][1])
    swapped = [
        toy.message("user", "Please study these images carefully.", label[0], images[1], label[1], images[0], " " + questions[2][0])
    ]
    play("turn 3: new chat, the images swapped (non-prefix reuse)", swapped, questions[2][1])
    return description, results


def format_results(description: str, policy: str, results: list[TurnResult]) -> str:
    lines = [f"model: {description}; policy: {policy}", ""]
    for r in results:
        rep = r.report
        lines += [
            f"== {r.title}",
            f"   answer: {r.answer!r}"
            + (f" (expected {r.expected!r})" if r.expected is not None else "")
            + f"   same as plain generate: {'yes' if r.same_as_plain else 'no'}",
            f"   TTFT plain {r.ttft_plain_ms:.1f} ms, VLCache {r.ttft_vlcache_ms:.1f} ms",
            f"   encoder hits {rep.encoder_hits}/{rep.images}; tokens reused {rep.reused_tokens} "
            f"(prefix {rep.prefix_tokens}), recomputed {rep.recomputed_tokens} of {rep.total_tokens}",
        ]
    return "\n".join(lines)
