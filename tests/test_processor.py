"""VLCacheProcessor: stored images skip preprocessing and encoding, and answers stay those of plain generate."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from helpers import greedy

from vlcache_hf import CacheStore, VLCache, VLCacheError
from vlcache_hf.processor import VLCacheProcessor, seen_pixels
from vlcache_hf.store.keys import image_key_from_seen
from vlcache_hf.tools import toy


def test_hits_skip_preprocessing_and_encoder(models, family, images, encoder_counter):
    model, processor = models(family)
    store = CacheStore()
    wrapped = VLCacheProcessor(processor, model, store)
    messages = [toy.message("user", "Look:", images[0], images[1], "Which?")]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    plain = greedy(model, toy.chat_inputs(processor, messages))

    image_processor = processor.image_processor
    with mock.patch.object(image_processor, "preprocess", wraps=image_processor.preprocess) as preprocess:
        first = wrapped(text=text, images=images[:2])
        assert wrapped.last_hits == [False, False] and preprocess.call_count == 1
        ours = greedy(model, first, VLCache(model, store=store))
        assert torch.equal(ours.sequences[:, -6:], plain.sequences[:, -6:])

        counter = encoder_counter(model)
        second = wrapped(text=text, images=images[:2])
        assert wrapped.last_hits == [True, True]
        assert preprocess.call_count == 1, "a stored image must not be preprocessed again"
        cache = VLCache(model, store=store)
        again = greedy(model, second, cache)
        assert counter.calls == 0
        assert torch.equal(again.sequences[:, -6:], plain.sequences[:, -6:])
        assert (again.scores[0] - plain.scores[0]).abs().max() < 1e-4
        assert cache.report.encoder_hits == 2
    assert torch.equal(second["input_ids"], toy.chat_inputs(processor, messages)["input_ids"])


def test_partial_hit_encodes_only_the_new_image(models, images, encoder_counter):
    model, processor = models("qwen2_5_vl")
    store = CacheStore()
    wrapped = VLCacheProcessor(processor, model, store)
    text = processor.apply_chat_template([toy.message("user", images[0], "?")], add_generation_prompt=True)
    wrapped(text=text, images=[images[0]])
    messages = [toy.message("user", images[3], "and", images[0], "?")]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    counter = encoder_counter(model)
    inputs = wrapped(text=text, images=[images[3], images[0]])
    assert wrapped.last_hits == [False, True] and counter.calls == 1
    plain = greedy(model, toy.chat_inputs(processor, messages))
    ours = greedy(model, inputs, VLCache(model, store=store, policy="full"))
    assert torch.equal(plain.sequences[:, -6:], ours.sequences[:, -6:])


def test_key_depends_on_content_and_settings(models, images, tmp_path):
    image_processor = models("qwen2_5_vl")[1].image_processor

    def key(image, settings):
        return image_key_from_seen(seen_pixels(image_processor, image, {}), settings)

    assert key(images[0], "a") == key(images[0].copy(), "a")
    assert key(images[0], "a") != key(images[1], "a")
    assert key(images[0], "a") != key(images[0], "b")
    path = tmp_path / "x.png"
    images[0].save(path)
    assert key(str(path), "a") == key(images[0], "a")


def test_bad_inputs(models, images):
    model, processor = models("qwen2_5_vl")
    wrapped = VLCacheProcessor(processor, model, CacheStore())
    with pytest.raises(VLCacheError, match="placeholders but 2 images"):
        wrapped(text="<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>?", images=images[:2])
    with pytest.raises(VLCacheError, match="cannot key an image of type int"):
        wrapped(text="<|vision_start|><|image_pad|><|vision_end|>", images=[7])
    with pytest.raises(VLCacheError, match="one request"):
        wrapped(text=["a", "b"], images=images[:2])
