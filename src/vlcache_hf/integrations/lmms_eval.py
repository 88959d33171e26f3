"""lmms-eval model `vlcache`: any Hugging Face VLM, answering through a `VLCache` per request.

    lmms-eval --model vlcache --model_args pretrained=default,policy=vlcache --tasks synthetic_vqa \\
        --include_path eval/tasks --limit 8

lmms-eval (>= 0.7) finds the model through the Python entry-point group `lmms_eval.models`, whose entry
`vlcache = "vlcache_hf.integrations.lmms_eval:manifests"` is declared by vlcache-hf's `pyproject.toml`. Without
an installed distribution (e.g. `PYTHONPATH=src`), `python -m vlcache_hf.integrations.lmms_eval ...` takes the
same arguments as `lmms-eval`: it registers the model, then runs lmms-eval's own command line.

Model args (`--model_args k=v,...`):
    pretrained       a model directory or hub id loadable by `AutoModelForImageTextToText` + `AutoProcessor`;
                     `default` is the embedded tiny model (`vlcache_hf.tools.pretrained.load_default()`),
                     `deep` the deep one (`load_deep()`, task `synthetic_vqa_deep`)
    policy           any `VLCache` policy ("vlcache", "coverage", "stratified", "full", "none", "first_k",
                     "cacheblend", "random"), or "plain": `model.generate` without VLCache   [vlcache]
    recompute_ratio  share of reused tokens to recompute, in [0, 1]                      [0.05]
    store            a directory: `CacheStore(disk=store)` (persists across runs); else in memory
    warmup           publish each doc's images from another context first (see below)    [true]
    max_new_tokens   used when the task's generation_kwargs give none                   [16]
    device, dtype    where and in what precision to run                           [cpu, float32]
    profile          a `LayerProfile` JSON from `vlcache_hf.calibrate` (layer-aware policies)
    prefix_chunk_size, attn_implementation, system_prompt, stats_path (JSON of per-request prefill stats)

Warmup: before answering a doc, its images go through the model once in a *different* context — a
caption-style prompt ("Describe these pictures.") with the images in an order shuffled by the doc id — with
`max_new_tokens=1` and `VLCache(policy="full")`, which publishes their encoder outputs and K/V to the store.
The real request then finds them at other positions (non-prefix reuse), which is what the policies repair.
The warmup runs once per doc (several loglikelihood choices of one doc share it) and is not timed in the
request's prefill stats.

`loglikelihood` returns `(loss, is_greedy)` like lmms-eval's own models: the mean negative log-likelihood per
continuation token (lmms-eval's `multiple_choice` scoring takes the argmin).

Images are placed where the context has lmms-eval placeholders: `<image>` (next image in order) or
`<image N>` (image N, 1-based). Images that no placeholder names go before the text (lmms-eval's usual
layout: an empty preamble). Generation is greedy, batch size 1, one `VLCache` per `generate` call.
"""

from __future__ import annotations

import json
import random
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from loguru import logger as eval_logger
from PIL import Image
from tqdm import tqdm

from ..cache import VLCache
from ..compat import with_cache
from ..models import request_images
from ..selection import make_policy
from ..store.store import CacheStore

MODEL_ID = "vlcache"
CLASS_PATH = "vlcache_hf.integrations.lmms_eval.VLCacheLMM"
PLAIN = "plain"
#: `pretrained=` names of the embedded models → their loader in `vlcache_hf.tools.pretrained`
EMBEDDED_MODELS = {"default": "load_default", "deep": "load_deep"}
WARMUP_PROMPT = "Describe these pictures."
_PLACEHOLDER = re.compile(r"<image(?:[ _]?(\d+))?>")
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def manifests() -> list[ModelManifest]:
    """The entry-point payload for lmms-eval's `lmms_eval.models` group."""
    return [ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)]


def register(registry=None) -> None:
    """Register `vlcache` in lmms-eval's model registry (what the entry point does at lmms-eval start-up)."""
    if registry is None:
        from lmms_eval.models import MODEL_REGISTRY_V2 as registry
    for manifest in manifests():
        registry.register_manifest(manifest, overwrite=True)


class LoglikelihoodResult(tuple, GenerationResult):
    """`(loss, is_greedy)`: a plain tuple that lmms-eval's evaluator also passes through unchanged.

    lmms-eval 0.7.3's evaluator hands every model response to `unwrap_generation_output`, which turns any
    response that is not text (nor a `GenerationResult`) into `str(response)`, so `(loss, is_greedy)`
    tuples reach `multiple_choice` scoring as strings and it fails. Being a `GenerationResult` whose `text`
    is the tuple itself, this result survives that step; everywhere else it is just the tuple.
    """

    token_counts = None

    def __new__(cls, loss: float, is_greedy: bool):
        return super().__new__(cls, (float(loss), bool(is_greedy)))

    def __init__(self, loss: float, is_greedy: bool) -> None:  # the tuple is built in __new__
        pass

    @property
    def text(self) -> tuple[float, bool]:
        return (self[0], self[1])


# ---------------------------------------------------------------------------------------------------------
# per-request statistics


@dataclass
class RequestStats:
    """What one request (one `generate` or one loglikelihood prefill) reused and recomputed."""

    request: str  # "generate_until" or "loglikelihood"
    task: str | None
    doc_id: int | None
    policy: str
    total_tokens: int
    reused_tokens: int
    recomputed_tokens: int
    recomputed_fraction: float
    prefix_tokens: int = 0
    images: int = 0
    image_tokens: int = 0
    encoder_hits: int = 0
    encoder_misses: int = 0
    kv_hits: int = 0
    kv_misses: int = 0
    prefill_s: float = 0.0  # VLCache's prefill (encoder + load + re-rotation + selective prefill + publish)
    request_s: float = 0.0  # the whole generate / forward call(s), warmup excluded
    warmup_s: float = 0.0

    @classmethod
    def from_report(cls, request: str, task, doc_id, report, total_tokens: int, seconds: float, warmup_s: float):
        if report is None:  # plain generate: everything computed
            return cls(request, task, doc_id, PLAIN, total_tokens, 0, total_tokens, 1.0, request_s=seconds, warmup_s=warmup_s)
        return cls(
            request,
            task,
            doc_id,
            report.policy,
            report.total_tokens,
            report.reused_tokens,
            report.recomputed_tokens,
            report.recomputed_fraction,
            prefix_tokens=report.prefix_tokens,
            images=report.images,
            image_tokens=report.image_tokens,
            encoder_hits=report.encoder_hits,
            encoder_misses=report.encoder_misses,
            kv_hits=report.kv_hits,
            kv_misses=report.kv_misses,
            prefill_s=report.timings.total_s,
            request_s=seconds,
            warmup_s=warmup_s,
        )


def summarize(stats: list[RequestStats]) -> dict[str, Any]:
    """Aggregate per-request stats: recomputed fractions, cache hit rates, mean times."""
    if not stats:
        return {"requests": 0}
    total = sum(s.total_tokens for s in stats)
    items = sum(s.encoder_hits + s.encoder_misses for s in stats)
    spans = sum(s.kv_hits + s.kv_misses for s in stats)
    n = len(stats)
    return {
        "requests": n,
        "policy": stats[-1].policy,
        "total_tokens": total,
        "reused_tokens": sum(s.reused_tokens for s in stats),
        "recomputed_tokens": sum(s.recomputed_tokens for s in stats),
        "recomputed_fraction_mean": sum(s.recomputed_fraction for s in stats) / n,
        "recomputed_fraction_tokens": sum(s.recomputed_tokens for s in stats) / total if total else 0.0,
        "encoder_hit_rate": sum(s.encoder_hits for s in stats) / items if items else None,
        "kv_hit_rate": sum(s.kv_hits for s in stats) / spans if spans else None,
        "prefill_ms_mean": 1e3 * sum(s.prefill_s for s in stats) / n,
        "request_ms_mean": 1e3 * sum(s.request_s for s in stats) / n,
        "warmup_ms_total": 1e3 * sum(s.warmup_s for s in stats),
    }


# ---------------------------------------------------------------------------------------------------------
# prompt construction


def _flatten(visuals) -> list:
    if visuals is None:
        return []
    if isinstance(visuals, (list, tuple)):
        return [v for item in visuals for v in _flatten(item)]
    return [visuals]


def to_images(visuals) -> list[Image.Image]:
    """RGB PIL images from what a task's `doc_to_visual` returns (images, image paths, nested lists)."""
    images = []
    for visual in _flatten(visuals):
        if isinstance(visual, Image.Image):
            images.append(visual.convert("RGB"))
        elif isinstance(visual, (str, Path)) and str(visual).lower().endswith(_IMAGE_SUFFIXES):
            with Image.open(visual) as opened:
                images.append(opened.convert("RGB"))
        elif isinstance(visual, dict) and visual.get("bytes") is not None:
            import io

            with Image.open(io.BytesIO(visual["bytes"])) as opened:
                images.append(opened.convert("RGB"))
        else:
            raise NotImplementedError(
                f"the vlcache lmms-eval model takes images only; got a {type(visual).__name__} visual ({str(visual)[:80]!r})"
            )
    return images


def build_content(context: str, images: list[Image.Image]) -> list[dict]:
    """Chat content for one user turn: text and images interleaved where `context` has placeholders.

    `<image>` takes the next image not placed yet, `<image N>` image N (1-based; a repeated reference
    becomes the text "image N"). Images no placeholder names go first, before all the text.
    """
    parts: list[dict] = []
    placed: set[int] = set()
    cursor = 0
    pending = 0  # next image for a bare <image>

    def add_text(text: str) -> None:
        if text:
            parts.append({"type": "text", "text": text})

    for match in _PLACEHOLDER.finditer(context):
        add_text(context[cursor : match.start()])
        cursor = match.end()
        number = match.group(1)
        if number is not None:
            index = int(number) - 1
            if not 0 <= index < len(images):
                add_text(match.group(0))  # names no image we have: keep the text
                continue
            if index in placed:
                add_text(f"image {index + 1}")
                continue
        else:
            while pending in placed:
                pending += 1
            if pending >= len(images):
                continue  # more placeholders than images: drop the extra placeholder
            index = pending
        parts.append({"type": "image", "image": images[index]})
        placed.add(index)
    add_text(context[cursor:])
    unplaced = [{"type": "image", "image": images[i]} for i in range(len(images)) if i not in placed]
    return unplaced + parts


def _parse_bool(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"{name} must be true or false, got {value!r}")


def _parse_dtype(value) -> torch.dtype | str:
    if isinstance(value, torch.dtype):
        return value
    text = str(value).strip().lower().removeprefix("torch.")
    if text == "auto":
        return "auto"
    if text not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or 'auto', got {value!r}")
    return _DTYPES[text]


# ---------------------------------------------------------------------------------------------------------
# the model


class VLCacheLMM(lmms):
    """An lmms-eval "simple" model: `generate_until` and `loglikelihood` through `VLCache`, batch size 1."""

    is_simple = True

    def __init__(
        self,
        pretrained: str = "default",
        policy: str = "vlcache",
        recompute_ratio: float = 0.05,
        store: str | None = None,
        warmup: bool | str = True,
        max_new_tokens: int = 16,
        device: str | None = "cpu",
        dtype: str = "float32",
        profile: str | None = None,
        prefix_chunk_size: int | None = None,
        attn_implementation: str = "sdpa",
        system_prompt: str | None = None,
        stats_path: str | None = None,
        batch_size: int | str | None = 1,
        max_batch_size: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__()
        if kwargs:
            raise TypeError(f"unknown model_args for vlcache: {sorted(kwargs)}")
        if batch_size not in (None, 1, "1"):
            eval_logger.warning(f"vlcache serves one request per generate call; ignoring batch_size={batch_size!r}")
        self.policy = str(policy)
        self.recompute_ratio = float(recompute_ratio)
        if self.policy != PLAIN:
            make_policy(self.policy, self.recompute_ratio)  # fail fast on an unknown policy or a bad ratio
        self.warmup = _parse_bool(warmup, "warmup")
        self.max_new_tokens = int(max_new_tokens)
        self.profile = profile or None
        self.prefix_chunk_size = int(prefix_chunk_size) if prefix_chunk_size else None
        self.system_prompt = system_prompt or None
        self.stats_path = stats_path or None
        self._device = torch.device(device or "cpu")
        torch_dtype = _parse_dtype(dtype)

        from transformers import AutoModelForImageTextToText, AutoProcessor

        if str(pretrained) in EMBEDDED_MODELS:
            from ..tools import pretrained as embedded

            load = getattr(embedded, EMBEDDED_MODELS[str(pretrained)])
            model, processor = load(dtype=None if torch_dtype == "auto" else torch_dtype)
        else:
            placement = {"device_map": str(self._device)} if self._device.type != "cpu" else {}  # load in place
            model = AutoModelForImageTextToText.from_pretrained(
                str(pretrained), dtype=torch_dtype, attn_implementation=attn_implementation, **placement
            )
            processor = AutoProcessor.from_pretrained(str(pretrained))
        self._model = model.to(self._device).eval()
        self.processor = processor
        self.pretrained = str(pretrained)
        self.store = CacheStore(disk=str(store)) if store else CacheStore()
        self.stats: list[RequestStats] = []
        self._warm: set[tuple] = set()
        self._greedy_warned = False
        eval_logger.info(
            f"vlcache: {type(model).__name__} from {self.pretrained} on {self._device} ({self._model.dtype}), "
            f"policy={self.policy}, recompute_ratio={self.recompute_ratio}, warmup={self.warmup}, store={self.store!r}"
        )

    # -- lmms-eval plumbing ----------------------------------------------------------------------------------
    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return 1

    def _doc(self, task: str, split: str, doc_id: int):
        return self.task_dict[task][split][doc_id]

    # -- building inputs -------------------------------------------------------------------------------------
    def messages(self, context: str, images: list[Image.Image]) -> list[dict]:
        chat = []
        if self.system_prompt:
            chat.append({"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        chat.append({"role": "user", "content": build_content(context, images)})
        return chat

    def _prompt(self, chat: list[dict]) -> str:
        return self.processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)

    def _inputs(self, text: str, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        batch = self.processor(text=[text], images=request_images(self.processor, images) or None, return_tensors="pt")
        dtype = self._model.dtype
        return {
            k: (v.to(self._device, dtype) if v.is_floating_point() else v.to(self._device))
            for k, v in batch.items()
            if isinstance(v, torch.Tensor)
        }

    def _new_cache(self, policy: str | None = None) -> VLCache | None:
        policy = policy or self.policy
        if policy == PLAIN:
            return None
        extra = {"prefix_chunk_size": self.prefix_chunk_size} if self.prefix_chunk_size else {}
        return VLCache(
            self._model,
            store=self.store,
            policy=policy,
            recompute_ratio=self.recompute_ratio if policy == self.policy else 0.0,
            profile=self.profile if policy == self.policy else None,
            **extra,
        )

    # -- warmup ------------------------------------------------------------------------------------------------
    def warm(self, key: tuple, doc_id: int | None, images: list[Image.Image]) -> float:
        """Publish the doc's images from a caption-style context (shuffled order, seeded by doc id); seconds."""
        if not self.warmup or self.policy == PLAIN or not images or key in self._warm:
            return 0.0
        self._warm.add(key)
        start = time.perf_counter()
        order = list(range(len(images)))
        random.Random(doc_id if doc_id is not None else 0).shuffle(order)
        content = [{"type": "text", "text": WARMUP_PROMPT + " "}] + [{"type": "image", "image": images[i]} for i in order]
        chat = [{"role": "user", "content": content}]
        inputs = self._inputs(self._prompt(chat), [images[i] for i in order])
        cache = self._new_cache("full")
        with torch.no_grad():
            self._model.generate(**inputs, max_new_tokens=1, do_sample=False, **self._pad(), **with_cache(self._model, cache))
        return time.perf_counter() - start

    def _pad(self) -> dict[str, Any]:
        tokenizer = self.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return {"pad_token_id": pad} if pad is not None else {}

    # -- generate_until ----------------------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[str]:
        answers: list[str] = []
        for request in tqdm(requests, disable=(self.rank != 0), desc="vlcache generate"):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            gen_kwargs = dict(gen_kwargs or {})
            images = to_images(doc_to_visual(self._doc(task, split, doc_id))) if doc_to_visual is not None else []
            warmup_s = self.warm((task, split, doc_id), doc_id, images)
            answer, stats = self.generate_one(context, images, gen_kwargs)
            stats.task, stats.doc_id, stats.warmup_s = task, doc_id, warmup_s
            self.stats.append(stats)
            eval_logger.debug(f"vlcache {task}/{doc_id}: {answer!r}; recomputed {stats.recomputed_fraction:.3f}")
            answers.append(answer)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), answer)
        self._log_summary("generate_until")
        return answers

    def generate_one(self, context: str, images: list[Image.Image], gen_kwargs: dict | None = None) -> tuple[str, RequestStats]:
        """Greedy answer to one (context, images) request and its prefill stats."""
        gen_kwargs = dict(gen_kwargs or {})
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        if (gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature") or 0) > 0) and not self._greedy_warned:
            eval_logger.warning("vlcache decodes greedily; ignoring sampling settings in generation_kwargs")
            self._greedy_warned = True
        max_new = int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens)
        inputs = self._inputs(self._prompt(self.messages(context, images)), images)
        cache = self._new_cache()
        start = time.perf_counter()
        with torch.no_grad():
            out = self._model.generate(
                **inputs, max_new_tokens=max_new, do_sample=False, **self._pad(), **with_cache(self._model, cache)
            )
        seconds = time.perf_counter() - start
        length = inputs["input_ids"].shape[1]
        text = self.processor.batch_decode(out[:, length:], skip_special_tokens=True)[0]
        for stop in until:
            if stop:
                text = text.split(stop)[0]
        report = cache.report if cache is not None else None
        return text, RequestStats.from_report("generate_until", None, None, report, length, seconds, 0.0)

    # -- loglikelihood -----------------------------------------------------------------------------------------
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """`(loss, is_greedy)` per request, as lmms-eval's own models return it: `loss` is the continuation's
        mean negative log-likelihood per token (lower is better: lmms-eval's `multiple_choice` scoring takes
        the argmin), `is_greedy` whether greedy decoding would produce the continuation."""
        results: list[tuple[float, bool]] = []
        for request in tqdm(requests, disable=(self.rank != 0), desc="vlcache loglikelihood"):
            args = request.args
            task = doc_id = None
            images: list[Image.Image] = []
            if len(args) == 2:  # unconditional choices (acc_mutual_info): text only
                context, continuation = args
            else:
                context, target, doc_to_visual, doc_id, task, split = args
                doc = self._doc(task, split, doc_id)
                continuation = target if isinstance(target, str) else target(doc)
                if isinstance(continuation, (list, tuple)):
                    continuation = continuation[0]
                continuation = str(continuation)
                images = to_images(doc_to_visual(doc)) if doc_to_visual is not None else []
            warmup_s = self.warm((task, split, doc_id), doc_id, images) if task is not None else 0.0
            loss, greedy, stats = self.score(context, continuation, images)
            stats.task, stats.doc_id, stats.warmup_s = task, doc_id, warmup_s
            self.stats.append(stats)
            results.append(LoglikelihoodResult(loss, greedy))
            self.cache_hook.add_partial("loglikelihood", (context, continuation), (loss, greedy))
        self._log_summary("loglikelihood")
        return results

    def continuation_ids(self, prompt: str, continuation: str) -> torch.Tensor:
        """Token ids of `continuation` as it is tokenized after `prompt` (whole-string tokenization, split)."""
        tokenizer = self.tokenizer
        context_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        whole_ids = tokenizer(prompt + continuation, add_special_tokens=False)["input_ids"]
        if whole_ids[: len(context_ids)] == context_ids:
            ids = whole_ids[len(context_ids) :]
        else:  # a token merges across the boundary: tokenize the continuation alone
            ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        return torch.tensor([ids], dtype=torch.long, device=self._device)

    def continuation_logprobs(self, context: str, continuation: str, images: list[Image.Image]):
        """(log-probs of each continuation token, greedy-match flags, stats) given the chat prompt for `context`.

        With a VLCache the model's forward on the context returns the logits of its last token only (the
        cache's hook prefills the rest), and one more forward over the continuation (all but its last token)
        on the same cache gives the remaining logits. Policy "plain" does one full forward.
        """
        prompt = self._prompt(self.messages(context, images))
        inputs = self._inputs(prompt, images)
        cont = self.continuation_ids(prompt, continuation)
        n = cont.shape[1]
        length = inputs["input_ids"].shape[1]
        cache = self._new_cache()
        start = time.perf_counter()
        with torch.no_grad():
            if n == 0:
                logits = torch.empty(1, 0, self._model.config.get_text_config().vocab_size, device=self._device)
                if cache is not None:  # still prefill, so that the stats say what the context cost
                    self._model(**inputs, use_cache=True, **with_cache(self._model, cache))
            elif cache is None:
                full = {**inputs}
                full["input_ids"] = torch.cat([inputs["input_ids"], cont], dim=1)
                if "attention_mask" in full:
                    full["attention_mask"] = torch.ones_like(full["input_ids"])
                for name in ("mm_token_type_ids", "token_type_ids"):
                    if name in full:
                        full[name] = torch.cat([full[name], torch.zeros_like(cont)], dim=1)
                logits = self._model(**full).logits[:, length - 1 : length - 1 + n]
            else:
                first = self._model(**inputs, use_cache=True, **with_cache(self._model, cache)).logits[:, -1:]
                parts = [first]
                if n > 1:
                    rest = self._model(input_ids=cont[:, :-1], use_cache=True, **with_cache(self._model, cache)).logits
                    parts.append(rest)
                logits = torch.cat(parts, dim=1)
        seconds = time.perf_counter() - start
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        token_logprobs = logprobs.gather(-1, cont[..., None])[0, :, 0]
        greedy = logprobs.argmax(-1)[0] == cont[0]
        report = cache.report if cache is not None else None
        stats = RequestStats.from_report("loglikelihood", None, None, report, length, seconds, 0.0)
        return token_logprobs, greedy, stats

    def score(self, context: str, continuation: str, images: list[Image.Image]) -> tuple[float, bool, RequestStats]:
        """(mean negative log-likelihood per continuation token, greedy match, stats); 0.0 if it is empty."""
        token_logprobs, greedy, stats = self.continuation_logprobs(context, continuation, images)
        loss = -float(token_logprobs.mean()) if token_logprobs.numel() else 0.0
        return loss, bool(greedy.all()), stats

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("the vlcache lmms-eval model does not implement multi-round generation")

    # -- reporting ---------------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        return summarize(self.stats)

    def _log_summary(self, kind: str) -> None:
        summary = summarize([s for s in self.stats if s.request == kind])
        if not summary["requests"]:
            return
        hits = summary["encoder_hit_rate"]
        kv = summary["kv_hit_rate"]
        eval_logger.info(
            f"vlcache {kind}: {summary['requests']} requests, policy {self.policy} (ratio {self.recompute_ratio}); "
            f"recomputed {summary['recomputed_fraction_tokens']:.3f} of {summary['total_tokens']} prompt tokens "
            f"(mean per request {summary['recomputed_fraction_mean']:.3f}); "
            f"encoder hit rate {'-' if hits is None else f'{hits:.2f}'}, KV hit rate {'-' if kv is None else f'{kv:.2f}'}; "
            f"prefill {summary['prefill_ms_mean']:.1f} ms, request {summary['request_ms_mean']:.1f} ms mean; "
            f"warmup {summary['warmup_ms_total'] / 1e3:.1f} s total"
        )
        if self.stats_path:
            path = Path(self.stats_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            payload = {
                "pretrained": self.pretrained,
                "policy": self.policy,
                "recompute_ratio": self.recompute_ratio,
                "warmup": self.warmup,
                "summary": self.summary(),
                "requests": [asdict(s) for s in self.stats],
            }
            path.write_text(json.dumps(payload, indent=2))


def main(argv: list[str] | None = None) -> None:
    """`python -m vlcache_hf.integrations.lmms_eval <lmms-eval args>`: lmms-eval with `vlcache` registered."""
    register()
    from lmms_eval.cli.dispatch import main as lmms_eval_main

    sys.argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    lmms_eval_main()


if __name__ == "__main__":
    main()
