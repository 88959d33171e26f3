"""Prototypes (issue 19): query-aware and attention-mass choices of the moved tokens to recompute, against `coverage`.

    python eval/query_aware.py --items 300 --split validation

Query-aware picks: per moved image, the tokens that the prompt's fresh tokens after it (the question) attend to
most at layer 0, from layer 0's own queries (the fresh tokens' embeddings through the layer's norm, `q_proj` and
rotary) and the image's reused layer-0 keys (exact after re-rotation); the same budget split over images as
`coverage`. Attention-mass picks: per moved image, the tokens that all later tokens of the prompt attend to most
at layer 0 (the paper's e_prop term measured; queries and keys from the input embeddings, image rows holding the
encoder's features). Each with and without `coverage-shift`'s correction. Prototypes, not library policies: they
read the model and the request's inputs, which a `SelectionPolicy` is not given, through attributes set per
request. Both lost to `coverage` (see `eval/results/query_aware_validation.md`), so neither was made a policy.
"""
import argparse
import platform
import random
import sys
import time
from pathlib import Path
from statistics import mean

import torch

from vlcache_hf import CacheStore, VLCache
from vlcache_hf.compat import with_cache
from vlcache_hf.probe import chat_inputs, kl_divergence, moved_image_request, warm_store
from vlcache_hf.rope import apply_rotation
from vlcache_hf.selection.baselines import budget_tokens, split_over_spans
from vlcache_hf.selection.shift import CoverageShiftPolicy
from vlcache_hf.tools import synthetic
from vlcache_hf.tools.pretrained import load_deep


class QueryAware(CoverageShiftPolicy):
    name = "query-proto"
    def __init__(self, ratio, shift=True):
        super().__init__(ratio, key_scale=0.5 if shift else 0.0, value_scale=1.0 if shift else 0.0)
        self.model = self.input_ids = None
    def budgets(self, ctx):
        """(moved spans, tokens to recompute in each): `coverage`'s split of the budget."""
        spans = list(ctx.moved_spans)
        return spans, split_over_spans([s.length for s in spans], budget_tokens(ctx.num_moved, self.recompute_ratio))

    def layer0(self):
        """(the text model, its first decoder layer, query heads, key/value heads)."""
        lm = self.model.model.language_model
        text = self.model.config.text_config
        return lm, lm.layers[0], text.num_attention_heads, text.num_key_value_heads

    def initial_set(self, ctx):
        spans, counts = self.budgets(ctx)
        lm, layer, heads, kv = self.layer0()
        attn = layer.self_attn
        fresh = ctx.fresh_indices
        with torch.no_grad():
            x = layer.input_layernorm(lm.embed_tokens(self.input_ids[0, fresh]))[None]
            dim = x.shape[-1] // heads
            q = attn.q_proj(x).view(1, -1, heads, dim).transpose(1, 2)[0]  # [H, nf, D]
            adapter = self.cache.adapter
            cos, sin = adapter.rotation_cos_sin(q, ctx.positions[:, fresh])
            q = apply_rotation(q, cos, sin)
            keys = ctx.reused_keys(0)[0]  # [KV, T, D] (fresh rows unfilled; only moved columns used)
            picked = [fresh]
            for span, count in zip(spans, counts, strict=True):
                if not count:
                    continue
                k = keys[:, span.start:span.end].float()  # [KV, n, D]
                k = k.repeat_interleave(heads // kv, dim=0)
                scores = torch.einsum("hfd,hnd->hfn", q.float(), k) / dim ** 0.5  # [H, nf, n]
                later = fresh > span.start  # fresh tokens after the image attend to it
                weights = scores[:, later].softmax(dim=-1)  # within the image: which of its tokens each query prefers
                mass = weights.sum(dim=(0, 1))
                picked.append(torch.topk(mass, count).indices + span.start)
        return torch.cat(picked)

class AttentionMass(QueryAware):
    """Per moved image, the tokens that every later token of the prompt (text and image) attends to most at
    layer 0: the e_prop term of the paper's cumulative error, measured instead of assumed. Layer 0's queries and
    keys come from the prompt's input embeddings (the images' encoder features in their rows)."""

    name = "mass-proto"

    def initial_set(self, ctx):
        spans, counts = self.budgets(ctx)
        lm, layer, heads, kv = self.layer0()
        attn = layer.self_attn
        with torch.no_grad():
            ids = self.input_ids[0, : ctx.num_tokens]
            embeds = lm.embed_tokens(ids).clone()
            features = torch.cat(list(self.model.model.get_image_features(self.pixel_values, self.grid).pooler_output))
            embeds[ids == self.model.config.image_token_id] = features.to(embeds.dtype)
            x = layer.input_layernorm(embeds)[None]
            dim = x.shape[-1] // heads
            q = attn.q_proj(x).view(1, -1, heads, dim).transpose(1, 2)[0].float()  # [H, T, D]
            k = attn.k_proj(x).view(1, -1, kv, dim).transpose(1, 2)[0].float()
            adapter = self.cache.adapter
            q = apply_rotation(q, *adapter.rotation_cos_sin(q, ctx.positions))
            k = apply_rotation(k, *adapter.rotation_cos_sin(k, ctx.positions)).repeat_interleave(heads // kv, dim=0)
            scores = torch.einsum("hid,hjd->hij", q, k) / dim ** 0.5
            causal = torch.ones(ctx.num_tokens, ctx.num_tokens, dtype=torch.bool).tril()
            weights = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
            weights = weights.masked_fill(torch.eye(ctx.num_tokens, dtype=torch.bool), 0.0)  # later tokens only
            received = weights.sum(dim=(0, 1))  # [T]: attention mass each token receives from the tokens after it
        picked = [ctx.fresh_indices]
        for span, count in zip(spans, counts, strict=True):
            if count:
                picked.append(torch.topk(received[span.start : span.end], count).indices + span.start)
        return torch.cat(picked)


def probe(model, inputs, store, policy, ratio):
    cache = VLCache(model, store=store, policy=policy, recompute_ratio=ratio, publish=False)
    if isinstance(policy, QueryAware):
        policy.cache, policy.model, policy.input_ids = cache, model, inputs["input_ids"]
        policy.pixel_values, policy.grid = inputs["pixel_values"], inputs["image_grid_thw"]
    out = model.generate(**inputs, max_new_tokens=2, do_sample=False, output_logits=True, return_dict_in_generate=True, **with_cache(model, cache))
    return out.logits[0][0].float(), out.sequences[0, inputs["input_ids"].shape[1]:].tolist()

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--items", type=int, default=300)
parser.add_argument("--split", default="validation", choices=["validation", "test"])
parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "query_aware_validation.md")
args = parser.parse_args()
n, split = args.items, args.split
model, processor = load_deep()
variant = synthetic.task_spec("deep")
items = synthetic.make_split(split, n, variant=variant)
rng = random.Random(0)
modes = {}
for r in (0.02, 0.05):
    modes[f"coverage@{r}"] = lambda r=r: ("coverage", r)
    modes[f"query@{r}"] = lambda r=r: (QueryAware(r, shift=False), r)
    modes[f"coverage-shift@{r}"] = lambda r=r: ("coverage-shift", r)
    modes[f"query-shift@{r}"] = lambda r=r: (QueryAware(r, shift=True), r)
    modes[f"mass@{r}"] = lambda r=r: (AttentionMass(r, shift=False), r)
    modes[f"mass-shift@{r}"] = lambda r=r: (AttentionMass(r, shift=True), r)
stats = {k: {"agree": [], "kl": [], "correct": []} for k in ["full", "none", *modes]}
t0 = time.time()
for item in items:
    images = synthetic.render_item(item, variant)
    req = moved_image_request(images, rng, probe=synthetic.messages(item, images))
    store = CacheStore()
    warm_store(model, chat_inputs(processor, req.warmup, "cpu"), store)
    inputs = chat_inputs(processor, req.probe, "cpu")
    ref_logits, ref_tokens = probe(model, inputs, store, "full", None)
    stats["full"]["correct"].append(processor.tokenizer.decode(ref_tokens, skip_special_tokens=True).strip() == item.answer)
    for name, make in [("none", lambda: ("none", None)), *modes.items()]:
        pol, r = make()
        logits, tokens = probe(model, inputs, store, pol, r)
        s = stats[name]
        s["agree"].append(tokens == ref_tokens)
        s["kl"].append(kl_divergence(ref_logits, logits))
        s["correct"].append(processor.tokenizer.decode(tokens, skip_special_tokens=True).strip() == item.answer)
lines = [
    f"# Query-aware picks against coverage — deep model, {n} {split} items, images moved",
    "",
    f"Command: `python eval/query_aware.py {' '.join(sys.argv[1:])}` — {platform.machine()}, torch {torch.__version__}, {time.time() - t0:.0f} s.",
    "",
    "| mode | accuracy | answer = full's | KL(full‖mode), 1st token |",
    "|---|---|---|---|",
]
for k, s in stats.items():
    agree = mean(s["agree"]) * 100 if s["agree"] else 100.0
    kl = mean(s["kl"]) if s["kl"] else 0.0
    lines.append(f"| {k} | {mean(s['correct']) * 100:.1f} % | {agree:.1f} % | {kl:.3f} |")
args.out.write_text("\n".join(lines) + "\n")
print("\n".join(lines))
