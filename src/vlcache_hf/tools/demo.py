"""`vlcache demo`: a short multi-turn conversation over several images, plain vs VLCache, turn by turn."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..cache import VLCache
from ..compat import with_cache
from ..errors import VLCacheError
from ..selection import make_policy
from ..store.store import CacheStore
from ..timing import time_first_token
from . import toy


@dataclass
class TurnResult:
    title: str
    answer: str
    same_as_plain: bool
    ttft_plain_ms: float
    ttft_vlcache_ms: float
    report: object
    expected: str | None = None
    plain_answer: str = ""  # plain `generate`'s answer to the same prompt

    @property
    def moved_tokens(self) -> int:
        """Prompt tokens filled from K/V computed in another context (approximate reuse); 0: exact reuse."""
        return int(getattr(self.report, "moved_tokens", 0) or 0)


def load_demo_model(model_path: str | None = None):
    """The embedded trained model when present, a path if given, else a seeded random-weight toy model."""
    if model_path:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if not Path(model_path).expanduser().exists() and not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", model_path):
            # neither a directory nor a Hub id ("org/name"): say so before transformers tries the network
            raise VLCacheError(f"--model {model_path}: no such model directory")
        try:
            model = AutoModelForImageTextToText.from_pretrained(model_path).eval()
            return model, AutoProcessor.from_pretrained(model_path), model_path
        except (OSError, ValueError) as err:  # not a model directory / hub id, or a model transformers cannot load
            reason = " ".join(str(err).split())
            raise VLCacheError(f"--model {model_path}: cannot load it as an image-text-to-text model: {reason}") from err
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
    make_policy(policy, recompute_ratio)  # a bad policy name or ratio fails before the model loads
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
        plain_answer = processor.decode(plain_ids[0, prompt_len:], skip_special_tokens=True).strip()
        results.append(
            TurnResult(
                title, answer, torch.equal(ids, plain_ids), ttft_plain * 1e3, ttft_ours * 1e3, cache.report, expected,
                plain_answer,
            )
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


def approximation_note(policy: str, recompute_ratio: float | None = None) -> str:
    """One line: when reuse is exact, when it is approximate and why (README, "Exactness")."""
    if policy == "full":
        return ("reuse: policy 'full' recomputes every prompt token and reuses only encoder outputs, so every "
                "answer equals plain generate")
    share = f"{recompute_ratio:.0%} of them" if recompute_ratio is not None else "the policy's share of them"
    what = "none of them" if policy == "none" else share
    return (f"reuse: exact for a repeated or growing prefix (turns 1-2); images at new positions (turn 3) reuse "
            f"K/V computed in another context (re-rotated, approximate; policy {policy!r} recomputes {what}), "
            "so an answer may differ from plain generate; policy 'full' is always exact")


def format_results(description: str, policy: str, results: list[TurnResult], recompute_ratio: float | None = None) -> str:
    lines = [f"model: {description}; policy: {policy}", approximation_note(policy, recompute_ratio), ""]
    for r in results:
        rep = r.report
        reuse = (f"approximate: {r.moved_tokens} image tokens reused from another context" if r.moved_tokens
                 else "exact")
        lines += [
            f"== {r.title}",
            *([f"   expected:       {r.expected!r}"] if r.expected is not None else []),
            f"   plain generate: {r.plain_answer!r}",
            f"   VLCache:        {r.answer!r}   same as plain generate: {'yes' if r.same_as_plain else 'no'} "
            f"(reuse {reuse})",
            f"   TTFT plain {r.ttft_plain_ms:.1f} ms, VLCache {r.ttft_vlcache_ms:.1f} ms",
            f"   encoder hits {rep.encoder_hits}/{rep.images}; tokens reused {rep.reused_tokens} "
            f"(prefix {rep.prefix_tokens}, moved {rep.moved_tokens}), recomputed {rep.recomputed_tokens} of "
            f"{rep.total_tokens}",
        ]
    return "\n".join(lines)
