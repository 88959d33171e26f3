"""Train the embedded tiny Qwen2.5-VL on the synthetic multi-image VQA task, on CPU.

    python eval/synthetic/train.py                       # ~15 min on 2 cores, writes the checkpoint
    python eval/synthetic/train.py --steps 20 --out /tmp/m  # a quick look

The checkpoint (safetensors + processor) goes to `src/vlcache_hf/assets/tiny-qwen2.5-vl-vqa/` by default,
where `vlcache_hf.tools.pretrained.load_default()` finds it; the loss curve and the log go to eval/results/.
Training items are drawn from the 'train' split by index (seeded, deterministic); the answer is one token
(each task word is one token of the tokenizer), trained with the loss on the answer and end-of-turn tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

from vlcache_hf.tools import synthetic, toy
from vlcache_hf.tools.pretrained import DEFAULT_MODEL_DIR, MODEL_SIZE

ROOT = Path(__file__).resolve().parents[2]


def build(seed: int):
    """A fresh model (seeded random init) and its processor with the task tokenizer."""
    tokenizer = synthetic.build_tokenizer()
    processor = toy.build_processor("qwen2_5_vl", tokenizer=tokenizer)
    config = toy.build_config("qwen2_5_vl", MODEL_SIZE, vocab_size=len(tokenizer))
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_config(config, attn_implementation="sdpa")
    return model, processor


def batch_inputs(processor, items: list[synthetic.Item], with_answer: bool):
    """Processor inputs for a batch; with answers, labels cover the answer token and <|im_end|>."""
    texts, images = [], []
    for item in items:
        chat = synthetic.messages(item, answer=item.answer if with_answer else None)
        texts.append(processor.apply_chat_template(chat, add_generation_prompt=not with_answer))
        images += [synthetic.render(s) for s in item.scenes]
    processor.tokenizer.padding_side = "right" if with_answer else "left"
    inputs = processor(text=texts, images=images, return_tensors="pt", padding=True)
    if with_answer:
        end_id = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
        labels = torch.full_like(inputs["input_ids"], -100)
        for row, ids in enumerate(inputs["input_ids"]):
            last_end = int(torch.nonzero(ids == end_id).flatten()[-1])
            labels[row, last_end - 1 : last_end + 1] = ids[last_end - 1 : last_end + 1]
        inputs["labels"] = labels
    return inputs


@torch.no_grad()
def accuracy(model, processor, items: list[synthetic.Item], batch_size: int = 64) -> float:
    """Share of items whose greedy first answer token is the answer (answers are one token)."""
    model.eval()
    correct = 0
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        inputs = batch_inputs(processor, chunk, with_answer=False)
        logits = model(**inputs).logits[:, -1]
        predicted = processor.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())
        correct += sum(p == item.answer for p, item in zip(predicted, chunk, strict=False))
    model.train()
    return correct / len(items)


def curriculum(progress: float) -> int:
    """Most images per training item at this point of training: 1, then 2, and 3 from 30 % on.

    Without it the model sits on the answer-prior plateau for hundreds of steps (it must learn to read an
    image and to find the n-th image at once); with a single image first it reads colours within ~150 steps.
    """
    return 1 + sum(progress >= edge for edge in (0.12, 0.3))


def save_plot(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [h["step"] for h in history if "loss" in h]
    ax.plot(steps, [h["loss"] for h in history if "loss" in h], lw=0.8, label="train loss (answer tokens)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    evals = [h for h in history if "val_accuracy" in h]
    twin = ax.twinx()
    twin.plot([h["step"] for h in evals], [h["val_accuracy"] for h in evals], "o-", color="C1", label="validation accuracy")
    twin.set_ylim(0, 1)
    twin.set_ylabel("validation accuracy")
    fig.legend(loc="center right")
    ax.set_title("Embedded tiny Qwen2.5-VL on synthetic multi-image VQA (CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--val-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--init", type=Path, default=None, help="start from this checkpoint instead of random weights")
    parser.add_argument("--item-offset", type=int, default=0, help="first training item index (a later stage sees new items)")
    parser.add_argument("--no-curriculum", dest="curriculum", action="store_false", help="2–3 images from the first step")
    parser.add_argument("--out", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--results", type=Path, default=ROOT / "eval" / "results")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    model, processor = build(args.seed)
    if args.init is not None:  # continue from an earlier run's checkpoint (a second, shorter stage)
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model = AutoModelForImageTextToText.from_pretrained(args.init, attn_implementation="sdpa")
        processor = AutoProcessor.from_pretrained(args.init)
    model.train()
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e6:.2f} M parameters; {args.steps} steps of {args.batch_size}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup))) * 0.95 + 0.05

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    validation = synthetic.make_split("validation", args.val_size)
    history: list[dict] = []
    started = time.perf_counter()
    bar = tqdm(range(args.steps), desc="training", unit="step")
    for step in bar:
        max_images = curriculum(step / args.steps) if args.curriculum else synthetic.MAX_IMAGES
        items = [
            synthetic.make_item(synthetic.SPLIT_SEEDS["train"], args.item_offset + step * args.batch_size + i, max_images, min_images=1)
            for i in range(args.batch_size)
        ]
        loss = model(**batch_inputs(processor, items, with_answer=True)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        history.append({"step": step, "loss": loss.item()})
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            acc = accuracy(model, processor, validation)
            history.append({"step": step, "val_accuracy": acc, "elapsed_s": time.perf_counter() - started})
            tqdm.write(f"step {step + 1}: validation accuracy {acc:.3f} ({time.perf_counter() - started:.0f} s)")
    seconds = time.perf_counter() - started

    model.eval()
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    args.results.mkdir(parents=True, exist_ok=True)
    final = [h for h in history if "val_accuracy" in h][-1]["val_accuracy"]
    log = {
        "command": "python eval/synthetic/train.py " + " ".join(argv or []),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "init": str(args.init) if args.init else None,
        "parameters": params,
        "train_seconds": round(seconds, 1),
        "final_validation_accuracy": final,
        "machine": f"{platform.machine()} {platform.processor()} threads={args.threads}",
        "torch": torch.__version__,
        "history": history,
    }
    (args.results / "train_tiny_vqa.json").write_text(json.dumps(log, indent=1))
    save_plot(history, args.results / "train_tiny_vqa_loss.png")
    size_mb = sum(f.stat().st_size for f in args.out.iterdir()) / 1e6
    print(f"trained {args.steps} steps in {seconds / 60:.1f} min; validation accuracy {final:.3f}; checkpoint {size_mb:.1f} MB in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
