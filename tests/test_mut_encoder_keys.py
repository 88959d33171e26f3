"""Key-making code of `encoder.py` and `processor.py` that mutation testing (issue 17) found unchecked:
pre-encoded outputs keyed by their own bytes, `ImageFeatures` arithmetic, the routes' names, the processor's
delegation, and the settings text of a raw key. Expected keys are rebuilt by hand from blake3 and the
documented byte layout (as in test_mut_keys.py); settings from transformers' own `to_dict`."""

from __future__ import annotations

import json

import blake3
import numpy as np
import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from vlcache_hf import CacheStore, VLCache, compat
from vlcache_hf.encoder import ImageFeatures, features_from_output
from vlcache_hf.processor import VLCacheProcessor, image_settings


def by_hand(*parts: bytes | str) -> str:
    data = [p.encode() if isinstance(p, str) else p for p in parts]
    return blake3.blake3(b"".join(len(p).to_bytes(8, "little") + p for p in data)).hexdigest()


def test_pre_encoded_outputs_are_keyed_by_their_own_bytes():
    first = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    second = torch.tensor([[0.5, -1.0]], dtype=torch.float64)
    layer0, layer1 = torch.arange(8.0).view(4, 2), torch.arange(8.0, 16.0).view(4, 2)
    output = BaseModelOutputWithPooling(pooler_output=(first, second))
    features = features_from_output(output)
    assert features.keys == [
        by_hand("encoder-output", "torch.float32|(3, 2)", first.numpy().tobytes()),
        by_hand("encoder-output", "torch.float64|(1, 2)", second.numpy().tobytes()),
    ]
    assert features.embeddings[0] is first and features.embeddings[1] is second
    assert features.hits == [False, False] and features.seconds == 0.0 and features.deepstack is None
    assert features.tokens_per_image == [3, 1]
    output["deepstack_features"] = [(layer0[:3], layer0[3:]), (layer1[:3], layer1[3:])]  # per layer, per item
    deep = features_from_output(output)
    assert len(deep.deepstack) == 2 and all(len(item) == 2 for item in deep.deepstack)
    assert torch.equal(deep.deepstack[0][0], layer0[:3]) and torch.equal(deep.deepstack[0][1], layer1[:3])
    assert torch.equal(deep.deepstack[1][0], layer0[3:]) and torch.equal(deep.deepstack[1][1], layer1[3:])
    plain = features_from_output({"pooler_output": [first]})  # a plain mapping has no deepstack
    assert plain.deepstack is None and plain.keys == features.keys[:1]


def test_image_features_add_items_in_order():
    a = ImageFeatures([torch.zeros(2, 1)], ["a"], [True], 1.5)
    b = ImageFeatures([torch.zeros(3, 1), torch.zeros(1, 1)], ["b", "c"], [False, True], 0.25,
                      deepstack=[(torch.ones(3, 1),), (torch.ones(1, 1),)])
    both = a + b
    assert both.keys == ["a", "b", "c"] and both.hits == [True, False, True] and both.seconds == 1.75
    assert both.tokens_per_image == [2, 3, 1]
    assert both.deepstack[0] == () and both.deepstack[1] is b.deepstack[0] and both.deepstack[2] is b.deepstack[1]
    assert (a + a).deepstack is None
    mirrored = b + a
    assert mirrored.deepstack[2] == () and mirrored.keys == ["b", "c", "a"]


def test_routes_and_the_processor_name_what_they_wrap(models):
    model, processor = models("qwen2_5_vl")
    VLCache(model, store=CacheStore())  # installs the routes on this model instance
    route = model.model.__dict__["get_image_features"]
    assert repr(route) == f"EncoderRoute({type(model.model).__name__}.get_image_features)"
    scope = model.__dict__[compat.GENERATE_ENCODING_STEP]
    assert repr(scope) == f"RequestScope({type(model).__name__})"
    wrapped = VLCacheProcessor(processor, model, CacheStore())
    assert wrapped.tokenizer is processor.tokenizer and wrapped.image_token == processor.image_token
    assert wrapped.decode([65, 66]) == processor.decode([65, 66])
    with pytest.raises(AttributeError):
        wrapped.no_such_attribute  # noqa: B018


def test_image_settings_text_by_hand(models):
    _, processor = models("qwen2_5_vl")
    image_processor = processor.image_processor
    call = {"max_pixels": 999_999, "do_resize": None, "return_tensors": "pt", "image_mean": [0.5, 0.5, 0.5]}
    expected_settings = image_processor.to_dict()
    expected_settings["max_pixels"] = 999_999
    expected_settings["image_mean"] = [0.5, 0.5, 0.5]
    expected_settings.pop("return_tensors", None)
    text = image_settings(image_processor, call, "tiled")
    assert text == json.dumps({"settings": expected_settings, "variant": "tiled"}, sort_keys=True, default=str)
    parsed = json.loads(text)
    assert "return_tensors" not in parsed["settings"] and parsed["settings"]["do_resize"] == image_processor.do_resize
    assert image_settings(image_processor, {}, "") == json.dumps(
        {"settings": {k: v for k, v in image_processor.to_dict().items() if k != "return_tensors"}, "variant": ""},
        sort_keys=True, default=str,
    )
    assert np.isclose(parsed["settings"]["image_mean"], 0.5).all()


def test_an_image_processor_without_its_own_conversion_is_not_keyable(models):
    from transformers.image_processing_utils import BaseImageProcessor

    from vlcache_hf.processor import _exposes_conversion

    class Plain(BaseImageProcessor):  # inherits the base class's `process_image`: nothing to run on its own
        pass

    _, processor = models("qwen2_5_vl")
    assert _exposes_conversion(Plain()) is False and _exposes_conversion(processor.image_processor) is True


def test_seen_pixels_honour_the_calls_channel_format(models):
    """A 3×5 picture with 3 channels is ambiguous: the call's `input_data_format` (or the processor's own
    attribute) decides, as it does in the image processor's own `process_image`."""
    from vlcache_hf.processor import seen_pixels

    _, processor = models("qwen2_5_vl")
    image_processor = processor.image_processor
    picture = np.random.default_rng(0).integers(0, 255, (3, 5, 3), dtype=np.uint8)  # height 3, width 5, RGB
    expected = image_processor.process_image(picture, do_convert_rgb=True, input_data_format="channels_last")
    got = seen_pixels(image_processor, picture, {"input_data_format": "channels_last"})
    assert tuple(got.shape) == (3, 3, 5) and np.array_equal(np.asarray(got), np.asarray(expected))
    assert tuple(seen_pixels(image_processor, picture, {}).shape) != (3, 3, 5)  # inferred otherwise: the option matters
    image_processor.input_data_format = "channels_last"  # a processor configured so: its attribute is read
    try:
        assert np.array_equal(np.asarray(seen_pixels(image_processor, picture, {})), np.asarray(expected))
    finally:
        image_processor.input_data_format = None


def test_text_only_calls_and_plain_generate_with_the_wrappers_outputs(models, images):
    """A call without images is the wrapped processor's; the wrapper's outputs for Qwen3-VL carry the deepstack
    features, so plain `generate` (no VLCache) answers from them as from the processor's own outputs."""
    from helpers import greedy

    from vlcache_hf.tools import toy

    model, processor = models("qwen3_vl")
    wrapped = VLCacheProcessor(processor, model, CacheStore())
    text = processor.apply_chat_template([toy.message("user", "Hello there?")], add_generation_prompt=True)
    ours = wrapped(text=text, return_tensors="pt")
    theirs = processor(text=[text], return_tensors="pt")
    assert torch.equal(ours["input_ids"], theirs["input_ids"]) and wrapped.last_hits == []
    messages = [toy.message("user", "Look:", images[0], "Which colour?")]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    served = wrapped(text=text, images=[images[0]])
    assert isinstance(wrapped.last_seconds, float) and wrapped.last_seconds > 0
    assert "deepstack_features" in served["mm_encoder_outputs"]["image"]
    plain = greedy(model, toy.chat_inputs(processor, messages))
    ours = greedy(model, served)
    assert torch.equal(plain.sequences, ours.sequences)
    assert (plain.scores[0] - ours.scores[0]).abs().max() < 1e-4


def test_a_stored_image_keeps_its_deepstack_features_and_others_have_none(models, images, encoder_counter):
    """Qwen3-VL: an image served from the store brings its deepstack features back (a moved image recomputed
    with policy "full" then answers as plain `generate`, without the encoder); other families have none."""
    from helpers import greedy

    from vlcache_hf.tools import toy

    model, processor = models("qwen3_vl")
    store = CacheStore()
    greedy(model, toy.chat_inputs(processor, [toy.message("user", images[4], "?")]), VLCache(model, store=store))
    moved = toy.chat_inputs(processor, [toy.message("user", "Now look again:", images[4], "Which colour?")])
    counter = encoder_counter(model)
    cache = VLCache(model, store=store, policy="full")
    ours = greedy(model, moved, cache)
    assert counter.calls == 0 and cache.report.encoder_hits == 1
    plain = greedy(model, moved)
    assert torch.equal(plain.sequences, ours.sequences)
    assert (plain.scores[0] - ours.scores[0]).abs().max() < 1e-4

    qwen, qwen_processor = models("qwen2_5_vl")
    served = VLCacheProcessor(qwen_processor, qwen, CacheStore())
    text = qwen_processor.apply_chat_template([toy.message("user", images[4], "?")], add_generation_prompt=True)
    output = served(text=text, images=[images[4]])["mm_encoder_outputs"]["image"]
    assert output.vlcache_features.deepstack is None and "deepstack_features" not in output


def test_the_route_answers_like_the_original_method_inside_a_request(models, images):
    """Inside a request the route returns what the model's own method returns: the same features, a tuple when
    asked for one (`return_dict=False`), and Qwen3-VL's deepstack features as the model computes them."""
    from vlcache_hf.encoder import _request
    from vlcache_hf.tools import toy

    model, processor = models("qwen3_vl")
    cache = VLCache(model, store=CacheStore())
    inputs = toy.chat_inputs(processor, [toy.message("user", images[5], "?")])
    own = type(model.model).get_image_features
    reference = own(model.model, inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
    token = _request.set(cache)
    try:
        routed = model.model.get_image_features(inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
        as_tuple = model.model.get_image_features(inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"], return_dict=False)
    finally:
        _request.reset(token)
    assert isinstance(as_tuple, tuple) and torch.allclose(as_tuple[0][0], reference.pooler_output[0], atol=1e-5)
    assert torch.allclose(routed.pooler_output[0], reference.pooler_output[0], atol=1e-5)
    qwen, qwen_processor = models("qwen2_5_vl")  # a family without deepstack: the route's features carry none
    qwen_cache = VLCache(qwen, store=CacheStore())
    qwen_inputs = toy.chat_inputs(qwen_processor, [toy.message("user", images[5], "?")])
    token = _request.set(qwen_cache)
    try:
        plain_routed = qwen.model.get_image_features(qwen_inputs["pixel_values"], image_grid_thw=qwen_inputs["image_grid_thw"])
    finally:
        _request.reset(token)
    assert plain_routed.vlcache_features.deepstack is None and "deepstack_features" not in plain_routed
    expected = reference["deepstack_features"]
    assert len(routed["deepstack_features"]) == len(expected)
    for ours, theirs in zip(routed["deepstack_features"], expected, strict=True):  # per layer, per item
        assert len(ours) == len(theirs) and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(ours, theirs, strict=True))


def test_install_keeps_instance_methods_it_replaces_and_warns_without_the_encoding_step(images, caplog, monkeypatch):
    """A method set on the instance before the cache (a user's wrapper) is what the route and the request scope
    call outside a request; a transformers without generate's encoding step gets a warning naming it."""
    import logging

    from vlcache_hf import encoder
    from vlcache_hf.models import get_adapter
    from vlcache_hf.tools import toy

    model = toy.build_model("qwen2_5_vl")
    calls = []
    own_features = model.model.get_image_features
    own_step = getattr(model, compat.GENERATE_ENCODING_STEP)

    def features(*args, **kwargs):
        calls.append("features")
        return own_features(*args, **kwargs)

    def step(*args, **kwargs):
        calls.append("step")
        return own_step(*args, **kwargs)

    model.model.get_image_features = features
    setattr(model, compat.GENERATE_ENCODING_STEP, step)
    VLCache(model, store=CacheStore())
    VLCache(model, store=CacheStore())  # installing twice changes nothing
    assert type(model.model.__dict__["get_image_features"]).__name__ == "EncoderRoute"
    assert model.model.get_image_features.original() is features
    assert getattr(model, compat.GENERATE_ENCODING_STEP).original() is step
    inputs = toy.chat_inputs(toy.build_processor("qwen2_5_vl"), [toy.message("user", images[0], "?")])
    model.model.get_image_features(inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
    assert calls == ["features"]

    monkeypatch.setattr(encoder, "GENERATE_ENCODING_STEP", "no_such_step")
    with caplog.at_level(logging.WARNING, logger="vlcache_hf"):
        encoder.install(get_adapter(toy.build_model("qwen2_5_vl")))
    assert [r.getMessage() for r in caplog.records] == [
        "this transformers version has no no_such_step: generate's image encoding bypasses the encoder cache"
    ]


def test_an_encoder_entry_copied_under_another_images_key_is_refused(models, images, encoder_counter):
    """An encoder entry is bound to the store key it was written under: copied onto another image's key it is
    a miss, never that other image answered with the first one's features."""
    from helpers import greedy

    from vlcache_hf.tools import toy

    model, processor = models("qwen2_5_vl")
    store = CacheStore()
    first = toy.chat_inputs(processor, [toy.message("user", images[0], "?")])
    greedy(model, first, VLCache(model, store=store, policy="full"))
    other = toy.chat_inputs(processor, [toy.message("user", images[1], "?")])
    cache = VLCache(model, store=CacheStore())
    greedy(model, other, cache)  # learn the other image's encoder key in a store of its own
    (mine,) = [k for k in store.tiers[0].keys() if k.startswith("enc-")]
    (theirs,) = [k for k in cache.store.tiers[0].keys() if k.startswith("enc-")]
    store.put(theirs, store.get(mine))
    counter = encoder_counter(model)
    ours = VLCache(model, store=store, policy="full")
    answer = greedy(model, other, ours)
    assert counter.calls == 1 and ours.report.encoder_hits == 0
    assert torch.equal(answer.sequences, greedy(model, other).sequences)
    fresh = VLCacheProcessor(processor, model, CacheStore())
    assert fresh.last_seconds == 0.0 and fresh.last_hits == []
