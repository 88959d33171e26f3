"""The selective-attention backend seam: the layer loop asks the backend for a plan per layer and hands it,
unchanged, to the backend's `attend` through the model's own decoder layer (so a varlen or block-sparse
kernel can plug in with metadata of its own)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_same_as_plain, greedy

from vlcache_hf import CacheStore, VLCache
from vlcache_hf import prefill as prefill_module
from vlcache_hf.attention import DenseMaskSDPA, backend_for
from vlcache_hf.tools import toy


class _Plan:
    """Metadata of another form than a mask (as a varlen backend's would be): the dense mask, wrapped."""

    def __init__(self, mask):
        self.mask = mask


class RecordingBackend(DenseMaskSDPA):
    """The dense backend with its plan wrapped in an object of its own: proves the plan reaches `attend` as is."""

    name = "test-recording"

    def __init__(self, break_causality: bool = False):
        self.plans, self.attends, self.break_causality = 0, 0, break_causality

    def plan(self, query_idx, num_keys, key_padding, window):
        self.plans += 1
        return _Plan(super().plan(query_idx, num_keys, key_padding, window))

    def attend(self, module, query, key, value, plan, dropout, scaling):
        assert isinstance(plan, _Plan)
        self.attends += 1
        if self.break_causality:  # every query sees every key: must change the answer
            plan = _Plan(torch.ones(1, 1, query.shape[2], key.shape[2], dtype=torch.bool, device=query.device))
        return super().attend(module, query, key, value, plan.mask, dropout, scaling)


def test_default_backend_is_the_dense_mask_sdpa():
    assert isinstance(backend_for(torch.device("cpu"), "sdpa"), DenseMaskSDPA)


@pytest.mark.parametrize("policy", ["full", "first_k"])
def test_a_backend_plugs_in_behind_the_seam(monkeypatch, models, images, policy):
    model, processor = models()
    backend = RecordingBackend()
    monkeypatch.setattr(prefill_module, "backend_for", lambda device, implementation: backend)
    inputs = toy.chat_inputs(processor, [toy.message("user", images[0], images[1], "What is shown?")])
    store = CacheStore()
    greedy(model, inputs, VLCache(model, store=store))  # fills the store
    moved = toy.chat_inputs(processor, [toy.message("user", "Look:", images[1], images[0], "What is shown?")])
    layers = model.config.text_config.num_hidden_layers
    before = backend.attends
    if policy == "full":
        assert_same_as_plain(model, moved, lambda: VLCache(model, store=store, policy="full"))
    else:
        greedy(model, moved, VLCache(model, store=store, policy="first_k", recompute_ratio=0.25))
    assert backend.attends - before == layers  # one selective prefill: each layer attended once, through the seam
    assert backend.plans >= 1


def test_the_backend_decides_the_answer(monkeypatch, models, images):
    """A backend that ignores causality changes the result: the seam is really where the prefill attends."""
    model, processor = models()
    monkeypatch.setattr(prefill_module, "backend_for", lambda device, implementation: RecordingBackend(break_causality=True))
    inputs = toy.chat_inputs(processor, [toy.message("user", images[2], "What is shown?")])
    plain = greedy(model, inputs)
    broken = greedy(model, inputs, VLCache(model, store=CacheStore(), policy="full"))
    assert max((a - b).abs().max().item() for a, b in zip(plain.scores, broken.scores, strict=True)) > 1e-3
