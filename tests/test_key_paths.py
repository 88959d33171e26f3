"""One key for one image, whichever path its request took (issue 13).

An image reaches `VLCache` either through `VLCacheProcessor` (pre-encoded `mm_encoder_outputs`) or through the
plain processor (pixels, encoded by `generate`). Its K/V and the exact-context hashes are keyed by the image's
item key, so both paths must give the same key: otherwise an exact repeat that switches paths is served as a
*moved* (approximate) reuse and no longer equals plain `generate`.

The reference is always the unmodified model: plain `generate` on the wrapped processor's own outputs.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from helpers import greedy

from vlcache_hf import CacheStore, VLCache
from vlcache_hf.processor import VLCacheProcessor
from vlcache_hf.tools import toy


def _turn(images: list) -> list[dict]:
    return [toy.message("user", "Look:", *[part for image in images for part in (image, "then")], "Which colour?")]


def _via_processor(wrapped: VLCacheProcessor, processor, messages: list[dict], images: list):
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return wrapped(text=text, images=images)


def _assert_exact_repeat(model, store, inputs, reference, images: int) -> None:
    """`inputs` through a VLCache with policy "none" equals plain generate on `reference`, served exactly."""
    plain = greedy(model, reference)
    cache = VLCache(model, store=store, policy="none")
    ours = greedy(model, inputs, cache)
    assert torch.equal(plain.sequences, ours.sequences)
    for step, (expected, got) in enumerate(zip(plain.scores, ours.scores, strict=True)):
        assert (expected - got).abs().max() < 1e-4, f"step {step}"
    report = cache.report
    assert report.moved_tokens == 0, "an exact repeat must not be served as moved reuse"
    assert report.encoder_hits == images
    assert report.kv_hits == images
    assert report.prefix_tokens + report.exact_span_tokens > 0


# one image and two: LLaVA-OneVision tiles an image alone in its prompt and gives each of several its base view
@pytest.mark.parametrize("count", [1, 2])
@pytest.mark.parametrize("first", ["plain", "processor"])
def test_exact_repeat_switching_paths_equals_plain(models, family, images, first, count):
    model, processor = models(family)
    store = CacheStore()
    wrapped = VLCacheProcessor(processor, model, store)
    pictures = images[:count]
    messages = _turn(pictures)
    reference = toy.chat_inputs(processor, messages)
    if first == "plain":
        greedy(model, reference, VLCache(model, store=store, policy="full"))
        repeat = _via_processor(wrapped, processor, messages, pictures)
        assert wrapped.last_hits == [True] * len(pictures)
    else:
        first_inputs = _via_processor(wrapped, processor, messages, pictures)
        greedy(model, first_inputs, VLCache(model, store=store, policy="full"))
        repeat = reference
    assert torch.equal(repeat["input_ids"], reference["input_ids"])
    _assert_exact_repeat(model, store, repeat, reference, len(pictures))


@pytest.mark.parametrize("first", ["plain", "processor"])
def test_chat_continuation_switching_paths_equals_plain(models, family, images, first):
    """Turn 1 through one path, turn 2 (turn 1 + answer + new text) through the other."""
    model, processor = models(family)
    store = CacheStore()
    wrapped = VLCacheProcessor(processor, model, store)
    pictures = images[:2]
    turn1 = _turn(pictures)
    turn2 = turn1 + [toy.message("assistant", "They look alike."), toy.message("user", "And the shapes?")]
    reference = toy.chat_inputs(processor, turn2)
    if first == "plain":
        greedy(model, toy.chat_inputs(processor, turn1), VLCache(model, store=store, policy="full"))
        inputs = _via_processor(wrapped, processor, turn2, pictures)
    else:
        greedy(model, _via_processor(wrapped, processor, turn1, pictures), VLCache(model, store=store, policy="full"))
        inputs = reference
    _assert_exact_repeat(model, store, inputs, reference, len(pictures))


def test_onevision_variants_keep_their_own_keys_across_paths(models, images):
    """The tiled and the base-view variant of one picture are two entries on both paths: a processor request
    in one variant after a plain request in the other is an encoder miss, not the other variant's output."""
    model, processor = models("llava_onevision")
    store = CacheStore()
    wrapped = VLCacheProcessor(processor, model, store)
    greedy(model, toy.chat_inputs(processor, _turn(images[:1])), VLCache(model, store=store, policy="full"))
    messages = _turn([images[0], images[1]])
    inputs = _via_processor(wrapped, processor, messages, [images[0], images[1]])
    assert wrapped.last_hits == [False, False]
    reference = toy.chat_inputs(processor, messages)
    assert torch.equal(inputs["input_ids"], reference["input_ids"])
    plain = greedy(model, reference)
    ours = greedy(model, inputs, VLCache(model, store=store, policy="full"))
    assert torch.equal(plain.sequences, ours.sequences)
    assert (plain.scores[0] - ours.scores[0]).abs().max() < 1e-4


def test_an_alias_whose_encoder_entry_was_evicted_is_a_miss(models, images, encoder_counter):
    """The wrapper finds an image's encoder entry through a small alias from its raw key; once the entry itself
    is gone (evicted, discarded) the alias leads nowhere: a miss that encodes again, never an error."""
    from vlcache_hf.fingerprint import fingerprint
    from vlcache_hf.store.keys import ENCODER_KIND, entry_key

    model, processor = models("qwen2_5_vl")
    store = CacheStore()
    wrapped = VLCacheProcessor(processor, model, store)
    messages = _turn(images[:1])
    first = _via_processor(wrapped, processor, messages, images[:1])
    key = first["mm_encoder_outputs"]["image"].vlcache_features.keys[0]
    store.discard(entry_key(ENCODER_KIND, fingerprint(model), key))
    counter = encoder_counter(model)
    again = _via_processor(wrapped, processor, messages, images[:1])
    assert wrapped.last_hits == [False] and counter.calls == 1
    assert again["mm_encoder_outputs"]["image"].vlcache_features.keys == [key]
    plain = greedy(model, toy.chat_inputs(processor, messages))
    ours = greedy(model, again, VLCache(model, store=store, policy="full"))
    assert torch.equal(plain.sequences, ours.sequences)


def test_pixels_in_the_models_dtype_are_the_same_image(images):
    """The wrapper hands the encoder pixels cast to a bf16 model's dtype; plain `generate` gets the processor's
    float32 pixels. The tower casts its input first, so both are one image: one key, an exact repeat."""
    model, processor = toy.build_model("qwen2_5_vl", dtype=torch.bfloat16), toy.build_processor("qwen2_5_vl")
    store = CacheStore()
    wrapped = VLCacheProcessor(processor, model, store)
    messages = _turn(images[:2])
    reference = toy.chat_inputs(processor, messages)
    assert reference["pixel_values"].dtype == torch.float32
    greedy(model, reference, VLCache(model, store=store, policy="full"))
    repeat = _via_processor(wrapped, processor, messages, images[:2])
    assert wrapped.last_hits == [True, True]
    _assert_exact_repeat(model, store, repeat, reference, 2)


def test_an_image_the_plain_path_stored_is_preprocessed_once_by_the_wrapper(models, images):
    """After a plain request, the wrapper's first call preprocesses the image (to find its item key) and finds
    the encoder entry the plain request stored; it records the alias, so its next call skips preprocessing."""
    model, processor = models("qwen2_5_vl")
    store = CacheStore()
    wrapped = VLCacheProcessor(processor, model, store)
    messages = _turn(images[2:4])
    greedy(model, toy.chat_inputs(processor, messages), VLCache(model, store=store, policy="full"))
    image_processor = processor.image_processor
    with mock.patch.object(image_processor, "preprocess", wraps=image_processor.preprocess) as preprocess:
        _via_processor(wrapped, processor, messages, images[2:4])
        assert wrapped.last_hits == [True, True] and preprocess.call_count == 1
        _via_processor(wrapped, processor, messages, images[2:4])
        assert wrapped.last_hits == [True, True] and preprocess.call_count == 1


def test_an_alias_copied_under_another_images_key_is_refused(models, images):
    """An alias is bound to the store key it was written under: copied onto another image's alias key it is a
    miss (removed), never that other image served with the first one's features."""
    from vlcache_hf.fingerprint import fingerprint
    from vlcache_hf.processor import image_settings, seen_pixels
    from vlcache_hf.store.keys import ALIAS_KIND, entry_key, image_key_from_seen

    model, processor = models("qwen2_5_vl")
    store = CacheStore()
    wrapped = VLCacheProcessor(processor, model, store)
    image_processor = processor.image_processor
    settings = image_settings(image_processor, {}, wrapped.adapter.image_variant(1))

    def alias_key(image) -> str:
        return entry_key(ALIAS_KIND, fingerprint(model), image_key_from_seen(seen_pixels(image_processor, image, {}), settings))

    messages = _turn(images[:1])
    _via_processor(wrapped, processor, messages, images[:1])
    store.put(alias_key(images[1]), store.get(alias_key(images[0])))
    other = _turn(images[1:2])
    ours = _via_processor(wrapped, processor, other, images[1:2])
    assert wrapped.last_hits == [False]
    plain = greedy(model, toy.chat_inputs(processor, other))
    cached = greedy(model, ours, VLCache(model, store=store, policy="full"))
    assert torch.equal(plain.sequences, cached.sequences)
    assert (plain.scores[0] - cached.scores[0]).abs().max() < 1e-4
