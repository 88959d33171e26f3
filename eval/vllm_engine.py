"""Run requests of the synthetic task on one vLLM engine, with or without `VLCacheECConnector`; print JSON.

One engine per process (vLLM holds its engine for the process's life), so tests and `eval/bench_vllm.py` start
this script once per engine they need — which is also how a restart is simulated. It runs in the environment
that has vLLM (CI: `.venv-vllm`, see `.ci/run`).

    python eval/vllm_engine.py '{"requests": [{"split": "test", "index": 0, "uuid": true}], "store": ["disk:///tmp/s"]}'

Input keys: `model` (checkpoint directory; default the embedded Qwen2.5-VL), `dtype` (default float32),
`store` (store URLs; absent: plain vLLM, no connector), `events` (the connector's event log), `max_tokens`,
`requests`: items of `vlcache_hf.tools.synthetic` (`split`, `index`), each with `uuid` (send our key as
`multi_modal_uuids`) — and `repeat` (run the request list that many times; default 1).
Output (last line of stdout): `{"load_s": ..., "results": [{"text", "token_ids", "ttft_s", "seconds"}, ...]}`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

RESULT_MARK = "VLCACHE-RESULT "  # the line of stdout that holds the result (vLLM logs to stdout too)


def run_in_subprocess(spec: dict, python: str = sys.executable, timeout: float = 1800) -> dict:
    """Start one engine on `spec` in a fresh process of `python` and return its result (what tests and
    `eval/bench_vllm.py` call: one engine per process, so a second call is a restart)."""
    proc = subprocess.run([python, __file__, json.dumps(spec)], capture_output=True, text=True, timeout=timeout)
    marked = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if proc.returncode != 0 or not marked:
        raise RuntimeError(f"engine failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(marked[-1].removeprefix(RESULT_MARK))


def main(spec: dict) -> dict:
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from transformers import AutoProcessor
    from vllm import LLM, SamplingParams

    from vlcache_hf.integrations.vllm import ec_transfer_config, image_uuids
    from vlcache_hf.tools import synthetic
    from vlcache_hf.tools.pretrained import default_model_path

    model = str(spec.get("model") or default_model_path())
    dtype = spec.get("dtype", "float32")
    processor = AutoProcessor.from_pretrained(model)
    kwargs = {}
    if spec.get("store"):
        kwargs["ec_transfer_config"] = ec_transfer_config(*spec["store"], events=spec.get("events"))
    start = time.perf_counter()
    llm = LLM(
        model=model,
        dtype=dtype,
        max_model_len=spec.get("max_model_len", 2048),
        enforce_eager=True,
        limit_mm_per_prompt={"image": 4},
        kv_cache_memory_bytes=spec.get("kv_cache_bytes", 256 * 2**20),
        enable_prefix_caching=spec.get("prefix_caching", True),
        seed=0,
        **kwargs,
    )
    load_s = time.perf_counter() - start
    params = SamplingParams(max_tokens=spec.get("max_tokens", 8), temperature=0.0)
    results = []
    for _ in range(spec.get("repeat", 1)):
        for request in spec["requests"]:
            item = synthetic.make_split(request.get("split", "test"), request["index"] + 1)[request["index"]]
            images = synthetic.render_item(item)
            prompt = processor.apply_chat_template(synthetic.messages(item, images), add_generation_prompt=True, tokenize=False)
            data = {"prompt": prompt, "multi_modal_data": {"image": images}}
            if request.get("uuid"):
                data["multi_modal_uuids"] = {"image": image_uuids(processor, images, dtype)}
            began = time.perf_counter()
            out = llm.generate(data, params, use_tqdm=False)[0]
            seconds = time.perf_counter() - began
            metrics = getattr(out, "metrics", None)
            ttft = getattr(metrics, "first_token_latency", None) if metrics is not None else None
            completion = out.outputs[0]
            results.append(
                {"text": completion.text, "token_ids": list(completion.token_ids), "ttft_s": ttft, "seconds": seconds,
                 "uuids": data.get("multi_modal_uuids", {}).get("image")}
            )
    return {"load_s": load_s, "results": results}


if __name__ == "__main__":
    spec = json.loads(sys.argv[1]) if len(sys.argv) > 1 else json.load(sys.stdin)
    print(RESULT_MARK + json.dumps(main(spec)), flush=True)
