"""The "deep" variant of the synthetic task (issue 19): 224-px pictures (64 merged tokens), 2–4 images, and a
two-hop question that binds across images — while the default variant stays byte-identical (the embedded
4-layer model, its tests and eval/synthetic/data/*.parquet depend on it). Also: the deep training command
resumes bitwise from its safetensors/JSON checkpoint, and `load_deep` names that command until it has run."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path

import pytest

from vlcache_hf.tools import synthetic, toy
from vlcache_hf.tools.pretrained import DEFAULT_MODEL_DIR, load_deep
from vlcache_hf.tools.synthetic import Item, Scene

ROOT = Path(__file__).resolve().parents[1]
#: sha256 of the records of test items 0–299 and train items 0–49 (default arguments), and of train items
#: 0–199 drawn as the curriculum draws them (`make_item(1, i, 2, min_images=1)`), computed with the generator
#: as it was before the deep variant was added (commit 668c510)
DEFAULT_SPLITS_SHA256 = "df93f7c74c692405268cf39681f64dcab45eeff0faea79ac6ef6cacad11922e5"
DEFAULT_CURRICULUM_SHA256 = "d9226bf6924aa8cd6dab4db48e1ec83c25edd54eb98c7d07c4ee076e22c0c4f1"


def _digest(items: list[Item]) -> str:
    h = hashlib.sha256()
    for item in items:
        h.update(json.dumps(item.to_record(), sort_keys=True).encode())
    return h.hexdigest()


def test_default_variant_is_byte_identical_to_before():
    assert _digest(synthetic.make_split("test", 300) + synthetic.make_split("train", 50)) == DEFAULT_SPLITS_SHA256
    assert _digest(synthetic.make_split("test", 300, variant="default") + synthetic.make_split("train", 50)) == DEFAULT_SPLITS_SHA256
    assert _digest([synthetic.make_item(1, i, 2, min_images=1) for i in range(200)]) == DEFAULT_CURRICULUM_SHA256


def test_default_tokenizer_matches_the_shipped_model():
    shipped = json.loads((DEFAULT_MODEL_DIR / "tokenizer.json").read_text())
    built = json.loads(synthetic.build_tokenizer()._tokenizer.to_str())
    assert [t["content"] for t in built["added_tokens"]] == [t["content"] for t in shipped["added_tokens"]]


def _two_hop(scenes: tuple[Scene, ...], color: str, shape: str, backward: bool = False) -> Item:
    question = f"What color is the shape in the image right after the one showing a {color} {shape}?"
    return Item(scenes, "", backward, synthetic.TWO_HOP, question, "", "", ())


def test_solve_answers_two_hop_from_the_scenes_alone():
    red_circle, blue_square = Scene("red", "circle", 1, ()), Scene("blue", "square", 1, ())
    green_triangle, red_square = Scene("green", "triangle", 1, ()), Scene("red", "square", 1, ())
    scenes = (red_circle, blue_square, green_triangle, red_square)
    assert synthetic.solve(_two_hop(scenes, "red", "circle")) == "blue"
    assert synthetic.solve(_two_hop(scenes, "blue", "square")) == "green"
    assert synthetic.solve(_two_hop(scenes, "green", "triangle")) == "red"
    # "right after" is display order even when the preamble numbers the images from the end
    assert synthetic.solve(_two_hop(scenes, "blue", "square", backward=True)) == "green"


def test_solve_refuses_a_two_hop_question_without_an_answer():
    a, b = Scene("red", "circle", 1, ()), Scene("blue", "square", 1, ())
    with pytest.raises(ValueError, match="last image"):
        synthetic.solve(_two_hop((a, b), "blue", "square"))
    with pytest.raises(ValueError, match="unique"):
        synthetic.solve(_two_hop((a, a, b), "red", "circle"))
    with pytest.raises(ValueError, match="unique"):
        synthetic.solve(_two_hop((a, b), "white", "circle"))


def test_deep_split_is_balanced_and_every_answer_checks_out():
    items = synthetic.make_split("test", 500, variant="deep")
    assert items == synthetic.make_split("test", 500, variant=synthetic.DEEP_TASK)  # deterministic
    assert Counter(item.kind for item in items) == {kind: 100 for kind in synthetic.DEEP_QUESTION_KINDS}
    assert set(Counter(len(item.scenes) for item in items)) == {2, 3, 4}
    two_hop = [item for item in items if item.kind == synthetic.TWO_HOP]
    for item in items:
        assert synthetic.solve(item) == item.answer
    for item in two_hop:
        anchor, target = item.refs
        described = tuple(item.question.rstrip("?").split()[-2:])
        assert target == anchor + 1 < len(item.scenes)
        assert [(s.color, s.shape) for s in item.scenes].count(described) == 1
        assert (item.scenes[anchor].color, item.scenes[anchor].shape) == described
        assert item.answer == item.scenes[target].color
    # the answer is not the anchor's own colour by construction: both outcomes occur
    assert {item.answer == item.scenes[item.refs[0]].color for item in two_hop} == {True, False}
    assert synthetic.make_split("test", 40, variant="deep") != synthetic.make_split("test", 40)


def test_deep_pictures_are_64_tokens_and_task_words_one_token():
    tokenizer = synthetic.build_tokenizer("deep")
    processor = toy.build_processor("qwen2_5_vl", max_pixels=224 * 224, min_pixels=224 * 224, tokenizer=tokenizer)
    item = next(i for i in synthetic.make_split("test", 20, variant="deep") if len(i.scenes) == 4)
    pictures = synthetic.render_item(item, "deep")
    assert {p.size for p in pictures} == {(224, 224)}
    text = processor.apply_chat_template(synthetic.messages(item, pictures), add_generation_prompt=True)
    inputs = processor(text=[text], images=pictures, return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 16, 16]] * 4
    assert int((inputs["input_ids"] == tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum()) == 4 * 64
    for word in synthetic.DEEP_VOCABULARY:
        assert len(tokenizer.tokenize(word)) == 1, word


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="variant"):
        synthetic.make_split("test", 1, variant="huge")


def test_load_deep_names_the_training_command_while_untrained(tmp_path):
    with pytest.raises(FileNotFoundError, match="eval/synthetic/train_deep.py"):
        load_deep(directory=tmp_path)


def _train_deep():
    path = ROOT / "eval" / "synthetic" / "train_deep.py"
    spec = importlib.util.spec_from_file_location("train_deep", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_deep"] = module
    spec.loader.exec_module(module)
    return module


def test_training_resumes_bitwise_from_its_checkpoint(tmp_path):
    """Four steps in one run and 2 + 2 steps with a restart in between give the same weights, bit for bit
    (model, AdamW moments, step and RNG restored from safetensors/JSON)."""
    train = _train_deep()
    common = ["--total-steps", "40", "--batch-size", "2", "--warmup", "2", "--eval-every", "1000", "--threads", "1", "--val-size", "4"]
    common += ["--results", str(tmp_path / "results"), "--out", str(tmp_path / "out")]
    assert train.main([*common, "--checkpoints", str(tmp_path / "straight"), "--max-steps", "4"]) == 0
    for _ in range(2):
        assert train.main([*common, "--checkpoints", str(tmp_path / "resumed"), "--max-steps", "2"]) == 0
    straight, resumed = (sorted((tmp_path / name).glob("step-*")) for name in ("straight", "resumed"))
    assert [p.name for p in straight] == [p.name for p in resumed] == ["step-0000004"]  # only the latest is kept
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert (straight[0] / name).read_bytes() == (resumed[0] / name).read_bytes()
    history = json.loads((resumed[0] / "state.json").read_text())["history"]
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    assert history == json.loads((straight[0] / "state.json").read_text())["history"]


def test_finished_training_exports_a_loadable_float16_model(tmp_path):
    """At the last step the command exports the model (float16 storage) where `load_deep` finds it, offline,
    with the checkpoint's weights, and logs the exported model's test accuracy."""
    import torch
    from safetensors.torch import load_file

    train = _train_deep()
    out, results = tmp_path / "out", tmp_path / "results"
    args = ["--total-steps", "2", "--batch-size", "2", "--warmup", "1", "--val-size", "4", "--test-size", "5"]
    assert train.main([*args, "--checkpoints", str(tmp_path / "ckpt"), "--out", str(out), "--results", str(results)]) == 0
    model, processor = load_deep(directory=out)
    text = model.config.text_config
    assert (text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (8, 4, 2)
    assert model.dtype == torch.float32 and load_file(str(out / "model.safetensors"))["lm_head.weight"].dtype == torch.float16
    trained = load_file(str(tmp_path / "ckpt" / "step-0000002" / "model.safetensors"))
    exported = model.state_dict()
    assert set(trained) == set(exported)
    for name, weight in trained.items():
        assert torch.equal(exported[name], weight.half().float()), name
    log = json.loads((results / "train_deep_vqa.json").read_text())
    assert log["step"] == 2 and set(log["test_accuracy"]) >= {"all", synthetic.TWO_HOP}
    assert (results / "train_deep_vqa_loss.png").stat().st_size > 0


def _item(scenes: tuple[Scene, ...], backward: bool = False) -> Item:
    return Item(scenes, "", backward, "color", "What color is the shape in the first image?", "", "", (0,))


def test_questions_about_an_item_are_every_answerable_question():
    """Hand-counted: three distinct pictures give 3 colour + 3 shape + 3 which + 2 two-hop + 3 same-colour
    questions; the answers below are read off the scenes by hand."""
    red_circle, blue_square, red_triangle = Scene("red", "circle", 1, ()), Scene("blue", "square", 1, ()), Scene("red", "triangle", 1, ())
    questions = synthetic.questions_about(_item((red_circle, blue_square, red_triangle)), synthetic.DEEP_QUESTION_KINDS)
    assert Counter(q.kind for q in questions) == {"color": 3, "shape": 3, "which": 3, synthetic.TWO_HOP: 2, "same_color": 3}
    answers = {q.question: q.answer for q in questions}
    assert answers["What color is the shape in the second image?"] == "blue"
    assert answers["What shape is in the third image?"] == "triangle"
    assert answers["Which image shows a red triangle?"] == "third"
    assert answers["What color is the shape in the image right after the one showing a blue square?"] == "red"
    assert answers["Do the first image and the third image have the same color?"] == "yes"
    assert answers["Do the first image and the second image have the same color?"] == "no"
    # numbered from the end: "first" is the last picture
    backward = {q.question: q.answer for q in synthetic.questions_about(_item((red_circle, blue_square, red_triangle), True))}
    assert backward["What shape is in the first image?"] == "triangle" and backward["Which image shows a red circle?"] == "third"
    # a picture shown twice can be named by position only; the default kinds have no two-hop
    twice = synthetic.questions_about(_item((red_circle, blue_square, red_circle)))
    assert Counter(q.kind for q in twice) == {"color": 3, "shape": 3, "which": 1, "same_color": 3}


def test_follow_up_questions_are_labelled_answer_by_answer():
    """Training asks follow-up questions as later chat turns; every answer token and its <|im_end|> is labelled,
    nothing else (the label positions are found in the token ids, independently of how the text was built)."""
    train = _train_deep()
    processor = train.build_processor()
    batcher = train.Batcher(processor)
    items = train.train_items(3000, 3, 4000)
    follow_ups = [train.follow_up_questions(item, 6, i) for i, item in enumerate(items)]
    assert all(len(extra) == 6 and len({q.question for q in extra} | {item.question}) == 7 for item, extra in zip(items, follow_ups, strict=True))
    batcher.check_against_processor(items, follow_ups)
    inputs = batcher(train.build_model(0, len(processor.tokenizer)), items, with_answer=True, follow_ups=follow_ups)
    assert int((inputs["labels"] != -100).sum()) == 3 * 7 * 2
