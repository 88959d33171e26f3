"""Re-rotation of cached keys: R(Δ)·key(p) == key(p + Δ), for 1-D and multimodal RoPE."""

from __future__ import annotations

import sys

import pytest
import torch
from helpers import greedy

from vlcache_hf import CacheStore, VLCache
from vlcache_hf.models import get_adapter
from vlcache_hf.rope import apply_rotation, position_delta
from vlcache_hf.tools import toy


def model_keys_at(model, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Layer-0 keys of `hidden` ([1, n, hidden]) at `positions` ([num_axes, 1, n]) as the model itself computes
    them: its k_proj (and k_norm where it has one), its rotary module and the `apply_rotary_pos_emb` of its own
    modeling file. Nothing of vlcache_hf's rotation code is involved: this is the independent reference."""
    text = model.model.language_model
    attn = text.layers[0].self_attn
    head_dim = attn.head_dim
    keys = attn.k_proj(hidden).view(1, hidden.shape[1], -1, head_dim)
    if hasattr(attn, "k_norm"):  # Qwen3-VL normalises keys before RoPE
        keys = attn.k_norm(keys)
    keys = keys.transpose(1, 2)
    position_ids = positions if positions.shape[0] > 1 else positions[0]  # M-RoPE takes all three axes
    cos, sin = text.rotary_emb(hidden, position_ids)
    _, rotated = sys.modules[type(attn).__module__].apply_rotary_pos_emb(keys, keys, cos, sin)
    return rotated


def _image_positions(start: int, rows: int, cols: int) -> torch.Tensor:
    h = torch.arange(rows).repeat_interleave(cols) + start
    w = torch.arange(cols).repeat(rows) + start
    t = torch.full_like(h, start)
    return torch.stack([t, h, w])[:, None, :]


def _moved(adapter, cached: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """The code under test: re-rotate keys cached at `old` positions to `new` ones."""
    return apply_rotation(cached, *adapter.rotation_cos_sin(cached, position_delta(new[:, 0], old[:, 0])))


def test_apply_rotation_closed_form():
    """Llama-style RoPE pairs dimension i with i + head_dim/2: (x_i, x_j) → (x_i cos − x_j sin, x_j cos + x_i sin).
    Pair (0, 2) turns by 90°, pair (1, 3) by 180°; the expected numbers are worked out by hand."""
    keys = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])
    cos = torch.tensor([[[0.0, -1.0, 0.0, -1.0]]])
    sin = torch.tensor([[[1.0, 0.0, 1.0, 0.0]]])
    # pair (0, 2) = (1, 3) by 90° → (−3, 1); pair (1, 3) = (2, 4) by 180° → (−2, −4)
    torch.testing.assert_close(apply_rotation(keys, cos, sin), torch.tensor([[[-3.0, -2.0, 1.0, -4.0]]]))
    angle = torch.tensor(0.3)
    c, s = torch.cos(angle), torch.sin(angle)
    got = apply_rotation(keys, torch.stack([c, c, c, c]).view(1, 1, 4), torch.stack([s, s, s, s]).view(1, 1, 4))
    expected = torch.stack([1 * c - 3 * s, 2 * c - 4 * s, 3 * c + 1 * s, 4 * c + 2 * s]).view(1, 1, 4)
    torch.testing.assert_close(got, expected)


def test_apply_rotation_keeps_the_cache_dtype_with_one_rounding():
    """bf16 keys come back bf16, rounded once from the float32 result (mutation: the cast back dropped)."""
    keys = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]], dtype=torch.bfloat16)
    angle = torch.tensor(0.3)
    c, s = torch.cos(angle), torch.sin(angle)
    got = apply_rotation(keys, torch.full((1, 1, 4), c.item()), torch.full((1, 1, 4), s.item()))
    assert got.dtype == torch.bfloat16
    expected = torch.stack([1 * c - 3 * s, 2 * c - 4 * s, 3 * c + 1 * s, 4 * c + 2 * s]).view(1, 1, 4)
    assert torch.equal(got, expected.to(torch.bfloat16))


def test_position_delta_is_long_on_the_new_positions_device():
    """Hand-computed deltas; the result is int64 whatever integer or float dtypes come in, and lives where the
    new positions live (a meta tensor stands in for an accelerator: mixing it with CPU raises)."""
    new = torch.tensor([[5, 6, 7], [9, 9, 9]], dtype=torch.int32)
    old = torch.tensor([[1.0, 1.0, 2.0], [0.0, 4.0, 9.0]], dtype=torch.float64)
    expected = torch.tensor([[4, 5, 5], [9, 5, 0]], dtype=torch.long)
    for a, b, want in ((new, old, expected), (old.float(), new, -expected)):
        got = position_delta(a, b)
        assert got.dtype == torch.long
        assert torch.equal(got, want)
    both_int32 = position_delta(new, torch.zeros_like(new))
    assert both_int32.dtype == torch.long
    assert position_delta(new.to("meta"), old).device.type == "meta"


def test_position_delta_refuses_other_shapes_naming_both():
    with pytest.raises(ValueError, match=r"position shapes differ: \(3, 4\) vs \(3, 5\)"):
        position_delta(torch.zeros(3, 4, dtype=torch.long), torch.zeros(3, 5, dtype=torch.long))


@pytest.mark.parametrize("delta", [7, -3, 250])
def test_rerotation_1d(models, family, delta):
    model = models(family)[0]
    adapter = get_adapter(model)
    torch.manual_seed(0)
    hidden = torch.randn(1, 10, model.config.get_text_config().hidden_size)
    p = torch.arange(5, 15).view(1, 1, -1).expand(adapter.position_axes, 1, -1)
    with torch.no_grad():
        cached, fresh = model_keys_at(model, hidden, p), model_keys_at(model, hidden, p + delta)
        moved = _moved(adapter, cached, p, p + delta)
    assert (cached - fresh).abs().max() > 0.1  # the move is not a no-op
    torch.testing.assert_close(moved, fresh, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("delta", [11, -4])
def test_rerotation_mrope_image_grid(models, mrope_family, delta):
    model = models(mrope_family)[0]
    adapter = get_adapter(model)
    torch.manual_seed(1)
    hidden = torch.randn(1, 12, model.config.get_text_config().hidden_size)
    p = _image_positions(20, 3, 4)
    with torch.no_grad():
        moved = _moved(adapter, model_keys_at(model, hidden, p), p, p + delta)
        fresh = model_keys_at(model, hidden, p + delta)
    torch.testing.assert_close(moved, fresh, atol=1e-5, rtol=1e-5)


def test_rerotation_mrope_per_axis_delta(models, mrope_family):
    """Each M-RoPE section follows its own axis, so unequal per-axis deltas re-rotate exactly too."""
    model = models(mrope_family)[0]
    adapter = get_adapter(model)
    torch.manual_seed(2)
    hidden = torch.randn(1, 6, model.config.get_text_config().hidden_size)
    p = _image_positions(3, 2, 3)
    target = p + torch.tensor([5, -2, 9]).view(3, 1, 1)
    with torch.no_grad():
        moved = _moved(adapter, model_keys_at(model, hidden, p), p, target)
        fresh = model_keys_at(model, hidden, target)
    torch.testing.assert_close(moved, fresh, atol=1e-5, rtol=1e-5)


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
