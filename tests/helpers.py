"""Helpers shared by the tests: real generate calls and measurements, nothing mocked."""

from __future__ import annotations

import torch

from vlcache_hf.compat import with_cache


class EncoderCounter:
    """Counts real runs of a model's vision tower (a forward hook: nothing is mocked)."""

    def __init__(self, vision_tower: torch.nn.Module):
        self.calls = 0
        self._handle = vision_tower.register_forward_hook(self._count)

    def _count(self, *args) -> None:
        self.calls += 1

    def close(self) -> None:
        self._handle.remove()


class RepeatKVCalls:
    """Counts transformers' `repeat_kv` calls, the per-group K/V copies of its SDPA path (it still runs: observed,
    not replaced)."""

    def __init__(self, monkeypatch):
        import transformers.integrations.sdpa_attention as hf_sdpa

        self.calls = 0
        original = hf_sdpa.repeat_kv

        def counted(hidden_states, n_rep):
            self.calls += 1
            return original(hidden_states, n_rep)

        monkeypatch.setattr(hf_sdpa, "repeat_kv", counted)


def greedy(model, inputs, cache=None, max_new_tokens: int = 6, **kwargs):
    """generate with scores, optionally through a cache."""
    extra = with_cache(model, cache)
    return model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
        **extra,
        **kwargs,
    )


def assert_same_as_plain(model, inputs, make_cache, atol: float = 1e-4):
    """Plain generate, then generate through the cache `make_cache()` returns; greedy tokens equal and every
    step's logits within `atol` (float32). Returns the cache, for checks of its report."""
    plain = greedy(model, inputs)
    cache = make_cache()
    ours = greedy(model, inputs, cache)
    assert torch.equal(plain.sequences, ours.sequences), (plain.sequences, ours.sequences)
    for step, (a, b) in enumerate(zip(plain.scores, ours.scores, strict=True)):
        diff = (a - b).abs().max().item()
        assert diff < atol, f"step {step}: logits differ by {diff}"
    return cache


def kl_first_token(reference, candidate) -> float:
    p = torch.log_softmax(reference.scores[0].float(), -1)
    q = torch.log_softmax(candidate.scores[0].float(), -1)
    return float((p.exp() * (p - q)).sum())


def assert_full_policy_reuses_encoder_exactly(model, store, inputs, counter: EncoderCounter):
    """Policy "full" on `inputs` whose visual items are all stored: the vision tower never runs and the
    output equals plain `generate`. Returns the cache (for further checks of its report)."""
    from vlcache_hf import VLCache

    plain = greedy(model, inputs)
    counter.calls = 0
    cache = VLCache(model, store=store, policy="full")
    ours = greedy(model, inputs, cache)
    assert counter.calls == 0
    assert torch.equal(plain.sequences, ours.sequences)
    assert (plain.scores[0] - ours.scores[0]).abs().max() < 1e-4
    return cache

