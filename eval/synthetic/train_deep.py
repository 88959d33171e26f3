"""Train the deep embedded Qwen2.5-VL (issue 19) on the "deep" synthetic task, on CPU — resumable.

    python eval/synthetic/train_deep.py          # starts, or continues from the latest checkpoint
    mkdir -p eval/synthetic/checkpoints/deep && OMP_NUM_THREADS=1 nohup nice -n 19 python eval/synthetic/train_deep.py \
        >> eval/synthetic/checkpoints/deep/train.log 2>&1 &

Run the same command again after an interruption (or in a fresh clone where the checkpoint was committed):
it resumes from `eval/synthetic/checkpoints/deep/step-*/` — model, AdamW state, step, RNG state and the log,
all safetensors / JSON — and continues the exact same trajectory (items are drawn by index, the learning rate
is a function of the step, so a resumed run is bitwise the uninterrupted one at the same thread count).
When the last step is reached (or validation passes the target early) it exports the model in float16 with
its processor to `src/vlcache_hf/assets/tiny-qwen2.5-vl-deep/` (`vlcache_hf.tools.pretrained.load_deep()`),
measures test accuracy through the plain processor path, and writes eval/results/train_deep_vqa.{json,png}.

Cost on a 2-core CPU: the model is small and deep (8 layers, hidden 128, GQA); a step's batch has one image
count (length bucketing: almost no padding, instead of sequence packing); and the task has only 18 distinct
pictures (6 colours × 3 shapes), so their pixels are preprocessed once and the vision tower runs once per
*distinct* picture of a batch (≤ 18 instead of up to 64), its features scattered to every occurrence —
trained end to end at ~5 % of the step's cost, rather than frozen random features. Each item's question is
followed by `--follow-ups` more questions about the same pictures, as later chat turns, all supervised:
the pictures are most of a sequence, so this multiplies the supervision per step at ~1.6× its cost.
Run 1 (one question per item, 12000-step schedule; log in checkpoints/deep/train-run1.log) plateaued at
~55 % validation accuracy after 2900 steps and was stopped; this schedule (4000 steps, 6 follow-ups)
replaced it.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import platform
import random
import shutil
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers.modeling_outputs import BaseModelOutputWithPooling

from vlcache_hf.tools import synthetic, toy
from vlcache_hf.tools.pretrained import DEEP_MODEL_DIR, DEEP_MODEL_SIZE, DEEP_TRAIN_COMMAND

ROOT = Path(__file__).resolve().parents[2]
CHECKPOINTS = ROOT / "eval" / "synthetic" / "checkpoints" / "deep"
TASK = synthetic.DEEP_TASK
TOKENS_PER_SIDE = TASK.image_size // toy.PATCH  # 16 patches a side → 8 × 8 = 64 merged tokens
#: the schedule: part of the checkpoint (a resumed run keeps it, whatever the command line says)
SCHEDULE_KEYS = ("total_steps", "batch_size", "lr", "warmup", "seed", "weight_decay", "follow_ups")
#: issue 19's targets for the exported model's test accuracy (overall, two-hop questions)
TARGETS = {"all": 0.90, "two_hop": 0.80}
#: validation accuracy at which training stops early (overall, two-hop): the issue's targets plus a margin
EARLY_STOP = (0.97, 0.92)


def build_processor():
    """The deep model's processor: task tokenizer (one token per task word), 224-px pictures kept at 224 px."""
    side = TASK.image_size
    return toy.build_processor("qwen2_5_vl", max_pixels=side * side, min_pixels=side * side, tokenizer=synthetic.build_tokenizer(TASK))


def build_model(seed: int, vocab_size: int):
    """A fresh deep model, seeded random init, float32, SDPA."""
    from transformers import AutoModelForImageTextToText

    config = toy.build_config("qwen2_5_vl", DEEP_MODEL_SIZE, vocab_size=vocab_size)
    torch.manual_seed(seed)
    return AutoModelForImageTextToText.from_config(config, attn_implementation="sdpa")


class Batcher:
    """Model inputs for items of the deep task without the per-image cost of the processor: texts are
    tokenized with each picture's placeholder expanded to its 64 tokens, and the vision tower gets each
    distinct picture once (pixels preprocessed by the model's own image processor, once per scene)."""

    def __init__(self, processor) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_token = "<|image_pad|>"
        self.image_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        self.end_id = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.tokens_per_image = (TOKENS_PER_SIDE // 2) ** 2
        self._pixels: dict[synthetic.Scene, torch.Tensor] = {}

    def pixels(self, scene: synthetic.Scene) -> torch.Tensor:
        if scene not in self._pixels:
            out = self.processor.image_processor(images=[synthetic.render(scene, TASK.image_size)], return_tensors="pt")
            assert out["image_grid_thw"].tolist() == [[1, TOKENS_PER_SIDE, TOKENS_PER_SIDE]]
            self._pixels[scene] = out["pixel_values"]
        return self._pixels[scene]

    def texts(self, items: list[synthetic.Item], with_answer: bool, follow_ups: list[list[synthetic.Item]] | None = None) -> list[str]:
        """Chat texts; `follow_ups[i]` are further questions about item i's pictures, asked (and answered)
        in later turns of the same chat."""
        texts = []
        for index, item in enumerate(items):
            chat = synthetic.messages(item, [None] * len(item.scenes), answer=item.answer if with_answer else None)
            for question in follow_ups[index] if follow_ups else ():
                chat.append({"role": "user", "content": [{"type": "text", "text": question.prompt_after}]})
                chat.append({"role": "assistant", "content": [{"type": "text", "text": question.answer}]})
            texts.append(self.processor.apply_chat_template(chat, add_generation_prompt=not with_answer))
        return texts

    def __call__(self, model, items: list[synthetic.Item], with_answer: bool, follow_ups: list[list[synthetic.Item]] | None = None) -> dict:
        """Inputs for `model(**inputs)`; with answers, labels cover every answer token and its <|im_end|>."""
        texts = self.texts(items, with_answer, follow_ups)
        expanded = [t.replace(self.image_token, self.image_token * self.tokens_per_image) for t in texts]
        self.tokenizer.padding_side = "right" if with_answer else "left"
        inputs = dict(self.tokenizer(expanded, return_tensors="pt", padding=True))
        inputs["mm_token_type_ids"] = (inputs["input_ids"] == self.image_id).long()
        scenes = [scene for item in items for scene in item.scenes]
        inputs["image_grid_thw"] = torch.tensor([[1, TOKENS_PER_SIDE, TOKENS_PER_SIDE]] * len(scenes))
        distinct = list(dict.fromkeys(scenes))
        grid = torch.tensor([[1, TOKENS_PER_SIDE, TOKENS_PER_SIDE]] * len(distinct))
        pixel_values = torch.cat([self.pixels(scene) for scene in distinct]).to(model.dtype)
        features = model.model.get_image_features(pixel_values, grid, return_dict=True).pooler_output
        where = {scene: i for i, scene in enumerate(distinct)}
        inputs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=[features[where[s]] for s in scenes])}
        if with_answer:
            inputs["labels"] = self.answer_labels(inputs["input_ids"])
        return inputs

    def answer_labels(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Labels for every assistant turn: its one answer token and the <|im_end|> after it; -100 elsewhere."""
        opener = torch.tensor(self.tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"])
        labels = torch.full_like(input_ids, -100)
        windows = input_ids.unfold(1, len(opener), 1)  # [rows, starts, len(opener)]
        for row, start in torch.nonzero((windows == opener).all(-1)).tolist():
            answer = start + len(opener)
            if answer + 1 < input_ids.shape[1]:
                labels[row, answer : answer + 2] = input_ids[row, answer : answer + 2]
        return labels

    def check_against_processor(self, items: list[synthetic.Item], follow_ups: list[list[synthetic.Item]]) -> None:
        """The fast path must give the processor's own token ids, token types and grids, and label exactly
        each answer and its <|im_end|> (checked at start)."""
        images = [picture for item in items for picture in synthetic.render_item(item, TASK)]
        self.tokenizer.padding_side = "right"
        texts = self.texts(items, True, follow_ups)
        reference = self.processor(text=texts, images=images, return_tensors="pt", padding=True)
        expanded = [t.replace(self.image_token, self.image_token * self.tokens_per_image) for t in texts]
        ours = self.tokenizer(expanded, return_tensors="pt", padding=True)
        assert torch.equal(ours["input_ids"], reference["input_ids"]), "fast tokenization differs from the processor"
        assert torch.equal((ours["input_ids"] == self.image_id).long(), reference["mm_token_type_ids"])
        assert reference["image_grid_thw"].tolist() == [[1, TOKENS_PER_SIDE, TOKENS_PER_SIDE]] * len(images)
        assert torch.equal(torch.cat([self.pixels(s) for item in items for s in item.scenes]), reference["pixel_values"])
        labels = self.answer_labels(ours["input_ids"])
        for row, (item, extra) in enumerate(zip(items, follow_ups, strict=True)):
            labelled = self.tokenizer.convert_ids_to_tokens(labels[row][labels[row] != -100].tolist())
            assert labelled == [word for q in (item, *extra) for word in (q.answer, "<|im_end|>")], labelled


def images_per_item(step: int, total_steps: int) -> int:
    """The image count of a step's batch (one per batch: no padding). Curriculum: 1–2 images for the first
    8 % (learn to read a picture), 1–3 until 20 %, then the evaluation range 2–4 in rotation."""
    progress = step / total_steps
    choices = (1, 2) if progress < 0.08 else (1, 2, 3) if progress < 0.2 else (2, 3, 4)
    return choices[step % len(choices)]


def train_items(step: int, batch_size: int, total_steps: int) -> list[synthetic.Item]:
    """The items of a step: training-split items by index, so a resumed run sees exactly the same data."""
    count = images_per_item(step, total_steps)
    seed = synthetic.SPLIT_SEEDS["train"]
    return [synthetic.make_item(seed, step * batch_size + i, count, count, TASK.kinds) for i in range(batch_size)]


def follow_up_questions(item: synthetic.Item, count: int, seed: int) -> list[synthetic.Item]:
    """Up to `count` more questions about the item's pictures, kinds in turn (so colour and shape questions,
    which exist for every picture, do not crowd out the rest), drawn by `seed` (resumable).

    Why: run 1 (one question per item, steps 0–2900) plateaued at ~55 % validation accuracy — colour of the
    n-th image near chance beyond two images — with 16 supervised tokens per step. The pictures are most of a
    sequence's cost, so asking more questions about them multiplies the supervision for ~30 tokens each.
    """
    rng = random.Random(seed)
    by_kind: dict[str, list[synthetic.Item]] = {}
    for question in synthetic.questions_about(item, TASK.kinds):
        if question.question != item.question:
            by_kind.setdefault(question.kind, []).append(question)
    for questions in by_kind.values():
        rng.shuffle(questions)
    kinds = sorted(by_kind)
    rng.shuffle(kinds)
    chosen: list[synthetic.Item] = []
    while len(chosen) < count and any(by_kind.values()):
        for kind in kinds:
            if by_kind[kind] and len(chosen) < count:
                instruction = rng.choice(synthetic.INSTRUCTIONS)
                chosen.append(dataclasses.replace(by_kind[kind].pop(), instruction=instruction))
    return chosen


def train_follow_ups(step: int, items: list[synthetic.Item], schedule: dict) -> list[list[synthetic.Item]]:
    first = step * schedule["batch_size"]
    return [follow_up_questions(item, schedule["follow_ups"], first + i) for i, item in enumerate(items)]


def lr_factor(step: int, schedule: dict) -> float:
    """Linear warmup, then cosine down to 5 %: a function of the step only (resumable)."""
    warmup, total = schedule["warmup"], schedule["total_steps"]
    if step < warmup:
        return (step + 1) / warmup
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def accuracy(model, batcher: Batcher, items: list[synthetic.Item], batch_size: int = 32) -> dict[str, float]:
    """Greedy first-answer-token accuracy, overall and per question kind (answers are one token)."""
    was_training = model.training
    model.eval()
    hits, totals = Counter(), Counter()
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        logits = model(**batcher(model, chunk, with_answer=False)).logits[:, -1]
        tokens = batcher.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())
        for token, item in zip(tokens, chunk, strict=True):
            for key in ("all", item.kind):
                totals[key] += 1
                hits[key] += token == item.answer
    model.train(was_training)
    return {key: hits[key] / totals[key] for key in sorted(totals)}


# ---------------------------------------------------------------- checkpoints (safetensors + JSON, no pickle)


def latest_checkpoint(directory: Path) -> Path | None:
    done = sorted(p for p in directory.glob("step-*") if (p / "state.json").is_file() and not p.name.endswith(".tmp"))
    return done[-1] if done else None


def save_checkpoint(directory: Path, model, optimizer, state: dict, keep: int) -> Path:
    """Write step-NNNNNNN/ atomically (a temp dir renamed when complete), then drop all but the `keep` latest."""
    names = {id(p): n for n, p in model.named_parameters()}
    tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                tensors[f"{names[id(param)]}::{key}"] = value.detach().reshape(value.shape).contiguous()
    final = directory / f"step-{state['step']:07d}"
    tmp = directory / (final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({n: t.detach().contiguous() for n, t in model.state_dict().items()}, str(tmp / "model.safetensors"))
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps(state, indent=0))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    older = sorted(p for p in directory.glob("step-*") if p != final)
    stale = [p for p in older if p.name.endswith(".tmp")]
    complete = [p for p in older if not p.name.endswith(".tmp")]
    for path in stale + complete[: max(0, len(complete) - (keep - 1))]:
        shutil.rmtree(path, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model, optimizer) -> dict:
    """Restore model weights, AdamW moments and step counts, and the torch RNG; return the saved state."""
    weights = load_file(str(path / "model.safetensors"))
    model.load_state_dict(weights, strict=True)
    tensors = load_file(str(path / "optimizer.safetensors"))
    torch.set_rng_state(tensors.pop("rng.torch"))
    params = dict(model.named_parameters())
    for key, value in tensors.items():
        name, slot = key.split("::")
        optimizer.state[params[name]][slot] = value
    return json.loads((path / "state.json").read_text())


def config_digest(model) -> str:
    return hashlib.sha256(model.config.to_json_string(use_diff=False).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- reporting


def save_plot(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    losses = [h for h in history if "loss" in h]
    ax.plot([h["step"] for h in losses], [h["loss"] for h in losses], lw=0.6, alpha=0.5, label="train loss (answer tokens)")
    if len(losses) >= 50:
        window = 50
        smooth = [sum(h["loss"] for h in losses[i - window : i]) / window for i in range(window, len(losses) + 1)]
        ax.plot([h["step"] for h in losses[window - 1 :]], smooth, lw=1.2, color="C0", label="train loss, 50-step mean")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    evals = [h for h in history if "val" in h]
    twin = ax.twinx()
    twin.plot([h["step"] for h in evals], [h["val"]["all"] for h in evals], "o-", color="C1", label="validation accuracy")
    if evals and synthetic.TWO_HOP in evals[0]["val"]:
        twin.plot([h["step"] for h in evals], [h["val"][synthetic.TWO_HOP] for h in evals], "s--", color="C2", label="validation two-hop")
    twin.set_ylim(0, 1)
    twin.set_ylabel("validation accuracy")
    fig.legend(loc="lower left", bbox_to_anchor=(0.1, 0.13), fontsize=8)
    ax.set_title("Deep embedded Qwen2.5-VL (8 layers, 64 tokens/image) on synthetic VQA, CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_log(results: Path, state: dict, extra: dict | None = None) -> None:
    results.mkdir(parents=True, exist_ok=True)
    log = {key: state.get(key) for key in ("step", "schedule", "parameters", "model_size", "train_seconds", "cpu_seconds", "items_seen")}
    log |= {
        "command": DEEP_TRAIN_COMMAND,
        "task": {"variant": TASK.name, "image_size": TASK.image_size, "kinds": list(TASK.kinds), "images": [TASK.min_images, TASK.max_images]},
        "machine": f"{platform.machine()} {platform.processor()} threads={torch.get_num_threads()}",
        "torch": torch.__version__,
        **(extra or {}),
        "history": state["history"],
    }
    (results / "train_deep_vqa.json").write_text(json.dumps(log, indent=0))
    save_plot(state["history"], results / "train_deep_vqa_loss.png")


@torch.no_grad()
def test_accuracy(directory: Path, items: int) -> dict[str, float]:
    """Accuracy of the *exported* model through the ordinary processor path (pixels, plain forward)."""
    from vlcache_hf.tools.pretrained import load_deep

    model, processor = load_deep(directory=directory)
    hits, totals = Counter(), Counter()
    split = synthetic.make_split("test", items, variant=TASK)
    for start in range(0, items, 32):
        chunk = split[start : start + 32]
        texts = [processor.apply_chat_template(synthetic.messages(it, synthetic.render_item(it, TASK)), add_generation_prompt=True) for it in chunk]
        processor.tokenizer.padding_side = "left"
        images = [p for it in chunk for p in synthetic.render_item(it, TASK)]
        logits = model(**processor(text=texts, images=images, return_tensors="pt", padding=True)).logits[:, -1]
        for token, item in zip(processor.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist()), chunk, strict=True):
            for key in ("all", item.kind, f"images={len(item.scenes)}"):
                totals[key] += 1
                hits[key] += token == item.answer
    return {key: round(hits[key] / totals[key], 4) for key in sorted(totals)}


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--total-steps", type=int, default=4_000, help="schedule length (fixed by the first run)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--follow-ups", type=int, default=6, help="further questions per item, asked as later chat turns")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--checkpoint-every", type=float, default=300.0, help="seconds between checkpoints")
    parser.add_argument("--eval-every", type=int, default=250, help="steps between validation runs")
    parser.add_argument("--val-size", type=int, default=250)
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--print-every", type=int, default=20)
    parser.add_argument("--max-steps", type=int, default=None, help="stop (with a checkpoint) after this many steps of this run")
    parser.add_argument("--keep", type=int, default=1, help="checkpoints kept (the latest ones)")
    parser.add_argument("--checkpoints", type=Path, default=CHECKPOINTS)
    parser.add_argument("--out", type=Path, default=DEEP_MODEL_DIR)
    parser.add_argument("--results", type=Path, default=ROOT / "eval" / "results")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    processor = build_processor()
    batcher = Batcher(processor)
    schedule = {key: getattr(args, key) for key in SCHEDULE_KEYS if hasattr(args, key)} | {"weight_decay": 0.01}
    model = build_model(schedule["seed"], len(processor.tokenizer))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=schedule["lr"], weight_decay=schedule["weight_decay"], betas=(0.9, 0.98))
    params = sum(p.numel() for p in model.parameters())
    latest = latest_checkpoint(args.checkpoints)
    if latest is not None:
        state = load_checkpoint(latest, model, optimizer)
        if state["config_digest"] != config_digest(model):
            raise SystemExit(f"{latest} holds another model configuration; move it away to start afresh")
        schedule = state["schedule"]
        for group in optimizer.param_groups:
            group.update(lr=schedule["lr"], weight_decay=schedule["weight_decay"])
        print(f"resumed from {latest} at step {state['step']} (schedule {schedule})", flush=True)
    else:
        state = {
            "step": 0,
            "schedule": schedule,
            "config_digest": config_digest(model),
            "parameters": params,
            "model_size": {k: list(v) if isinstance(v, tuple) else v for k, v in DEEP_MODEL_SIZE.__dict__.items()},
            "train_seconds": 0.0,
            "cpu_seconds": 0.0,
            "items_seen": 0,
            "finished": False,
            "history": [],
        }
        probe = train_items(2000, 4, schedule["total_steps"]) + train_items(0, 2, schedule["total_steps"])
        batcher.check_against_processor(probe, [follow_up_questions(item, schedule["follow_ups"], i) for i, item in enumerate(probe)])
        print(f"fresh start: {params / 1e6:.2f} M parameters; {schedule}", flush=True)
    total = schedule["total_steps"]

    stop = {"signal": False}

    def on_signal(signum, frame):  # finish the step, checkpoint, exit
        stop["signal"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    validation = synthetic.make_split("validation", args.val_size, variant=TASK)
    run_started, last_save, cpu_started = time.perf_counter(), time.perf_counter(), time.process_time()
    run_steps, run_items, window = 0, 0, []

    def checkpoint() -> None:
        nonlocal last_save
        state["train_seconds"] = round(state["train_seconds"], 1)
        state["cpu_seconds"] = round(state.get("cpu_seconds", 0.0), 1)
        path = save_checkpoint(args.checkpoints, model, optimizer, state, args.keep)
        write_log(args.results, state)
        last_save = time.perf_counter()
        print(f"checkpoint {path.name} written", flush=True)

    while not state["finished"] and state["step"] < total:
        step = state["step"]
        tick, cpu_tick = time.perf_counter(), time.process_time()
        for group in optimizer.param_groups:
            group["lr"] = schedule["lr"] * lr_factor(step, schedule)
        items = train_items(step, schedule["batch_size"], total)
        loss = model(**batcher(model, items, with_answer=True, follow_ups=train_follow_ups(step, items, schedule))).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        state["step"] = step + 1
        state["items_seen"] += len(items)
        state["train_seconds"] += time.perf_counter() - tick
        state["cpu_seconds"] = state.get("cpu_seconds", 0.0) + time.process_time() - cpu_tick
        state["history"].append({"step": step + 1, "loss": round(loss.item(), 5)})
        run_steps, run_items = run_steps + 1, run_items + len(items)
        window.append(loss.item())
        if state["step"] % args.print_every == 0:
            rate = run_items / (time.perf_counter() - run_started)
            cpu_rate = run_items / max(1e-9, time.process_time() - cpu_started)  # items per second of CPU time
            eta = (total - state["step"]) * schedule["batch_size"] / rate
            print(
                f"step {state['step']}/{total} loss {sum(window) / len(window):.4f} lr {optimizer.param_groups[0]['lr']:.2e} "
                f"{rate:.1f} items/s (wall), {cpu_rate:.1f} items/CPU-s, ETA {eta / 3600:.2f} h at this rate",
                flush=True,
            )
            window = []
        if state["step"] % args.eval_every == 0 or state["step"] == total:
            val = accuracy(model, batcher, validation)
            state["history"].append({"step": state["step"], "val": val, "train_seconds": round(state["train_seconds"], 1)})
            print(f"step {state['step']}: validation {json.dumps({k: round(v, 3) for k, v in val.items()})}", flush=True)
            if val["all"] >= EARLY_STOP[0] and val.get(synthetic.TWO_HOP, 0.0) >= EARLY_STOP[1]:
                print("validation reached the early-stop target", flush=True)
                state["finished"] = True
        if state["step"] == total:
            state["finished"] = True
        if state["finished"] or stop["signal"] or time.perf_counter() - last_save >= args.checkpoint_every or (
            args.max_steps is not None and run_steps >= args.max_steps
        ):
            checkpoint()
        if stop["signal"] or (args.max_steps is not None and run_steps >= args.max_steps):
            print(f"stopped at step {state['step']}; run the same command to resume", flush=True)
            return 0

    # finished: export (float16 storage), then measure the exported model on the test split
    model.eval()
    args.out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(args.out)
    processor.save_pretrained(args.out)
    size_mb = sum(f.stat().st_size for f in args.out.iterdir()) / 1e6
    test = test_accuracy(args.out, args.test_size)
    print(f"exported to {args.out} ({size_mb:.1f} MB); test accuracy {json.dumps(test)}", flush=True)
    for key, target in TARGETS.items():
        verdict = "met" if test[key] >= target else "missed"
        print(f"target {key} >= {target:.0%}: {verdict} ({test[key]:.2%})", flush=True)
    write_log(args.results, state, {"export_mb": round(size_mb, 2), "test_accuracy": test, "test_items": args.test_size})
    return 0


if __name__ == "__main__":
    sys.exit(main())
