"""Re-rotation of cached keys: R(Δ)·key(p) == key(p + Δ), for 1-D and multimodal RoPE."""

from __future__ import annotations

import pytest
import torch
from helpers import greedy

from vlcache_hf import CacheStore, VLCache, toy
from vlcache_hf.models import get_adapter
from vlcache_hf.rope import apply_rotation, position_delta


def _keys_at(adapter, raw: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    cos, sin = adapter.rotary_cos_sin(raw, positions)
    return apply_rotation(raw, cos, sin)


def _image_positions(start: int, rows: int, cols: int) -> torch.Tensor:
    h = torch.arange(rows).repeat_interleave(cols) + start
    w = torch.arange(cols).repeat(rows) + start
    t = torch.full_like(h, start)
    return torch.stack([t, h, w])[:, None, :]


@pytest.mark.parametrize("delta", [7, -3, 250])
def test_rerotation_1d(models, family, delta):
    adapter = get_adapter(models(family)[0])
    torch.manual_seed(0)
    raw = torch.randn(1, 2, 10, adapter.kv_layout.head_dim)
    p = torch.arange(5, 15).view(1, 1, -1).expand(adapter.position_axes, 1, -1)
    cached = _keys_at(adapter, raw, p)
    moved = apply_rotation(cached, *adapter.rotation_cos_sin(cached, position_delta(p[:, 0] + delta, p[:, 0])))
    torch.testing.assert_close(moved, _keys_at(adapter, raw, p + delta), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("delta", [11, -4])
def test_rerotation_mrope_image_grid(models, mrope_family, delta):
    adapter = get_adapter(models(mrope_family)[0])
    torch.manual_seed(1)
    raw = torch.randn(1, 2, 12, adapter.kv_layout.head_dim)
    p = _image_positions(20, 3, 4)
    cached = _keys_at(adapter, raw, p)
    delta_pos = position_delta(p[:, 0] + delta, p[:, 0])
    moved = apply_rotation(cached, *adapter.rotation_cos_sin(cached, delta_pos))
    torch.testing.assert_close(moved, _keys_at(adapter, raw, p + delta), atol=1e-5, rtol=1e-5)


def test_rerotation_mrope_per_axis_delta(models, mrope_family):
    """Each M-RoPE section follows its own axis, so unequal per-axis deltas re-rotate exactly too."""
    adapter = get_adapter(models(mrope_family)[0])
    torch.manual_seed(2)
    raw = torch.randn(1, 2, 6, adapter.kv_layout.head_dim)
    p = _image_positions(3, 2, 3)
    target = p + torch.tensor([5, -2, 9]).view(3, 1, 1)
    cached = _keys_at(adapter, raw, p)
    moved = apply_rotation(cached, *adapter.rotation_cos_sin(cached, position_delta(target[:, 0], p[:, 0])))
    torch.testing.assert_close(moved, _keys_at(adapter, raw, target), atol=1e-5, rtol=1e-5)


def test_reused_layer0_keys_equal_fresh_keys_at_new_position(models, family, images):
    """Layer-0 K/V depend only on the token and its position: reused image keys must match plain ones."""
    model, processor = models(family)
    store = CacheStore()
    first = toy.chat_inputs(processor, [toy.message("user", "a", images[0], images[1], "b")])
    greedy(model, first, VLCache(model, store=store), max_new_tokens=1)
    moved = toy.chat_inputs(processor, [toy.message("user", "much longer text here", images[1], images[0], "?")])
    reference = VLCache(model, store=CacheStore(), policy="full")
    greedy(model, moved, reference, max_new_tokens=1)
    reused = VLCache(model, store=store, policy="none")
    greedy(model, moved, reused, max_new_tokens=1)
    assert reused.report.kv_hits == 2
    image_rows = (moved["input_ids"][0] == get_adapter(model).image_token_id).nonzero().flatten()
    for name in ("keys", "values"):
        ref = getattr(reference.layers[0], name)[:, :, image_rows]
        got = getattr(reused.layers[0], name)[:, :, image_rows]
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
