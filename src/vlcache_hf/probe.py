"""The probe machinery: run one moved-image request under several modes and compare them with full recompute.

A *moved-image request* is a pair of chats over the same images: a warm-up chat (another preamble, the
images in another order) whose encoder outputs and K/V go to a store, then the probe chat, whose image
tokens are served from that store at new positions (non-prefix reuse). Comparing a policy's probe output
with full recomputation's (first-token KL, per-layer K/V error) measures exactly the error that selective
recomputation must repair.

This is runtime, not tooling: the calibration pass (`vlcache_hf.calibrate`) measures each layer's
sensitivity with it, so it imports only runtime modules (never `vlcache_hf.tools`). The fidelity reports
(`eval/fidelity.py`, `eval/fidelity_probe.py`, `eval/compare_allocations.py`) and the fidelity tests use it
too. `import vlcache_hf` does not load it (it imports torch).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .cache import VLCache
from .compat import with_cache
from .models import request_images
from .selection import LayerProfile, SelectionPolicy
from .store.store import CacheStore

WARMUP_PREAMBLES = (
    "Describe each of these pictures briefly.",
    "Write a caption for every image below.",
    "Here is a set of images to remember.",
)
PROBE_PREAMBLES = (
    "A new question about some pictures follows.",
    "Please look carefully at the following images, then answer.",
    "I will show you images and ask one thing.",
)
PROBE_QUESTIONS = ("What is in the second image?", "Which image is the brightest?", "Compare the first and the last image.")


@dataclass
class MovedImageRequest:
    """A warm-up chat and a probe chat over the same images (chat messages in the processor's format)."""

    warmup: list[dict]
    probe: list[dict]


def _chat(text_before: str, images: list, text_after: str) -> list[dict]:
    content = [{"type": "text", "text": text_before + " "}]
    content += [{"type": "image", "image": image} for image in images]
    content.append({"type": "text", "text": " " + text_after})
    return [{"role": "user", "content": content}]


def moved_image_request(images: list, rng: random.Random, probe: list[dict] | None = None) -> MovedImageRequest:
    """Warm-up = the images shuffled after another preamble; probe = `probe` or a generic question chat."""
    order = list(range(len(images)))
    while len(order) > 1 and order == sorted(order):  # compare positions: equal pictures may repeat
        rng.shuffle(order)
    shuffled = [images[index] for index in order]
    warmup = _chat(rng.choice(WARMUP_PREAMBLES), shuffled, "Describe them.")
    if probe is None:
        probe = _chat(rng.choice(PROBE_PREAMBLES), list(images), rng.choice(PROBE_QUESTIONS))
    return MovedImageRequest(warmup, probe)


def chat_inputs(
    processor,
    messages: list[dict],
    device: torch.device | str | None = "cpu",
    add_generation_prompt: bool = True,
):
    """Processor inputs (`input_ids`, `pixel_values`, ...) for a chat of text, PIL images and videos (the
    images of the chat form one prompt), on `device` (None: where the processor put them)."""
    items = [item for msg in messages for item in msg["content"]]
    images = [item["image"] for item in items if item["type"] == "image"]
    videos = [item["video"] for item in items if item["type"] == "video"]
    text = processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    extra = {"videos": videos} if videos else {}
    inputs = processor(text=[text], images=request_images(processor, images) or None, return_tensors="pt", **extra)
    return inputs if device is None else inputs.to(device)


@dataclass
class ProbeOutput:
    """What one policy produced on one probe: first-step logits, the generated ids and the cache."""

    logits: torch.Tensor  # [vocab] logits of the first generated token
    tokens: list[int]
    cache: VLCache | None


@torch.no_grad()
def run_probe(
    model,
    inputs,
    store: CacheStore,
    policy: str | SelectionPolicy,
    recompute_ratio: float | None = None,
    profile: LayerProfile | None = None,
    max_new_tokens: int = 1,
) -> ProbeOutput:
    """Generate greedily through a VLCache that reads `store` and publishes nothing (the store stays as is)."""
    cache = VLCache(model, store=store, policy=policy, recompute_ratio=recompute_ratio, publish=False, profile=profile)
    out = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        **with_cache(model, cache),
    )
    tokens = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    return ProbeOutput(out.logits[0][0].float(), tokens, cache)


@torch.no_grad()
def warm_store(model, inputs, store: CacheStore) -> None:
    """Run a warm-up chat once with full recomputation so its encoder outputs and exact K/V are published."""
    run_cache = VLCache(model, store=store, policy="full")
    model.generate(**inputs, max_new_tokens=1, do_sample=False, **with_cache(model, run_cache))


def kl_divergence(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """KL(reference ‖ candidate) of the next-token distributions given by two logit vectors.

    In float64: in float32 the two log-normalisers' rounding alone leaves ~1e-8 of KL between logits that agree
    to 1e-7, which would hide how small a difference really is."""
    p = torch.log_softmax(reference_logits.double(), -1)
    q = torch.log_softmax(logits.double(), -1)
    return float((p.exp() * (p - q)).sum().clamp_min(0.0))


def layer_kv_errors(reference: VLCache, candidate: VLCache, length: int) -> list[float]:
    """Per layer: relative L2 error of the candidate's prompt K/V against the reference's (first `length` rows)."""
    errors = []
    for ref_layer, layer in zip(reference.layers, candidate.layers, strict=False):
        ref = torch.cat([ref_layer.keys[..., :length, :], ref_layer.values[..., :length, :]]).float()
        got = torch.cat([layer.keys[..., :length, :], layer.values[..., :length, :]]).float()
        errors.append(float((got - ref).norm() / ref.norm().clamp_min(1e-12)))
    return errors


@dataclass(frozen=True)
class Mode:
    """A policy at a budget, as the fidelity scripts run it. `label` names it in tables and plots."""

    label: str
    policy: str
    recompute_ratio: float = 0.0


def standard_modes(policies: list[str], budgets: list[float]) -> list[Mode]:
    """naive reuse ("none"), exact prefix reuse only ("prefix-only"), then every policy at every budget."""
    modes = [Mode("none", "none"), Mode("prefix-only", "first_k", 1.0)]
    for policy in policies:
        for budget in budgets:
            modes.append(Mode(f"{policy}@{budget:g}", policy, budget))
    return modes


@dataclass
class RequestResult:
    """One mode on one moved-image request, compared with full recomputation."""

    mode: str
    kl: float
    top1_agree: bool
    answer_agree: bool  # the whole greedy answer equals full recomputation's
    answer: str
    recomputed_fraction: float  # mean over layers of the share of moved tokens recomputed
    layer_kv_error: list[float]


@torch.no_grad()
def compare_modes(
    model,
    processor,
    request: MovedImageRequest,
    modes: list[Mode],
    profile: LayerProfile | None = None,
    max_new_tokens: int = 1,
    device: torch.device | str = "cpu",
) -> tuple[str, list[RequestResult]]:
    """Warm a fresh store with the request's warm-up chat, then run full recomputation and every mode on
    the probe chat. Returns (full recomputation's answer, one result per mode)."""
    store = CacheStore()
    warm_store(model, chat_inputs(processor, request.warmup, device), store)
    inputs = chat_inputs(processor, request.probe, device)
    length = inputs["input_ids"].shape[1] - 1
    decode = processor.tokenizer.decode
    reference = run_probe(model, inputs, store, "full", max_new_tokens=max_new_tokens)
    naive_report = run_probe(model, inputs, store, "none").cache.report  # fresh and moved token counts
    fresh = naive_report.recomputed_per_layer[0]
    moved = max(naive_report.reused_tokens - naive_report.prefix_tokens, 1)
    results = []
    for mode in modes:
        out = run_probe(model, inputs, store, mode.policy, mode.recompute_ratio, profile, max_new_tokens)
        report = out.cache.report
        fraction = sum(c - fresh for c in report.recomputed_per_layer) / (len(report.recomputed_per_layer) * moved)
        results.append(
            RequestResult(
                mode=mode.label,
                kl=kl_divergence(reference.logits, out.logits),
                top1_agree=int(reference.logits.argmax()) == int(out.logits.argmax()),
                answer_agree=out.tokens == reference.tokens,
                answer=decode(out.tokens, skip_special_tokens=True).strip(),
                recomputed_fraction=fraction,
                layer_kv_error=layer_kv_errors(reference.cache, out.cache, length),
            )
        )
    return decode(reference.tokens, skip_special_tokens=True).strip(), results
