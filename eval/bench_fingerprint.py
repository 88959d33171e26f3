"""What the full-weight model fingerprint costs on a 7B-shaped model (Qwen2.5-VL-7B), on this machine.

1. Hash throughput: `fingerprint.weights_digest` (blake3 on all cores over every byte) of real bf16 tensors
   with the shapes of whole Qwen2.5-VL-7B decoder layers, extrapolated to the model's full size.
2. Per-request re-validation: `fingerprint(model)` once the digest is memoized walks the state dict
   (identity, storage, version of every tensor) and re-reads the config; measured on the real
   Qwen2.5-VL-7B module tree (built on the meta device: same tensors, no memory).

    python eval/bench_fingerprint.py [--layers 2] [--repeats 5]

Prints the figures and writes eval/results/fingerprint_cost.md.
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import blake3
import torch
import transformers
from torch import nn
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from vlcache_hf.fingerprint import _config_json, weights_digest, weights_signature
from vlcache_hf.store.entry import FORMAT_VERSION
from vlcache_hf.store.keys import model_fingerprint
from vlcache_hf.timing import median_seconds

RESULTS = Path(__file__).parent / "results" / "fingerprint_cost.md"


def qwen25_vl_7b_config() -> Qwen2_5_VLConfig:
    """Qwen/Qwen2.5-VL-7B-Instruct's dimensions (config.json of the hub model)."""
    return Qwen2_5_VLConfig(
        text_config=dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            vocab_size=152064,
            rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6},
        ),
        vision_config=dict(
            depth=32,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            out_hidden_size=3584,
            fullatt_block_indexes=[7, 15, 23, 31],
            window_size=112,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        vocab_size=152064,
        tie_word_embeddings=False,
    )


class _Layers(nn.Module):
    """Real bf16 tensors shaped like `count` decoder layers of the 7B model (random values)."""

    def __init__(self, shapes: dict[str, torch.Size], count: int):
        super().__init__()
        for layer in range(count):
            for name, shape in shapes.items():
                self.register_buffer(f"l{layer}_{name.replace('.', '_')}", torch.randn(shape, dtype=torch.bfloat16))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of real tensors to hash")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    config = qwen25_vl_7b_config()
    with torch.device("meta"):
        meta_model = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16)
    state = meta_model.state_dict()
    total_bytes = sum(t.numel() * t.element_size() for t in state.values())
    prefix = "model.language_model.layers.0."
    layer_shapes = {name[len(prefix) :]: t.shape for name, t in state.items() if name.startswith(prefix)}

    sample = _Layers(layer_shapes, args.layers)
    sample_bytes = sum(t.numel() * t.element_size() for t in sample.state_dict().values())
    weights_digest(sample)  # warm-up (page faults, thread pool)
    hash_s = median_seconds(lambda: weights_digest(sample), args.repeats)
    throughput = sample_bytes / hash_s / 1e9
    buffers = [memoryview(t.reshape(-1).view(torch.uint8).numpy()) for t in sample.state_dict().values()]

    def one_thread() -> None:
        hasher = blake3.blake3(max_threads=1)
        for buffer in buffers:
            hasher.update(buffer)

    one_thread_throughput = sample_bytes / median_seconds(one_thread, args.repeats) / 1e9

    def revalidate() -> str:  # what fingerprint(model) does when the memo is current (no weight read)
        weights_signature(meta_model)
        return model_fingerprint(_config_json(meta_model), "0" * 64, str(torch.bfloat16), FORMAT_VERSION)

    revalidate()
    revalidate_s = median_seconds(revalidate, max(args.repeats, 20))
    signature_s = median_seconds(lambda: weights_signature(meta_model), max(args.repeats, 20))

    rows = [
        ("model", "Qwen2.5-VL-7B shape, bf16"),
        ("tensors in the state dict", f"{len(state)}"),
        ("weights", f"{total_bytes / 1e9:.2f} GB"),
        ("hashed sample", f"{args.layers} decoder layers, {sample_bytes / 1e9:.2f} GB, median of {args.repeats}"),
        ("hash throughput (blake3, all cores, as `fingerprint` runs it)", f"{throughput:.2f} GB/s"),
        ("hash throughput (blake3, one thread)", f"{one_thread_throughput:.2f} GB/s"),
        ("first fingerprint, this model (extrapolated)", f"{total_bytes / 1e9 / throughput:.1f} s"),
        ("first fingerprint, 15 GB of bf16 weights (extrapolated)", f"{15 / throughput:.1f} s"),
        ("per-request re-validation (state-dict walk + config + digest)", f"{revalidate_s * 1e3:.2f} ms"),
        ("of which the state-dict walk", f"{signature_s * 1e3:.2f} ms"),
    ]
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, load average {os.getloadavg()[0]:.1f}"
    )
    lines = [
        "# Cost of the full-weight model fingerprint",
        "",
        f"`python eval/bench_fingerprint.py --layers {args.layers} --repeats {args.repeats}` on {machine}.",
        "Weights on a GPU are copied to the CPU one tensor at a time before hashing (not measured: no GPU here).",
        "On a shared machine the load average above bounds what the all-core figure can show.",
        "The digest is computed once per model object and re-validated per `VLCache` without reading weights.",
        "",
        "| quantity | value |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in rows),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
