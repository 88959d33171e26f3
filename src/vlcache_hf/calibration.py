"""The calibration pass: how sensitive is each layer of a model to reused (stale) K/V?

For every sample (a list of images) it builds a moved-image request (the images seen first in another
context, then asked about at new positions), and measures KL(full recompute ‖ reuse) of the first answer
token while the moved tokens are recomputed at layers < d and reused from layer d on, for d = 0 … L.
d = 0 is naive reuse, d = L is full recomputation of the moved tokens. The averaged curve is the
*remaining error* w_d of `LayerProfile`; its drops w_d − w_{d+1} are the per-layer sensitivities. This
definition respects the nesting constraint of selective prefill (a layer can only recompute tokens the
layer below computed), so budgets derived from it are ones a selective prefill can actually spend.

    profile = vlcache_hf.calibrate(model, processor, samples=[[img1, img2, img3], ...], seed=0)
    profile.save("profile.json")
    cache = VLCache(model, policy="vlcache", recompute_ratio=0.05, profile="profile.json")

CLI: `vlcache calibrate --model PATH --data DIR --out profile.json`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from tqdm import tqdm

from ._version import __version__
from .errors import VLCacheError
from .fingerprint import fingerprint
from .models import get_adapter
from .probe import chat_inputs, kl_divergence, moved_image_request, run_probe, warm_store
from .selection import LayerProfile, SelectionContext, SelectionPolicy
from .selection.profile import ALLOCATION_RULE
from .store.store import CacheStore


class RecomputeBelowDepth(SelectionPolicy):
    """Calibration probe: every moved token is recomputed at layers < `depth` and reused from `depth` on."""

    name = "calibration-depth"

    def __init__(self, depth: int):
        super().__init__(1.0)
        self.depth = depth

    def initial_set(self, ctx: SelectionContext) -> torch.Tensor:
        if self.depth == 0:
            return ctx.fresh_indices
        return torch.cat([ctx.fresh_indices, ctx.moved_indices()])

    def after_layer(self, layer_idx, ctx, current, observation):
        return ctx.fresh_indices if layer_idx + 1 >= self.depth else current


def _check_samples(samples: Sequence[Sequence]) -> list[list]:
    if not samples:
        raise VLCacheError("calibrate needs at least one sample (a list of images)")
    checked = []
    for number, sample in enumerate(samples):
        images = list(sample) if not hasattr(sample, "size") else [sample]
        if not images:
            raise VLCacheError(f"calibration sample {number} has no images")
        checked.append(images)
    return checked


def calibrate(
    model,
    processor,
    samples: Sequence[Sequence],
    seed: int = 0,
    progress: bool = True,
) -> LayerProfile:
    """Measure per-layer sensitivity to reused K/V on `samples` (each a list of PIL images; ≥ 2 images per
    sample make the images move). Deterministic for a seed: the contexts are drawn from `random.Random(seed)`."""
    images_per_sample = _check_samples(samples)
    adapter = get_adapter(model)
    num_layers = adapter.kv_layout.num_layers
    device = next(model.parameters()).device
    rng = random.Random(seed)
    curves: list[list[float]] = []
    bar = tqdm(total=len(images_per_sample) * (num_layers + 2), desc="calibrating", unit="prefill", disable=not progress)
    for images in images_per_sample:
        request = moved_image_request(images, rng)
        store = CacheStore()
        warm_store(model, chat_inputs(processor, request.warmup, device), store)
        probe_inputs = chat_inputs(processor, request.probe, device)
        reference = run_probe(model, probe_inputs, store, "full").logits
        bar.update(1)
        curve = []
        for depth in range(num_layers + 1):
            curve.append(kl_divergence(reference, run_probe(model, probe_inputs, store, RecomputeBelowDepth(depth)).logits))
            bar.update(1)
        curves.append(curve)
    bar.close()
    mean = [sum(c[d] for c in curves) / len(curves) for d in range(num_layers + 1)]
    remaining, floor = [], mean[num_layers]
    for depth in range(num_layers):  # non-increasing and ≥ 0: recomputing more layers cannot be charged more error
        value = max(mean[depth] - floor, 0.0)
        remaining.append(min(value, remaining[-1]) if remaining else value)
    sensitivity = [remaining[d] - (remaining[d + 1] if d + 1 < num_layers else 0.0) for d in range(num_layers)]
    return LayerProfile(
        model_fingerprint=fingerprint(model),
        num_layers=num_layers,
        remaining_error=remaining,
        sensitivity=sensitivity,
        naive_kl=mean[0],
        seed=seed,
        num_samples=len(curves),
        library_version=__version__,
        allocation_rule=ALLOCATION_RULE,
        per_sample_depth_kl=curves,
    )
