"""A selection policy may empty its set at a deeper layer, or propose rows outside the current set: the layer loop
must stop computing (counting 0 rows for every deeper layer) and keep sets nested. No built-in policy does either,
so a custom one is used, on a prompt whose rows are all reused (an exact prefix row, a moved image) but the last.

Expected counts are written out from the layout: 1 prefix row, the image's 16 moved rows, the last token.
"""

from __future__ import annotations

import torch
from helpers import greedy

from vlcache_hf import CacheStore, VLCache
from vlcache_hf.selection import SelectionPolicy

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


class _Shrink(SelectionPolicy):
    """Layer 0: every moved row; after it, the rows `proposed_after_0` (may be empty, or outside the set)."""

    name = "test-shrink"

    def __init__(self, proposed_after_0: list[int]):
        super().__init__(0.0)
        self.proposed = proposed_after_0

    def initial_set(self, ctx):
        return ctx.moved_indices()

    def after_layer(self, layer_idx, ctx, current, observation):
        return torch.tensor(self.proposed, dtype=torch.long) if layer_idx == 0 else current


def _prompt(processor, text: str, image):
    return processor(text=[text], images=[image], return_tensors="pt")


def _report(models, images, proposed: list[int]):
    model, processor = models("qwen2_5_vl")
    store = CacheStore()
    # row 0 (<|vision_start|>) stored as an exact one-token chunk; the image stored in another context
    greedy(model, processor(text=["<|vision_start|>x"], return_tensors="pt"), VLCache(model, store=store, prefix_chunk_size=1), max_new_tokens=1)
    greedy(model, _prompt(processor, "ab" + IMAGE, images[0]), VLCache(model, store=store, prefix_chunk_size=1), max_new_tokens=1)
    target = _prompt(processor, IMAGE, images[0])
    assert target["input_ids"].shape[1] == 18  # start, 16 image rows, end
    cache = VLCache(model, store=store, policy=_Shrink(proposed), prefix_chunk_size=1, publish=False)
    greedy(model, target, cache, max_new_tokens=1)
    layers = model.config.text_config.num_hidden_layers
    return cache.report, layers


def test_a_set_emptied_at_a_deeper_layer_computes_nothing_there(models, images):
    report, layers = _report(models, images, [])
    assert (report.prefix_tokens, report.moved_tokens) == (1, 16)
    # layer 0: the 16 moved rows; deeper: nothing; every layer: + the last token, run by the model's forward
    assert report.recomputed_per_layer == [16 + 1] + [1] * (layers - 1)


def test_rows_proposed_outside_the_current_set_are_not_computed(models, images):
    # row 0 is the exact prefix (not in layer 0's set) and row 17 the last token (not the loop's): only the
    # proposed moved rows 3 and 5 stay
    report, layers = _report(models, images, [0, 3, 5, 17])
    assert report.recomputed_per_layer == [16 + 1] + [2 + 1] * (layers - 1)
