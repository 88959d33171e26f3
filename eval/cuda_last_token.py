"""Does computing the last prompt token in a second forward change the logits? (the suspected cause of VLCache's
non-bitwise bf16 logits on CUDA, `eval/results/gpu_nvidia_h100_80gb_hbm3.md`)

    python eval/cuda_last_token.py [--device cuda]

For each family's toy model, float32 and bfloat16, a text-only prompt: the largest difference between the last
token's logits from one forward over the whole prompt and from a forward over all but the last token followed by
a forward over the last one with the cache it filled (as Hugging Face's own prefix caching, and VLCache's exact
repeat, compute it). No VLCache code runs: a non-zero difference is the engine's, not the cache's.
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import DynamicCache

from vlcache_hf.tools import toy


def last_token_difference(family: str, dtype: torch.dtype, device: str) -> float:
    with torch.device(device):
        model = toy.build_model(family, dtype=dtype)
    processor = toy.build_processor(family)
    prompt = toy.chat_inputs(processor, [toy.message("user", "Tell a long story about red squares and blue circles. " * 12)])
    ids = prompt["input_ids"].to(device)
    with torch.no_grad():
        whole = model(input_ids=ids).logits[0, -1].float()
        cache = DynamicCache(config=model.config)
        model(input_ids=ids[:, :-1], past_key_values=cache, use_cache=True)
        split = model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True).logits[0, -1].float()
    return float((whole - split).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    rows = {f"{family} {str(dtype).removeprefix('torch.')}": last_token_difference(family, dtype, args.device)
            for family in toy.FAMILIES for dtype in (torch.float32, torch.bfloat16)}
    print(json.dumps({"device": torch.cuda.get_device_name(0) if args.device == "cuda" else args.device, "max_logit_difference": rows}, indent=1))


if __name__ == "__main__":
    main()
