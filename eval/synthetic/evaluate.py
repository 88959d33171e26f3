"""Test accuracy of a model on the synthetic multi-image VQA task (plain forward, greedy first answer token).

    python eval/synthetic/evaluate.py                  # the embedded model, the whole test split (2000 items)
    python eval/synthetic/evaluate.py --model DIR --items 500
    python eval/synthetic/evaluate.py --out eval/results/eval_tiny_vqa.json   # also write the figures

Prints overall accuracy, per question kind and per number of images, next to chance: the accuracy of a
uniform guess among the answers a question of that kind can have (one of the colours, one of the shapes,
yes/no, one of the item's image names). Answers are one token, so the first token's argmax is the greedy
answer.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import batch_inputs  # noqa: E402

from vlcache_hf.tools import synthetic  # noqa: E402


def answer_choices(item: synthetic.Item) -> int:
    """How many answers a question of this item's kind can have: chance is one over this."""
    if item.kind in ("color", synthetic.TWO_HOP):
        return len(synthetic.COLORS)
    if item.kind == "shape":
        return len(synthetic.SHAPES)
    if item.kind == "same_color":
        return 2
    if item.kind == "which":
        return len(item.scenes)
    raise ValueError(f"no chance level for question kind {item.kind!r}")


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model directory (default: the embedded model)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.model:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model, processor = AutoModelForImageTextToText.from_pretrained(args.model).eval(), AutoProcessor.from_pretrained(args.model)
    else:
        from vlcache_hf.tools.pretrained import load_default

        model, processor = load_default()
    items = synthetic.make_split(args.split, args.items)
    hits, totals, chance = Counter(), Counter(), Counter()
    for start in tqdm(range(0, len(items), 64), desc="evaluating", unit="batch"):
        chunk = items[start : start + 64]
        logits = model(**batch_inputs(processor, chunk, with_answer=False)).logits[:, -1]
        for token, item in zip(processor.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist()), chunk, strict=True):
            for key in ("all", f"kind={item.kind}", f"images={len(item.scenes)}"):
                totals[key] += 1
                hits[key] += token == item.answer
                chance[key] += 1 / answer_choices(item)
    for key in sorted(totals):
        print(f"{key:20s} {hits[key] / totals[key]:.3f}  ({hits[key]}/{totals[key]})  chance {chance[key] / totals[key]:.3f}")
    if args.out:
        command = "python eval/synthetic/evaluate.py " + " ".join(argv if argv is not None else sys.argv[1:])
        figures = {
            "command": command.strip(),
            "model": args.model or "embedded default (vlcache_hf/assets/tiny-qwen2.5-vl)",
            "split": args.split,
            "items": len(items),
            "accuracy_percent": {key: round(100 * hits[key] / totals[key], 2) for key in sorted(totals)},
            "chance_percent": {key: round(100 * chance[key] / totals[key], 2) for key in sorted(totals)},
            "counts": {key: [hits[key], totals[key]] for key in sorted(totals)},
            "machine": f"{platform.machine()}, torch {torch.__version__}",
        }
        args.out.write_text(json.dumps(figures, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
