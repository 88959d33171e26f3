"""What an image key contains: the pixels as the image processor sees them, the settings it runs with at call
time, and the generate-time options the vision encoder receives.

The reference is always the unmodified pipeline: the wrapped processor's own outputs and plain `generate`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import greedy
from PIL import Image

from vlcache_hf import CacheStore, VLCache
from vlcache_hf.processor import VLCacheProcessor
from vlcache_hf.tools import toy

FAMILY = "qwen2_5_vl"


def _text(processor, count: int = 1) -> str:
    pictures = [toy.make_image(0)] * count
    return processor.apply_chat_template([toy.message("user", "Look:", *pictures, "Which colour?")], add_generation_prompt=True)


def _palette_image(colors: list[tuple[int, int, int]], transparent: int | None = None) -> Image.Image:
    """A 'P'-mode picture: one fixed index map, its colours given by `colors` (index i → colors[i])."""
    indices = (np.add.outer(np.arange(112), np.arange(112)) // 28 % len(colors)).astype(np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette([c for color in colors for c in color])
    if transparent is not None:
        image.info["transparency"] = transparent
    return image


def _saved(image: Image.Image, path, **kwargs) -> str:
    image.save(path, **kwargs)
    return str(path)


def _exif_rotated_jpeg(tmp_path) -> str:
    """A JPEG whose EXIF orientation (6: rotate 90°) differs from its stored pixel order."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return _saved(toy.make_image(4, size=112).crop((0, 0, 112, 84)), tmp_path / "rotated.jpg", exif=exif, quality=95)


def _photo(width: int = 640, height: int = 480) -> Image.Image:
    """A photograph-like picture at a camera-like size: smooth colour gradients, a bright disc, sensor noise."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rng = np.random.default_rng(7)
    disc = ((x - 0.6 * width) ** 2 + (y - 0.4 * height) ** 2 < (0.15 * height) ** 2) * 90.0
    channels = [120 + 100 * np.sin(x / 97 + c) * np.cos(y / 61 - c) + disc for c in (0.0, 1.3, 2.6)]
    pixels = np.stack(channels, axis=-1) + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _pictures(tmp_path) -> list[tuple[str, object]]:
    """One request's image in many modes and forms; some are the same picture to the image processor."""
    rgb = toy.make_image(1)
    gray = rgb.convert("L")
    rgba = rgb.copy()
    rgba.putalpha(Image.fromarray(np.linspace(0, 255, 112 * 112).reshape(112, 112).astype(np.uint8)))
    opaque = rgb.copy()
    opaque.putalpha(255)
    red, blue = _palette_image([(255, 0, 0), (255, 255, 255)]), _palette_image([(0, 0, 255), (255, 255, 255)])
    wide16 = Image.fromarray(np.array(gray).astype(np.uint16) * 257)
    jpeg = _exif_rotated_jpeg(tmp_path)
    photo = _photo()
    return [
        ("RGB", rgb),
        ("RGB array", np.array(rgb)),
        ("RGB png path", _saved(rgb, tmp_path / "rgb.png")),
        ("RGBA opaque", opaque),
        ("RGBA", rgba),
        ("L", gray),
        ("LA", gray.convert("LA")),
        ("L as RGB", gray.convert("RGB")),
        ("P red", red),
        ("P blue (same indices)", blue),
        ("P red with transparency", _palette_image([(255, 0, 0), (255, 255, 255)], transparent=1)),
        ("L with the palette's index bytes", Image.fromarray(np.array(red), mode="L")),
        ("I;16", wide16),
        ("CMYK", rgb.convert("CMYK")),
        ("1", gray.convert("1")),
        ("JPEG path (EXIF applied)", jpeg),
        ("JPEG opened (EXIF not applied)", Image.open(jpeg)),
        ("photo 640x480", photo),
        ("photo, adaptive palette", photo.quantize(64)),
        ("photo, web palette", photo.convert("P", palette=Image.Palette.WEB)),
        ("photo JPEG path", _saved(photo, tmp_path / "photo.jpg", quality=90)),
    ]


def _reference(processor, text: str, image, **kwargs):
    return processor(text=[text], images=[image], return_tensors="pt", **kwargs)


def _assert_same_answer(model, store, ours, reference) -> None:
    """`ours` (the wrapper's output, through a VLCache with policy "full") answers as plain `generate` does."""
    assert torch.equal(ours["input_ids"], reference["input_ids"])
    plain = greedy(model, reference)
    cached = greedy(model, ours, VLCache(model, store=store, policy="full"))
    assert torch.equal(plain.sequences, cached.sequences)
    assert (plain.scores[0] - cached.scores[0]).abs().max() < 1e-4


def test_palette_images_are_keyed_by_their_colours(models, family):
    model, processor = models(family)
    store = CacheStore()
    wrapped = VLCacheProcessor(processor, model, store)
    text = _text(processor)
    red, blue = _palette_image([(255, 0, 0), (255, 255, 255)]), _palette_image([(0, 0, 255), (255, 255, 255)])
    wrapped(text=text, images=[red])
    ours = wrapped(text=text, images=[blue])
    assert wrapped.last_hits == [False], "another palette is another picture"
    _assert_same_answer(model, store, ours, _reference(processor, text, blue))


def test_one_key_per_picture_the_image_processor_sees(models, tmp_path):
    """Every mode and form answers as plain generate, and an image hits exactly when an earlier one gave the
    image processor the same picture (judged by the unmodified processor's own pixel_values)."""
    model, processor = models(FAMILY)
    store = CacheStore()
    wrapped = VLCacheProcessor(processor, model, store)
    text = _text(processor)
    seen: list[torch.Tensor] = []
    for name, image in _pictures(tmp_path):
        reference = _reference(processor, text, image)
        pixels = reference["pixel_values"]
        expected_hit = any(p.shape == pixels.shape and torch.equal(p, pixels) for p in seen)
        ours = wrapped(text=text, images=[image])
        assert wrapped.last_hits == [expected_hit], name
        _assert_same_answer(model, store, ours, reference)
        seen.append(pixels)
    assert sum(1 for p in seen if torch.equal(p, seen[0])) >= 4  # RGB, its array, its PNG, opaque RGBA share


def _call_forms(image) -> list[tuple[str, dict, dict]]:
    """(name, wrapper kwargs, wrapped-processor kwargs) for call forms the wrapped processor accepts."""
    return [
        ("single image, no list", {"images": image}, {"images": image, "return_tensors": "pt"}),
        ("return_tensors='pt'", {"images": [image], "return_tensors": "pt"}, {"images": [image], "return_tensors": "pt"}),
        ("nested list", {"images": [[image]]}, {"images": [[image]], "return_tensors": "pt"}),
        (
            "per-call size",
            {"images": [image], "size": {"shortest_edge": 56 * 56, "longest_edge": 56 * 56}},
            {"images": [image], "size": {"shortest_edge": 56 * 56, "longest_edge": 56 * 56}, "return_tensors": "pt"},
        ),
        (
            "per-call max_pixels",
            {"images": [image], "max_pixels": 84 * 84, "return_tensors": "pt"},
            {"images": [image], "max_pixels": 84 * 84, "return_tensors": "pt"},
        ),
    ]


@pytest.mark.filterwarnings("ignore:Passing `min_pixels` and `max_pixels`:FutureWarning")
@pytest.mark.parametrize("form", range(5))
def test_call_forms_behave_as_the_wrapped_processor(models, form):
    model, processor = models(FAMILY)
    store = CacheStore()
    wrapped = VLCacheProcessor(processor, model, store)
    text = _text(processor)
    name, ours_kwargs, reference_kwargs = _call_forms(toy.make_image(2))[form]
    reference = processor(text=[text], **reference_kwargs)
    for expected_hits in ([False], [True]):
        ours = wrapped(text=text, **ours_kwargs)
        assert wrapped.last_hits == expected_hits, name
        _assert_same_answer(model, store, ours, reference)
        assert ours["attention_mask"].tolist() == reference["attention_mask"].tolist()


def test_settings_changed_after_wrapping_are_read_at_call_time(models):
    model, _ = models(FAMILY)
    processor = toy.build_processor(FAMILY)  # this test changes its settings
    store = CacheStore()
    wrapped = VLCacheProcessor(processor, model, store)
    text = _text(processor)
    image = toy.make_image(3)
    wrapped(text=text, images=[image])
    processor.image_processor.size = {"shortest_edge": 56 * 56, "longest_edge": 56 * 56}
    ours = wrapped(text=text, images=[image])
    assert wrapped.last_hits == [False]
    _assert_same_answer(model, store, ours, _reference(processor, text, image))


def test_kwargs_the_wrapper_cannot_honour_fall_back_to_the_wrapped_processor(models):
    model, processor = models(FAMILY)
    wrapped = VLCacheProcessor(processor, model, CacheStore())
    text = _text(processor)
    image = toy.make_image(2)
    ours = wrapped(text=text, images=[image], return_tensors="np")
    reference = processor(text=[text], images=[image], return_tensors="np")
    assert set(ours) == set(reference)
    for name in reference:
        assert isinstance(ours[name], np.ndarray) and np.array_equal(ours[name], reference[name]), name
    assert wrapped.last_hits == [False]


def test_a_request_with_videos_is_served_by_the_wrapped_processor(models):
    model, processor = models(FAMILY)
    wrapped = VLCacheProcessor(processor, model, CacheStore())
    image, video = toy.make_image(2), toy.make_video(0)
    text = processor.apply_chat_template([toy.message("user", image, "and", video, "?")], add_generation_prompt=True)
    ours = wrapped(text=text, images=[image], videos=[video], return_tensors="pt")
    reference = processor(text=[text], images=[image], videos=[video], return_tensors="pt")
    assert set(ours) == set(reference)
    for name in reference:
        assert torch.equal(ours[name], reference[name]), name


def test_generate_time_encoder_options_are_part_of_the_key(models, images, encoder_counter):
    """LLaVA-NeXT's `vision_feature_layer` passed to generate changes the encoder output: it is another entry."""
    model, processor = models("llava_next")
    store = CacheStore()
    inputs = toy.chat_inputs(processor, [toy.message("user", "Look:", images[0], "Which?")])
    greedy(model, inputs, VLCache(model, store=store))  # stores the default layer's features
    plain = greedy(model, inputs, vision_feature_layer=-1)
    cache = VLCache(model, store=store, policy="full")
    ours = greedy(model, inputs, cache, vision_feature_layer=-1)
    assert cache.report.encoder_misses == 1
    assert torch.equal(plain.sequences, ours.sequences)
    assert (plain.scores[0] - ours.scores[0]).abs().max() < 1e-4

    counter = encoder_counter(model)
    again = VLCache(model, store=store, policy="full")
    repeat = greedy(model, inputs, again, vision_feature_layer=-1)
    assert again.report.encoder_hits == 1 and counter.calls == 0
    assert (plain.scores[0] - repeat.scores[0]).abs().max() < 1e-4
