"""One block for every layer's K/V buffers (the default off the CPU): filling it must give exactly what per-layer
buffers give — the same rows, the same re-rotated keys, the same answers — since only the number of copies changes."""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import greedy

from vlcache_hf import CacheStore, VLCache, engine, prefill
from vlcache_hf.models import KVLayout, get_adapter
from vlcache_hf.prefill import DECODE_HEADROOM, allocate_buffers, fill_moved, fill_prefix
from vlcache_hf.reuse import PrefixChunk
from vlcache_hf.store.entry import KVEntry
from vlcache_hf.tools import toy


def test_block_buffers_are_views_of_one_tensor():
    layout = KVLayout(num_layers=3, num_kv_heads=2, head_dim=4, dtype=torch.bfloat16)
    buffers = allocate_buffers(layout, 10, torch.device("cpu"), block=True)
    assert buffers.block.shape == (3, 2, 1, 2, 10 + DECODE_HEADROOM, 4) and buffers.block.dtype == torch.bfloat16
    assert len(buffers) == 3
    for layer, (keys, values) in enumerate(buffers):
        assert keys.shape == values.shape == (1, 2, 10 + DECODE_HEADROOM, 4)
        assert keys.is_contiguous() and values.is_contiguous()
        assert keys.data_ptr() == buffers.block[layer, 0].data_ptr() and values.data_ptr() == buffers.block[layer, 1].data_ptr()
    assert allocate_buffers(layout, 10, torch.device("cpu")).block is None  # the CPU default: per layer
    assert allocate_buffers(layout, 10, torch.device("meta")).block is not None  # any other device: a block


def _kv(layers, tokens, start):
    """[layers, 2, kv_heads=1, tokens, head_dim=2], every value distinct: 1000·layer + 100·side + start + row."""
    rows = torch.arange(tokens, dtype=torch.float32)
    kv = torch.stack([torch.stack([1000 * layer + 100 * side + start + rows for side in range(2)]) for layer in range(layers)])
    return kv[:, :, None, :, None].expand(layers, 2, 1, tokens, 2).clone()


def _both(layout, tokens):
    per_layer, block = allocate_buffers(layout, tokens, torch.device("cpu"), block=False), allocate_buffers(layout, tokens, torch.device("cpu"), block=True)
    for buffers in (per_layer, block):
        for keys, values in buffers:
            keys.fill_(-1)
            values.fill_(-1)
    return per_layer, block


def _assert_same(per_layer, block):
    for (k1, v1), (k2, v2) in zip(per_layer, block, strict=True):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)


def test_fill_prefix_into_a_block_equals_per_layer_buffers():
    layout = KVLayout(num_layers=2, num_kv_heads=1, head_dim=2, dtype=torch.float32)
    text = KVEntry(_kv(2, 3, 500), torch.zeros(1, 3))  # text rows 0, 1, 5 (and 7 below)
    image = KVEntry(_kv(2, 6, 700), torch.zeros(1, 6))
    later = KVEntry(_kv(2, 2, 900), torch.zeros(1, 2))
    chunks = [PrefixChunk(torch.tensor([8, 9]), later, ()), PrefixChunk(torch.tensor([0, 1, 5]), text, ((2, 5, image, 1),))]
    per_layer, block = _both(layout, 12)
    fill_prefix(per_layer, chunks)
    fill_prefix(block, chunks)
    _assert_same(per_layer, block)
    got = block.block[1, 1, 0, 0, :12, 0].tolist()  # layer 1, values: rows 0..5 and 8..9 filled, 6..7 and 10.. not
    assert got == [1600, 1601, 1801, 1802, 1803, 1602, -1, -1, 2000, 2001, -1, -1]


def test_fill_moved_into_a_block_equals_per_layer_buffers(models):
    model, _ = models("qwen2_5_vl")
    adapter = get_adapter(model)
    layout = adapter.kv_layout
    g = torch.Generator().manual_seed(5)
    entry = KVEntry(torch.randn(layout.num_layers, 2, layout.num_kv_heads, 10, layout.head_dim, generator=g), torch.arange(10, 20).expand(3, 10).clone())
    new = torch.arange(8).view(1, 1, 8).expand(3, 1, 8).clone()
    for positions in (new, new + 9):  # moved (re-rotated) and at home (copied as stored)
        per_layer, block = _both(layout, 8)
        fill_moved(adapter, per_layer, entry, 2, 3, 7, positions)
        fill_moved(adapter, block, entry, 2, 3, 7, positions)
        _assert_same(per_layer, block)
        assert block.block[:, :, :, :, 3:7].ne(-1).all() and block.block[:, :, :, :, :3].eq(-1).all()


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_block_buffers_serve_requests_as_per_layer_buffers_do(models, images, monkeypatch, family):
    """Exact repeat, chat turn and a moved request through the engine with each layout: the same tokens and
    bit-identical scores, and the exact ones equal to plain generate."""
    model, processor = models(family)
    first_turn = [toy.message("user", images[0], images[1], "What is shown?")]
    first = toy.chat_inputs(processor, first_turn)
    chat = toy.chat_inputs(processor, [*first_turn, toy.message("assistant", "Shapes."), toy.message("user", "Colours?")])
    moved = toy.chat_inputs(processor, [toy.message("user", "Now:", images[1], images[0], "What is shown?")])
    outputs = {}
    for use_block in (False, True):
        monkeypatch.setattr(engine, "allocate_buffers", functools.partial(prefill.allocate_buffers, block=use_block))
        store = CacheStore()
        greedy(model, first, VLCache(model, store=store))
        outputs[use_block] = [greedy(model, inputs, VLCache(model, store=store, policy="vlcache", recompute_ratio=0.1)) for inputs in (first, chat, moved)]
    for per_layer, block in zip(outputs[False], outputs[True], strict=True):
        assert torch.equal(per_layer.sequences, block.sequences)
        assert all(torch.equal(a, b) for a, b in zip(per_layer.scores, block.scores, strict=True))
    for inputs, ours in zip((first, chat), outputs[True], strict=False):
        plain = greedy(model, inputs)
        assert torch.equal(plain.sequences, ours.sequences)
        assert max(float((a - b).abs().max()) for a, b in zip(plain.scores, ours.scores, strict=True)) < 1e-4


def test_gathers_from_a_block_equal_per_layer_gathers():
    from vlcache_hf.reuse import gather_kv, gather_rows

    layout = KVLayout(num_layers=3, num_kv_heads=2, head_dim=4, dtype=torch.float32)
    per_layer, block = _both(layout, 9)
    g = torch.Generator().manual_seed(1)
    for (k1, v1), (k2, v2) in zip(per_layer, block, strict=True):
        k1.copy_(torch.randn(k1.shape, generator=g))
        v1.copy_(torch.randn(v1.shape, generator=g))
        k2.copy_(k1)
        v2.copy_(v1)
    rows = torch.tensor([0, 2, 3, 7])
    expected = torch.stack([torch.stack([k[0][:, rows], v[0][:, rows]]) for k, v in per_layer])  # independent gather
    assert torch.equal(gather_rows(block, rows), expected) and torch.equal(gather_rows(per_layer, rows), expected)
    span = gather_kv(block, 2, 6)
    assert torch.equal(span, gather_kv(per_layer, 2, 6)) and span.shape == (3, 2, 2, 4, 4)
    span.fill_(0)  # a copy, not a view of the buffers
    assert block.block[:, :, 0, :, 2:6].ne(0).any()


def test_with_a_block_fills_go_to_the_block_in_one_copy_per_span(models):
    """The block, not the per-layer list, is what filling writes when there is one (a list whose entries are
    not views of it shows which was written): a mix-up would fall back to one copy per layer and side."""
    layout = KVLayout(num_layers=2, num_kv_heads=1, head_dim=2, dtype=torch.float32)
    buffers = allocate_buffers(layout, 6, torch.device("cpu"), block=True)
    buffers.block.fill_(-1)
    detached = [(torch.full_like(k, -1), torch.full_like(v, -1)) for k, v in buffers]
    buffers[:] = detached  # the same shapes, not views of the block
    text = KVEntry(_kv(2, 2, 500), torch.zeros(1, 2))
    fill_prefix(buffers, [PrefixChunk(torch.tensor([0, 1]), text, ())])
    assert buffers.block[:, :, 0, 0, :2, 0].ne(-1).all() and all(k.eq(-1).all() and v.eq(-1).all() for k, v in detached)
    model, _ = models("qwen2_5_vl")
    adapter = get_adapter(model)
    full = adapter.kv_layout
    moved = allocate_buffers(full, 8, torch.device("cpu"), block=True)
    moved.block.fill_(-1)
    moved[:] = [(torch.full_like(k, -1), torch.full_like(v, -1)) for k, v in moved]
    entry = KVEntry(torch.randn(full.num_layers, 2, full.num_kv_heads, 4, full.head_dim), torch.arange(4).expand(3, 4).clone())
    fill_moved(adapter, moved, entry, 0, 2, 6, torch.arange(8).view(1, 1, 8).expand(3, 1, 8).clone())
    assert moved.block[:, :, 0, :, 2:6].ne(-1).all() and all(k.eq(-1).all() for k, _ in moved)


def test_per_layer_buffers_are_allocated_on_the_device_asked_for():
    layout = KVLayout(num_layers=2, num_kv_heads=1, head_dim=2, dtype=torch.float32)
    per_layer = allocate_buffers(layout, 4, torch.device("meta"), block=False)
    assert per_layer.block is None and all(side.is_meta for pair in per_layer for side in pair)
    assert allocate_buffers(layout, 4, torch.device("meta"), block=True).block.is_meta
