"""Test accuracy of a model on the synthetic multi-image VQA task (plain forward, greedy first answer token).

    python eval/synthetic/evaluate.py                  # the embedded model, the whole test split (2000 items)
    python eval/synthetic/evaluate.py --model DIR --items 500

Prints overall accuracy, per question kind and per number of images. Answers are one token, so the first
token's argmax is the greedy answer.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import batch_inputs  # noqa: E402

from vlcache_hf.tools import synthetic  # noqa: E402


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model directory (default: the embedded model)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--items", type=int, default=2000)
    args = parser.parse_args(argv)
    if args.model:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model, processor = AutoModelForImageTextToText.from_pretrained(args.model).eval(), AutoProcessor.from_pretrained(args.model)
    else:
        from vlcache_hf.tools.pretrained import load_default

        model, processor = load_default()
    items = synthetic.make_split(args.split, args.items)
    hits, totals = Counter(), Counter()
    for start in tqdm(range(0, len(items), 64), desc="evaluating", unit="batch"):
        chunk = items[start : start + 64]
        logits = model(**batch_inputs(processor, chunk, with_answer=False)).logits[:, -1]
        for token, item in zip(processor.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist()), chunk, strict=True):
            for key in ("all", f"kind={item.kind}", f"images={len(item.scenes)}"):
                totals[key] += 1
                hits[key] += token == item.answer
    for key in sorted(totals):
        print(f"{key:20s} {hits[key] / totals[key]:.3f}  ({hits[key]}/{totals[key]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
