"""Planning: image spans and what is reused vs fresh (pure bookkeeping)."""

from __future__ import annotations

import pytest
import torch

from vlcache_hf import VLCacheError
from vlcache_hf.plan import find_image_spans, plan_prefill
from vlcache_hf.selection import ReusedSpan
from vlcache_hf.store.keys import chain_prefix_hashes, image_key_from_pixels

IMG = 9


def test_find_image_spans_in_order():
    ids = torch.tensor([[1, IMG, IMG, 2, 3, IMG, IMG, IMG, 4]])
    spans = find_image_spans(ids, IMG, [2, 3], ["a", "b"])
    assert [(s.index, s.start, s.end, s.key) for s in spans] == [(0, 1, 3, "a"), (1, 5, 8, "b")]


def test_interleaved_item_gets_one_span_per_run():
    """Qwen3-VL video frames are separated by timestamp text: each run is its own span."""
    ids = torch.tensor([[1, IMG, IMG, 5, 6, IMG, IMG, 2]])
    spans = find_image_spans(ids, IMG, [4], ["v"])
    assert [(s.index, s.start, s.end, s.key, s.offset) for s in spans] == [(0, 1, 3, "v:0", 0), (0, 5, 7, "v:1", 2)]


def test_find_image_spans_mismatch_is_a_clear_error():
    ids = torch.tensor([[1, IMG, IMG, 2]])
    with pytest.raises(VLCacheError, match="2 image tokens but the 2 image"):
        find_image_spans(ids, IMG, [2, 3], ["a", "b"])


def test_plan_prefix_then_reused_spans_then_fresh():
    ids = torch.tensor([[1] * 4 + [IMG] * 4 + [2] * 2 + [IMG] * 4 + [3] * 3])
    spans = find_image_spans(ids, IMG, [4, 4], ["a", "b"])
    plan = plan_prefill(16, spans, prefix_tokens=6, kv_hit_keys={"a", "b"})
    # image 0 is half inside the prefix: only its part past the prefix is a moved span
    assert [(s.index, s.start, s.end, s.offset) for s in plan.reused_spans] == [(0, 6, 8, 2), (1, 10, 14, 0)]
    assert plan.fresh_mask.nonzero().flatten().tolist() == [8, 9, 14, 15]
    assert plan.reused_count == 6 + 2 + 4


def test_plan_without_hits_is_all_fresh():
    ids = torch.tensor([[1, IMG, IMG, 2]])
    plan = plan_prefill(3, find_image_spans(ids, IMG, [2], ["a"]), 0, set())
    assert plan.fresh_mask.all() and plan.reused_spans == []


def test_prefix_hashes_depend_on_image_content_and_order():
    tokens = [1, 2, IMG, IMG, 3, 4, IMG, IMG]
    a = chain_prefix_hashes("fp", tokens, {2: "x", 3: "x", 6: "y", 7: "y"}, 4)
    b = chain_prefix_hashes("fp", tokens, {2: "x", 3: "x", 6: "z", 7: "z"}, 4)
    c = chain_prefix_hashes("other-model", tokens, {2: "x", 3: "x", 6: "y", 7: "y"}, 4)
    assert len(a) == 2 and a[0] == b[0] and a[1] != b[1]
    assert a[0] != c[0]
    assert chain_prefix_hashes("fp", tokens[:7], {}, 4) == chain_prefix_hashes("fp", tokens[:4], {}, 4)


def test_pixel_key_holds_grid_settings_dtype_and_bytes():
    """Flat patches mean nothing without their grid: the same bytes under another grid are another image."""
    pixels = torch.arange(64 * 6, dtype=torch.float32).view(64, 6)
    base = image_key_from_pixels(pixels, (1, 8, 8), "image")
    assert image_key_from_pixels(pixels.clone(), [1, 8, 8], "image") == base  # content, not identity
    others = [
        image_key_from_pixels(pixels, (1, 4, 16), "image"),
        image_key_from_pixels(pixels, (1, 8, 8), "video"),
        image_key_from_pixels(pixels.to(torch.float64), (1, 8, 8), "image"),
        image_key_from_pixels(pixels.view(32, 12), (1, 8, 8), "image"),
        image_key_from_pixels(pixels + (torch.arange(pixels.numel()) == 100).view_as(pixels), (1, 8, 8), "image"),
    ]
    assert len({base, *others}) == 6


# Mutation testing (eval/mutate.py plan): a hand-built layout, every expected value worked out by hand.
#   tokens: 0 1 | 2 3 4 | 5 | 6 7 | 8 | 9 10 | 11
#           t t | a a a | t | b b | t | c c  | t      (three items of 3, 2 and 2 placeholders)
LAYOUT = torch.tensor([[1, 1, IMG, IMG, IMG, 2, IMG, IMG, 3, IMG, IMG, 4]])


def test_spans_of_unequal_items_numbered_from_first_index():
    spans = find_image_spans(LAYOUT, IMG, [3, 2, 2], ["a", "b", "c"], first_index=5)
    assert [(s.index, s.start, s.end, s.key, s.offset) for s in spans] == [
        (5, 2, 5, "a", 0), (6, 6, 8, "b", 0), (7, 9, 11, "c", 0)
    ]
    assert [s.length for s in spans] == [3, 2, 2]


def test_spans_need_one_key_per_item():
    with pytest.raises(ValueError):
        find_image_spans(LAYOUT, IMG, [3, 2, 2], ["a", "b"])


def test_plan_with_exact_and_moved_hits():
    """Prefix of 3 tokens; `a` (tokens 2-4) found exact, `c` (9-10) found moved, `b` not found."""
    spans = find_image_spans(LAYOUT, IMG, [3, 2, 2], ["a", "b", "c"])
    plan = plan_prefill(12, spans, prefix_tokens=3, span_hits={2: True, 9: False})
    # a's part past the prefix: tokens 3-4, one row into a; c whole
    assert [(s.index, s.start, s.end, s.key, s.offset) for s in plan.reused_spans] == [(0, 3, 5, "a", 1), (2, 9, 11, "c", 0)]
    assert [plan.is_exact(s) for s in plan.reused_spans] == [True, False]
    assert plan.exact_starts == frozenset({2})
    assert [(s.start, s.end) for s in plan.moved_parts] == [(9, 11)]
    assert plan.moved_spans == (ReusedSpan(9, 11),)
    assert plan.exact_until == 9
    assert plan.num_tokens == 12 and plan.prefix_tokens == 3
    assert plan.reused_count == 3 + 2 + 2
    assert plan.fresh_mask.dtype == torch.bool
    assert plan.fresh_mask.nonzero().flatten().tolist() == [5, 6, 7, 8, 11]


def test_plan_from_hit_keys_is_all_moved_and_exact_until_defaults_to_the_end():
    spans = find_image_spans(LAYOUT, IMG, [3, 2, 2], ["a", "b", "c"])
    moved = plan_prefill(12, spans, prefix_tokens=3, kv_hit_keys={"a"})
    assert moved.exact_starts == frozenset()
    assert not moved.is_exact(moved.reused_spans[0])
    assert moved.moved_spans == (ReusedSpan(3, 5),) and moved.exact_until == 3
    exact = plan_prefill(12, spans, prefix_tokens=3, span_hits={2: True})
    assert exact.moved_spans == () and exact.exact_until == 12


def test_span_ending_at_the_prefix_boundary_is_not_reused():
    spans = find_image_spans(LAYOUT, IMG, [3, 2, 2], ["a", "b", "c"])
    plan = plan_prefill(12, spans, prefix_tokens=5, kv_hit_keys={"a"})
    assert plan.reused_spans == [] and plan.reused_count == 5
    assert plan.fresh_mask.nonzero().flatten().tolist() == list(range(5, 12))


def test_plan_mask_lives_on_the_requested_device():
    """A meta tensor stands in for an accelerator (the default would be the CPU)."""
    spans = find_image_spans(LAYOUT, IMG, [3, 2, 2], ["a", "b", "c"])
    assert plan_prefill(12, spans, 3, {"a"}, device="meta").fresh_mask.device.type == "meta"
