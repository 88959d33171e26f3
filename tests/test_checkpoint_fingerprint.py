"""Checkpoint fingerprints (one name for a checkpoint in every engine) and the vLLM item mapping, without vLLM.

`checkpoint_fingerprint` is computed from files only (what vLLM's connector does); `bind_checkpoint` gives a
transformers model that name only after checking every weight against those files. Expected values come from
the files and from plain `generate`, never from the code under test.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlcache_hf import CacheStore, UnsupportedModelError, VLCache, VLCacheError
from vlcache_hf.compat import with_cache
from vlcache_hf.fingerprint import bind_checkpoint, checkpoint_fingerprint, fingerprint
from vlcache_hf.models.serving import serving_format
from vlcache_hf.store.entry import EncoderEntry
from vlcache_hf.store.keys import ENCODER_KIND, entry_key
from vlcache_hf.tools import synthetic, toy
from vlcache_hf.tools.pretrained import default_model_path, load_default


@pytest.fixture()
def checkpoint(tmp_path):
    """A private copy of the embedded checkpoint (tests edit it)."""
    target = tmp_path / "ckpt"
    shutil.copytree(default_model_path(), target)
    return target


def test_bound_model_carries_the_checkpoint_fingerprint_until_a_weight_changes(checkpoint):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(checkpoint).eval()
    own = fingerprint(model)
    shared = bind_checkpoint(model)
    assert shared == checkpoint_fingerprint(checkpoint, torch.float32) != own
    assert fingerprint(model) == shared
    with torch.no_grad():
        model.lm_head.weight[3, 5] += 1e-3
    assert fingerprint(model) not in (shared, own), "an edited model kept a checkpoint's (or its old) fingerprint"
    with pytest.raises(VLCacheError, match="lm_head.weight"):
        bind_checkpoint(model)


def test_checkpoint_fingerprint_covers_every_tensor_the_config_and_the_dtype(checkpoint):
    base = checkpoint_fingerprint(checkpoint, torch.float32)
    assert checkpoint_fingerprint(checkpoint, "float32") == base
    assert checkpoint_fingerprint(checkpoint, torch.bfloat16) != base
    weights = checkpoint / "model.safetensors"
    tensors = load_file(str(weights))
    name = sorted(tensors)[len(tensors) // 2]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1
    save_file(tensors, str(weights))
    edited = checkpoint_fingerprint(checkpoint, torch.float32)
    assert edited != base
    config = json.loads((checkpoint / "config.json").read_text())
    config["_name_or_path"] = "/somewhere/else"  # names no content: ignored
    (checkpoint / "config.json").write_text(json.dumps(config))
    assert checkpoint_fingerprint(checkpoint, torch.float32) == edited
    config["text_config"]["rms_norm_eps"] = 1e-3
    (checkpoint / "config.json").write_text(json.dumps(config))
    assert checkpoint_fingerprint(checkpoint, torch.float32) != edited


def test_bind_refuses_a_model_that_differs_from_the_checkpoint(checkpoint):
    model, _ = load_default()
    weights = checkpoint / "model.safetensors"
    tensors = load_file(str(weights))
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"] * 2
    save_file(tensors, str(weights))
    with pytest.raises(VLCacheError, match="embed_tokens"):
        bind_checkpoint(model, checkpoint)
    with pytest.raises(VLCacheError, match="neither a directory"):
        bind_checkpoint(model, checkpoint / "missing")


def test_bind_works_for_a_checkpoint_saved_by_this_transformers(tmp_path):
    """save_pretrained writes the names of the checkpoint format (reverting load-time renames)."""
    model = toy.build_model("qwen2_5_vl")
    model.save_pretrained(tmp_path / "saved")
    assert bind_checkpoint(model, tmp_path / "saved") == checkpoint_fingerprint(tmp_path / "saved", model.dtype)


def test_image_uuids_are_the_keys_generate_writes_under():
    from vlcache_hf.integrations.vllm import image_uuids

    model, processor = load_default()
    shared = bind_checkpoint(model)
    item = synthetic.make_split("test", 1)[0]
    images = synthetic.render_item(item)
    store = CacheStore()
    cache = VLCache(model, store=store)
    model.generate(**toy.chat_inputs(processor, synthetic.messages(item, images)), **with_cache(model, cache), max_new_tokens=2)
    uuids = image_uuids(processor, images, torch.float32)
    assert len(uuids) == len(images)
    for uuid in uuids:
        assert store.contains(entry_key(ENCODER_KIND, shared, uuid))
    assert image_uuids(processor, images, torch.bfloat16) != uuids  # the pixels as a bf16 tower reads them


def test_llava_image_uuids_are_the_keys_generate_writes_under():
    """LLaVA-1.5: one fixed-size view per image, keyed with its (height, width) and no encoder options (generate
    is called without any: vLLM applies the config's, as generate does then)."""
    from vlcache_hf.integrations.vllm import image_uuids

    model, processor = toy.build_model("llava"), toy.build_processor("llava")
    images = [toy.make_image(7), toy.make_image(8)]
    store = CacheStore()
    cache = VLCache(model, store=store)
    model.generate(**toy.chat_inputs(processor, [toy.message("user", *images, "?")]), **with_cache(model, cache), max_new_tokens=1)
    uuids = image_uuids(processor, images, torch.float32)
    assert len(set(uuids)) == 2
    written = {key for tier in store.tiers for key in tier.keys() if key.startswith(ENCODER_KIND)}
    assert written == {entry_key(ENCODER_KIND, fingerprint(model), uuid) for uuid in uuids}
    assert image_uuids(processor, images[::-1], torch.float32) == uuids[::-1]  # per image, not per batch
    fmt = serving_format(model.config)
    assert fmt.deepstack_layers == 0
    assert fmt.layout("image", {"pixel_values": torch.zeros(3, 56, 42)}) == (56, 42)  # vLLM's item: [C, H, W]


def test_llava_next_uuids_are_generates_keys_whatever_the_batch(encoder_counter):
    """LLaVA-NeXT tiles an image into crops whose number depends on its size, and its processor pads a batch's
    crops to the largest count. A picture's key is its real crops (as the model trims them before its tower), so
    it is the same alone or beside a larger picture: the uuid a client computes for it alone is the key generate
    writes, and the picture is an encoder hit in another batch. vLLM's item (crops padded to its prompt's largest
    count) gives the layout generate stores."""
    from vlcache_hf.integrations.vllm import image_uuids

    model, processor = toy.build_model("llava_next"), toy.build_processor("llava_next")
    wide, tall, square = toy.make_image(7).resize((60, 20)), toy.make_image(8).resize((20, 50)), toy.make_image(9)
    counts = [processor.image_processor(images=[im], return_tensors="pt")["pixel_values"].shape[1] for im in (wide, tall, square)]
    assert counts[0] < counts[2]  # the square picture has more crops: it pads the others in a batch
    store = CacheStore()
    batch = toy.chat_inputs(processor, [toy.message("user", wide, tall, square, "?")])
    assert batch["pixel_values"].shape[1] == counts[2]
    cache = VLCache(model, store=store)
    model.generate(**batch, **with_cache(model, cache), max_new_tokens=1)
    uuids = image_uuids(processor, [wide, tall, square], torch.float32)
    written = {key for tier in store.tiers for key in tier.keys() if key.startswith(ENCODER_KIND)}
    assert written == {entry_key(ENCODER_KIND, fingerprint(model), uuid) for uuid in uuids} and len(set(uuids)) == 3

    counter = encoder_counter(model)
    alone = toy.chat_inputs(processor, [toy.message("user", wide, "?")])
    assert alone["pixel_values"].shape[1] == counts[0]  # no padding alone
    plain = model.generate(**alone, max_new_tokens=3, do_sample=False)
    counter.calls = 0
    cache = VLCache(model, store=CacheStore([store.tiers[0]]), policy="full")
    reused = model.generate(**alone, **with_cache(model, cache), max_new_tokens=3, do_sample=False)
    assert torch.equal(plain, reused) and cache.report.encoder_hits == 1 and counter.calls == 0

    fmt = serving_format(model.config)
    item = {"pixel_values": batch["pixel_values"][0], "image_sizes": batch["image_sizes"][0]}  # vLLM's item
    stored = EncoderEntry.from_stored(store.get(entry_key(ENCODER_KIND, fingerprint(model), uuids[0])), fingerprint(model),
                                      model.config.text_config.hidden_size, torch.float32)
    assert fmt.layout("image", item) == tuple(stored.grid_thw) == (20, 60, counts[0], 3, 56, 56)


def test_llava_onevision_is_refused_for_vllm():
    from vlcache_hf.integrations.vllm import image_uuids

    with pytest.raises(UnsupportedModelError):
        serving_format(toy.build_model("llava_onevision").config)
    with pytest.raises(UnsupportedModelError, match="tiles images"):
        image_uuids(toy.build_processor("llava_onevision"), [toy.make_image(1)], torch.float32)


def test_serving_format_splits_vllm_deepstack_concatenation():
    """vLLM's Qwen3-VL encoder output is [main | deepstack_0 | deepstack_1 | ...] on the last dim."""
    config = toy.build_model("qwen3_vl").config
    layers = len(config.vision_config.deepstack_visual_indexes)
    fmt = serving_format(config)
    assert fmt.deepstack_layers == layers > 0
    hidden = config.text_config.hidden_size
    main = torch.randn(5, hidden)
    extra = [torch.full((5, hidden), float(i)) for i in range(layers)]
    joined = torch.cat([main, *extra], dim=1)  # as vLLM's Qwen3_VisionTransformer.forward builds it
    embeddings, deepstack = fmt.split(joined)
    assert torch.equal(embeddings, main) and all(torch.equal(a, b) for a, b in zip(deepstack, extra, strict=True))
    assert torch.equal(fmt.join(embeddings, deepstack), joined)
    with pytest.raises(VLCacheError):
        fmt.split(main)
    assert serving_format(load_default()[0].config).deepstack_layers == 0
    assert fmt.layout("image", {"image_grid_thw": torch.tensor([1, 4, 6])}) == (1, 4, 6)
    assert fmt.layout("image", None) is None
