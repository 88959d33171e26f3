"""Model configurations our toys do not have, each compared with the unmodified model's own `generate`.

- sliding-window attention (Qwen2-VL's `use_sliding_window` on its upper layers, as HF's `max_window_layers`
  sets them; a Mistral text model under LLaVA, windowed on every layer; LLaVA-OneVision's Qwen2 text model);
- RoPE whose frequencies depend on the sequence length (dynamic NTK, LongRoPE) past their original length;
- half precision (bf16, fp16) with SDPA and with eager attention: bit-exact.
"""

from __future__ import annotations

import pytest
import torch
from helpers import greedy
from transformers import AutoModelForImageTextToText

from vlcache_hf import CacheStore, VLCache
from vlcache_hf.tools import toy

WINDOW = 8
MAX_POSITIONS = 64  # the "Hi" + 1 image prompt stays below, the two-image prompts go past it


def request(processor, images, preamble: str, order: list[int], question: str = "What is shown?"):
    return toy.chat_inputs(processor, [toy.message("user", preamble, *[images[i] for i in order], question)])


def build(config, attn: str = "sdpa", dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_config(config, attn_implementation=attn, dtype=dtype).eval()


def sliding_window_config(family: str):
    """A toy config with a `WINDOW`-token sliding window where the family's text model supports one."""
    config = toy.build_config(family)
    text = config.text_config
    if family == "llava":  # LLaVA on a Mistral-style text model: every layer windowed
        from transformers import MistralConfig

        fields = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings")
        config.text_config = MistralConfig(**{f: getattr(text, f) for f in fields}, sliding_window=WINDOW)
        return config
    # Qwen2 style: `use_sliding_window`, windowed from layer `max_window_layers` on (HF's own rule)
    text.use_sliding_window, text.sliding_window, text.max_window_layers = True, WINDOW, 2
    text.layer_types = ["sliding_attention" if i >= 2 else "full_attention" for i in range(text.num_hidden_layers)]
    return config


def assert_same_as_plain(model, inputs, cache, atol: float = 1e-4, max_new_tokens: int = 6):
    plain = greedy(model, inputs, max_new_tokens=max_new_tokens)
    ours = greedy(model, inputs, cache, max_new_tokens=max_new_tokens)
    assert torch.equal(plain.sequences, ours.sequences), (plain.sequences, ours.sequences)
    for step, (a, b) in enumerate(zip(plain.scores, ours.scores, strict=True)):
        diff = (a - b).abs().max().item()
        assert diff < atol, f"step {step}: logits differ by {diff}"
    return plain, ours


@pytest.mark.parametrize("family", ["qwen2_vl", "llava", "llava_onevision"])
def test_sliding_window_full_policy_and_exact_repeat_equal_plain(family, images):
    model, processor = build(sliding_window_config(family)), toy.build_processor(family)
    store = CacheStore()
    inputs = request(processor, images, "Look:", [0, 1])
    assert inputs["input_ids"].shape[1] > 4 * WINDOW  # the window cuts into the prompt
    assert_same_as_plain(model, inputs, VLCache(model, store=store, policy="full", prefix_chunk_size=16))
    moved = request(processor, images, "A much longer preamble, then", [1, 0])
    cache = VLCache(model, store=store, policy="full")
    assert_same_as_plain(model, moved, cache)
    assert cache.report.encoder_hits == 2
    repeat_store = CacheStore()
    greedy(model, moved, VLCache(model, store=repeat_store, policy="none", prefix_chunk_size=16))
    cache = VLCache(model, store=repeat_store, policy="none", prefix_chunk_size=16)
    assert_same_as_plain(model, moved, cache)  # exact prefix reuse of windowed K/V, the rest recomputed
    assert cache.report.prefix_tokens > 0


def test_attention_window_follows_the_model_layer_types():
    """Which layers are windowed is what the model's own masks apply: Qwen2's `layer_types`, Mistral's every layer."""
    from vlcache_hf.models import get_adapter

    assert [get_adapter(build(sliding_window_config("qwen2_vl"))).attention_window(i) for i in range(4)] == [None, None, WINDOW, WINDOW]
    assert [get_adapter(build(sliding_window_config("llava"))).attention_window(i) for i in range(4)] == [WINDOW] * 4
    assert [get_adapter(build(toy.build_config("qwen2_vl"))).attention_window(i) for i in range(4)] == [None] * 4


def rope_config(family: str, rope: str):
    config = toy.build_config(family)
    text = config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    params = dict(text.rope_parameters)
    if rope == "dynamic":
        params.update(rope_type="dynamic", factor=4.0)
    else:  # LongRoPE: short factors up to `original_max_position_embeddings`, long ones past it
        params.update(rope_type="longrope", short_factor=[1.0] * (head_dim // 2),
                      long_factor=[1.0 + i for i in range(head_dim // 2)], original_max_position_embeddings=MAX_POSITIONS)
    text.rope_parameters = params
    text.max_position_embeddings = MAX_POSITIONS if rope == "dynamic" else 4 * MAX_POSITIONS
    return config


def reset_rope(model) -> None:
    """Dynamic NTK keeps the longest length it has seen (HF's own statefulness); a call at position 0 resets it, so
    that plain and cached runs start from the same rotary state."""
    from vlcache_hf.models import get_adapter

    adapter = get_adapter(model)
    positions = torch.zeros((adapter.position_axes, 1, 1), dtype=torch.long)
    adapter.rotary_cos_sin(torch.zeros(1), positions)


@pytest.mark.parametrize(("family", "rope"), [("llava", "dynamic"), ("llava", "longrope"), ("qwen2_vl", "dynamic")])
def test_length_dependent_rope_never_uses_kv_of_other_frequencies(family, rope, images):
    model, processor = build(rope_config(family, rope)), toy.build_processor(family)
    store = CacheStore()
    short = request(processor, images, "Hi, look at this:", [0], "What?")
    # starts with `short`'s prompt (same tokens, same image, same positions), then goes past the original length
    long_ = request(processor, images, "Hi, look at this:", [0, 1], "And what is shown in the second picture, next to the first?")

    # below the original length the frequencies are the base ones: exact repeats reuse K/V as usual
    greedy(model, short, VLCache(model, store=store, policy="none", prefix_chunk_size=16))
    reset_rope(model)
    cache = VLCache(model, store=store, policy="none", prefix_chunk_size=16)
    assert_same_as_plain(model, short, cache)
    assert cache.report.prefix_tokens > 0 and cache.report.fallback == ""

    # past it, every key depends on the length: `short`'s K/V (base frequencies) is wrong here even as an exact
    # prefix, and what this request computes holds for its own length only
    for _ in range(2):  # the second time, nothing the first one computed may have been published either
        reset_rope(model)
        plain = greedy(model, long_)
        reset_rope(model)
        cache = VLCache(model, store=store, policy="none", prefix_chunk_size=16)
        ours = greedy(model, long_, cache)
        assert torch.equal(plain.sequences, ours.sequences)
        assert max((a - b).abs().max().item() for a, b in zip(plain.scores, ours.scores, strict=True)) < 1e-4
        assert cache.report.reused_tokens == 0 and cache.report.kv_hits == 0
        assert "rope" in cache.report.fallback and "not reused" in cache.report.fallback
        assert cache.report.fallback in cache.report.summary()
        assert cache.report.encoder_hits >= 1  # the encoder cache still serves


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_half_precision_full_policy_is_bit_exact(family, dtype, attn, images):
    """In bf16/fp16 on CPU policy "full" rounds exactly as the model: the selective prefill uses the model's own
    kernel family (SDPA, or its eager attention), so the logits are bitwise equal, not merely close."""
    processor = toy.build_processor(family)
    inputs = request(processor, images, "Look:", [0, 1])
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    model = toy.build_model(family, dtype=dtype, attn_implementation=attn)
    plain = greedy(model, inputs, max_new_tokens=4)
    ours = greedy(model, inputs, VLCache(model, store=CacheStore(), policy="full"), max_new_tokens=4)
    assert torch.equal(plain.sequences, ours.sequences)
    for step, (a, b) in enumerate(zip(plain.scores, ours.scores, strict=True)):
        assert torch.equal(a, b), f"step {step}: logits differ by {(a - b).abs().max().item()}"
