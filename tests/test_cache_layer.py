"""VLCacheLayer: scatter writes during the selective prefill, DynamicLayer behaviour after."""

from __future__ import annotations

import torch

from vlcache_hf.attention import attention_mask_for
from vlcache_hf.cache import VLCacheLayer
from vlcache_hf.prefill import normalise_set


def test_scatter_write_then_append():
    layer = VLCacheLayer()
    keys, values = torch.zeros(1, 2, 5, 4), torch.zeros(1, 2, 5, 4)
    layer.load(keys, values)
    index = torch.tensor([1, 3])
    layer.begin_write(index, capture_previous=True)
    new_k, new_v = torch.ones(1, 2, 2, 4), 2 * torch.ones(1, 2, 2, 4)
    out_k, out_v = layer.update(new_k, new_v)
    assert out_k.shape == (1, 2, 5, 4)
    assert out_k[0, 0, :, 0].tolist() == [0, 1, 0, 1, 0] and out_v[0, 0, :, 0].tolist() == [0, 2, 0, 2, 0]
    observation = layer.end_write(0)
    assert observation is not None and observation.old_keys.abs().sum() == 0
    assert torch.equal(observation.new_keys, new_k)
    # after the prefill window it appends like a DynamicLayer
    k, _ = layer.update(torch.full((1, 2, 1, 4), 7.0), torch.full((1, 2, 1, 4), 7.0))
    assert k.shape[2] == 6 and layer.get_seq_length() == 6
    layer.crop(-2)
    assert layer.get_seq_length() == 4


def test_mask_is_causal_by_full_sequence_position():
    query = torch.tensor([1, 4])
    mask = attention_mask_for(query, 6, None)
    assert mask[0, 0].int().tolist() == [[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]]
    padded = attention_mask_for(query, 6, torch.tensor([False, True, True, True, True, True]))
    assert padded[0, 0].int().tolist() == [[0, 1, 0, 0, 0, 0], [0, 1, 1, 1, 1, 0]]
    assert attention_mask_for(torch.arange(6), 6, None) is None


def test_normalise_set_keeps_fresh_and_nesting():
    fresh = torch.tensor([0, 5])
    current = torch.tensor([0, 2, 3, 5])
    assert normalise_set(torch.tensor([3, 9, 2]), current, fresh).tolist() == [0, 2, 3, 5]
    assert normalise_set(torch.tensor([3]), current, fresh).tolist() == [0, 3, 5]


def test_appends_write_in_place_and_survive_crop_and_reorder():
    layer = VLCacheLayer()
    storage_k, storage_v = torch.zeros(1, 1, 8, 2), torch.zeros(1, 1, 8, 2)
    layer.load(storage_k, storage_v, length=3)
    assert layer.get_seq_length() == 3
    k, v = layer.update(torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2))
    assert k.data_ptr() == storage_k.data_ptr() and k.shape[2] == 5  # written into spare capacity
    assert storage_k[0, 0, 3:5].eq(1).all()
    layer.crop(-1)
    k, _ = layer.update(torch.full((1, 1, 1, 2), 5.0), torch.full((1, 1, 1, 2), 5.0))
    assert k[0, 0, :, 0].tolist() == [0, 0, 0, 1, 5]
    for step in range(6):  # past the capacity: grows, keeps every row
        k, _ = layer.update(torch.full((1, 1, 1, 2), float(step)), torch.zeros(1, 1, 1, 2))
    assert k.shape[2] == 11 and k[0, 0, :, 0].tolist() == [0, 0, 0, 1, 5, 0, 1, 2, 3, 4, 5]
    layer.batch_repeat_interleave(2)  # a reorder leaves our storage: the next append re-homes
    k, _ = layer.update(torch.full((2, 1, 1, 2), 9.0), torch.zeros(2, 1, 1, 2))
    assert k.shape == (2, 1, 12, 2) and k[1, 0, -1, 0] == 9
