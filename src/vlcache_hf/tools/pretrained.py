"""The embedded trained model: a tiny Qwen2.5-VL that answers synthetic multi-image questions.

It was trained on CPU by `eval/synthetic/train.py` on the task of `vlcache_hf.tools.synthetic` and ships
with the package (safetensors + processor files, in `vlcache_hf/assets/`), so the demo, the examples and the
accuracy tests have a model that really reads images — without any download.
"""

from __future__ import annotations

from pathlib import Path

from .toy import ToySize

DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "assets" / "tiny-qwen2.5-vl-vqa"
MODEL_SIZE = ToySize(
    hidden_size=192,
    intermediate_size=512,
    num_layers=4,
    num_heads=6,
    num_kv_heads=2,
    vision_depth=2,
    vision_hidden=96,
    vision_heads=4,
    mrope_section=(4, 6, 6),
)


#: the deeper embedded model (issue 19): the paper's regime — 8 decoder layers with GQA, 64 merged tokens per
#: image (224 px), 2–4 images per item, the two-hop question; trained by `eval/synthetic/train_deep.py`
DEEP_MODEL_DIR = Path(__file__).resolve().parents[1] / "assets" / "tiny-qwen2.5-vl-deep"
DEEP_TRAIN_COMMAND = "python eval/synthetic/train_deep.py"
DEEP_MODEL_SIZE = ToySize(
    hidden_size=128,
    intermediate_size=384,
    num_layers=8,
    num_heads=4,
    num_kv_heads=2,
    vision_depth=2,
    vision_hidden=64,
    vision_heads=2,
    mrope_section=(4, 6, 6),
)


def default_model_path() -> Path:
    """Where the embedded checkpoint lives; FileNotFoundError with the command that makes it if absent."""
    if not (DEFAULT_MODEL_DIR / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"the embedded model is missing from {DEFAULT_MODEL_DIR}; train it with `python eval/synthetic/train.py`"
        )
    return DEFAULT_MODEL_DIR


def load_default(dtype=None):
    """(model, processor) of the embedded model, loaded offline, in eval mode."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = default_model_path()
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="sdpa", **kwargs).eval()
    return model, AutoProcessor.from_pretrained(path)


def deep_model_path(directory: Path = DEEP_MODEL_DIR) -> Path:
    """Where the deep checkpoint lives; FileNotFoundError naming the (resumable) training command until the
    training has finished and exported it."""
    if not (Path(directory) / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"the deep embedded model is not in {directory} yet; train it with `{DEEP_TRAIN_COMMAND}` "
            "(resumable: run it again to continue from eval/synthetic/checkpoints/deep/)"
        )
    return Path(directory)


def load_deep(dtype=None, directory: Path = DEEP_MODEL_DIR):
    """(model, processor) of the deep embedded model, loaded offline, in eval mode. It is stored in float16
    (package size); it loads as float32 unless `dtype` says otherwise (float16 matmuls are slow on CPU)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = deep_model_path(directory)
    model = AutoModelForImageTextToText.from_pretrained(
        path, attn_implementation="sdpa", dtype=dtype if dtype is not None else torch.float32
    ).eval()
    return model, AutoProcessor.from_pretrained(path)
