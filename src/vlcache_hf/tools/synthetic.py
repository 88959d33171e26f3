"""Synthetic multi-image VQA: seeded scenes and questions that bind across images and context.

Every item is a few small pictures (each: one large shape in one colour on a grey background) and
a question whose answer needs the pictures *and* the text around them: images are referred to by order
("the second image"), sometimes counted from the end as the preamble *before* the images says, compared
with each other, or searched for ("which image shows a red circle?"). Because the preamble comes before
the images and changes how they are numbered, the K/V of image tokens depends on what precedes them —
exactly the error that non-prefix KV reuse must repair.

The generator is deterministic: item `i` of a split depends only on (split seed, i). `solve` answers an
item from its scene description alone (an independent check of the generator's answers), and `render`
draws the pictures. The library carries this module so the demo, the tests, the lmms-eval task and the
training script all share one definition; the scripts live in `eval/synthetic/`.

Variants (`TaskSpec`): "default" (112-px pictures, 2–3 images; what the embedded 4-layer model was trained
on — its output never changes) and "deep" (224-px pictures → 64 tokens each, 2–4 images, plus the two-hop
question), selected by `make_split(..., variant=...)`, `render_item` and `build_tokenizer`.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "white": (250, 250, 250),
}
SHAPES = ("circle", "square", "triangle")
NUMBERS = ("one", "two", "three", "four")
ORDINALS = ("first", "second", "third", "fourth")
IMAGE_SIZE = 112  # 112 px → 16 merged tokens per image for a 14-px patch, 2×2 merge Qwen2.5-VL
CELL = 28
BACKGROUND = (128, 128, 128)
SPLIT_SEEDS = {"train": 1, "validation": 2, "test": 3}
#: "count" exists (and `solve` answers it) but is left out of the splits: the embedded model must train in
#: minutes on a CPU, and counting was the slowest skill to learn
QUESTION_KINDS = ("color", "shape", "which", "same_color")
MAX_IMAGES = 3

PREAMBLES_FORWARD = (
    "Look at the pictures below.",
    "Here are some images for you.",
    "Please study these images carefully.",
    "You will see a few pictures.",
    "Consider the following images one by one.",
)
PREAMBLES_BACKWARD = (
    "Number the images from the last one.",
    "Count the images backwards from the end.",
)
INSTRUCTIONS = ("Answer with one word.", "Reply with a single word.", "Give a short answer.")

#: every word the prompts and answers use: the embedded model's tokenizer gives each its own token
VOCABULARY = sorted(
    set(COLORS)
    | set(SHAPES)
    | set(NUMBERS)
    | set(ORDINALS)
    | {"yes", "no", "last"}
    | {
        word.strip(".?,").lower()
        for text in PREAMBLES_FORWARD + PREAMBLES_BACKWARD + INSTRUCTIONS
        for word in text.split()
    }
    | {"what", "color", "is", "the", "shape", "in", "image", "how", "many", "shapes", "are", "which", "shows", "a"}
    | {"do", "and", "have", "same", "images"}
)

#: the deep variant's extra question: a two-hop binding across images ("the image right after the one
#: showing a red circle"): find the image by its content, then step to its neighbour in display order
TWO_HOP = "two_hop"
DEEP_QUESTION_KINDS = (*QUESTION_KINDS, TWO_HOP)
DEEP_VOCABULARY = sorted(set(VOCABULARY) | {"right", "after", "one", "showing"})


@dataclass(frozen=True)
class TaskSpec:
    """A variant of the task: picture size (224 px → 64 merged tokens per image), question kinds, images per
    evaluation item, and the task words the tokenizer gives one token each. The default variant is what the
    embedded 4-layer model, its tests and eval/synthetic/data/*.parquet use; "deep" is the paper's regime
    (more tokens per image, up to four images, the two-hop question) for the deeper embedded model."""

    name: str
    image_size: int
    kinds: tuple[str, ...]
    min_images: int
    max_images: int
    vocabulary: tuple[str, ...]


DEFAULT_TASK = TaskSpec("default", IMAGE_SIZE, QUESTION_KINDS, 2, MAX_IMAGES, tuple(VOCABULARY))
DEEP_TASK = TaskSpec("deep", 224, DEEP_QUESTION_KINDS, 2, 4, tuple(DEEP_VOCABULARY))
TASKS = {task.name: task for task in (DEFAULT_TASK, DEEP_TASK)}


def task_spec(variant: str | TaskSpec) -> TaskSpec:
    """The TaskSpec named `variant` ("default" or "deep"); a TaskSpec is returned as is."""
    if isinstance(variant, TaskSpec):
        return variant
    if variant not in TASKS:
        raise ValueError(f"unknown task variant {variant!r}; expected one of {sorted(TASKS)}")
    return TASKS[variant]


@dataclass(frozen=True)
class Scene:
    """One picture: `count` copies of `shape` in `color`, in the given 4×4 grid cells."""

    color: str
    shape: str
    count: int
    cells: tuple[int, ...]


@dataclass(frozen=True)
class Item:
    """One question over several scenes; `backward` means images are numbered from the last one."""

    scenes: tuple[Scene, ...]
    preamble: str
    backward: bool
    kind: str
    question: str
    instruction: str
    answer: str
    refs: tuple[int, ...]  # which images (0-based, in display order) the question names

    def to_record(self) -> dict[str, Any]:
        record = asdict(self)
        record["scenes"] = [asdict(s) | {"cells": list(s.cells)} for s in self.scenes]
        record["refs"] = list(self.refs)
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Item:
        scenes = tuple(Scene(s["color"], s["shape"], int(s["count"]), tuple(s["cells"])) for s in record["scenes"])
        fields = {k: record[k] for k in ("preamble", "backward", "kind", "question", "instruction", "answer")}
        return cls(scenes=scenes, refs=tuple(record["refs"]), **fields)

    @property
    def prompt_before(self) -> str:
        return self.preamble

    @property
    def prompt_after(self) -> str:
        return f"{self.question} {self.instruction}"


def render(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """Draw a scene: grey background and one large centred shape (no cells), or one small shape per chosen
    cell of a 4×4 grid."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    fill = COLORS[scene.color]
    if not scene.cells:
        margin = size // 8
        box = (margin, margin, size - margin, size - margin)
        if scene.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif scene.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(size // 2, margin), (margin, size - margin), (size - margin, size - margin)], fill=fill)
        return image
    cell = size // 4
    for index in scene.cells:
        x, y = (index % 4) * cell, (index // 4) * cell
        box = (x + 4, y + 4, x + cell - 4, y + cell - 4)
        if scene.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif scene.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(x + cell // 2, y + 3), (x + 3, y + cell - 4), (x + cell - 4, y + cell - 4)], fill=fill)
    return image


def _scene(rng: random.Random) -> Scene:
    """One large shape per picture: the colour and the shape cover most of the image's tokens, so a tiny
    model trained for minutes reads them reliably; the task's difficulty is in binding images to text."""
    return Scene(rng.choice(list(COLORS)), rng.choice(SHAPES), 1, ())


def _name(display_index: int, num_images: int, backward: bool) -> str:
    """How the prompt names the image at `display_index` (0-based, in display order)."""
    ordinal = num_images - 1 - display_index if backward else display_index
    return ORDINALS[ordinal]


def _display_index(ordinal: int, num_images: int, backward: bool) -> int:
    return num_images - 1 - ordinal if backward else ordinal


def solve(item: Item) -> str:
    """Answer an item from its scenes, kind and refs only (independent of how the generator chose it)."""
    scenes = item.scenes
    if item.kind == "color":
        return scenes[item.refs[0]].color
    if item.kind == "shape":
        return scenes[item.refs[0]].shape
    if item.kind == "count":
        return NUMBERS[scenes[item.refs[0]].count - 1]
    if item.kind == "same_color":
        return "yes" if scenes[item.refs[0]].color == scenes[item.refs[1]].color else "no"
    if item.kind in ("which", TWO_HOP):
        words = item.question.rstrip("?").split()
        color, shape = words[-2], words[-1]
        matches = [i for i, s in enumerate(scenes) if s.color == color and s.shape == shape]
        if len(matches) != 1:
            raise ValueError(f"{item.kind!r} question without a unique answer: {item.question}")
        if item.kind == "which":
            return _name(matches[0], len(scenes), item.backward)
        # "right after" is in display order, whichever way the preamble numbers the images
        if matches[0] + 1 >= len(scenes):
            raise ValueError(f"two-hop question about the last image: {item.question}")
        return scenes[matches[0] + 1].color
    raise ValueError(f"unknown question kind {item.kind!r}")


def make_item(
    seed: int, index: int, max_images: int = MAX_IMAGES, min_images: int = 2, kinds: tuple[str, ...] = QUESTION_KINDS
) -> Item:
    """Item `index` of the split with `seed`: deterministic, balanced over question `kinds`.

    Evaluation splits have 2–3 images (the deep variant: 2–4); training may start with fewer (`min_images=1`,
    a curriculum). Questions about two images (same colour, two-hop) always get at least two.
    """
    rng = random.Random(seed * 1_000_003 + index)
    kind = kinds[index % len(kinds)]
    low = max(min_images, 2) if kind in ("same_color", TWO_HOP) else min_images
    num_images = rng.randint(low, max(max_images, low))
    scenes = tuple(_scene(rng) for _ in range(num_images))
    backward = rng.random() < 0.3
    preamble = rng.choice(PREAMBLES_BACKWARD if backward else PREAMBLES_FORWARD)
    instruction = rng.choice(INSTRUCTIONS)
    if kind == "which":
        target = rng.randrange(num_images)
        wanted = scenes[target]
        # make the target the only image with its colour-and-shape pair
        others = []
        for i, scene in enumerate(scenes):
            while i != target and scene.color == wanted.color and scene.shape == wanted.shape:
                scene = _scene(rng)
            others.append(scene)
        scenes = tuple(others)
        question = f"Which image shows a {wanted.color} {wanted.shape}?"
        refs: tuple[int, ...] = (target,)
    elif kind == TWO_HOP:
        anchor = rng.randrange(num_images - 1)
        wanted = scenes[anchor]
        others = []
        for i, scene in enumerate(scenes):  # the anchor is the only image with its colour-and-shape pair
            while i != anchor and scene.color == wanted.color and scene.shape == wanted.shape:
                scene = _scene(rng)
            others.append(scene)
        scenes = tuple(others)
        question = f"What color is the shape in the image right after the one showing a {wanted.color} {wanted.shape}?"
        refs = (anchor, anchor + 1)
    elif kind == "same_color":
        first, second = sorted(rng.sample(range(num_images), 2))
        if rng.random() < 0.5:  # balance yes / no
            changed = list(scenes)
            changed[second] = Scene(scenes[first].color, *[getattr(scenes[second], f) for f in ("shape", "count", "cells")])
            scenes = tuple(changed)
        names = [_name(i, num_images, backward) for i in (first, second)]
        question = f"Do the {names[0]} image and the {names[1]} image have the same color?"
        refs = (first, second)
    else:
        ordinal = rng.randrange(num_images)
        target = _display_index(ordinal, num_images, backward)
        name = ORDINALS[ordinal]
        question = {
            "color": f"What color is the shape in the {name} image?",
            "shape": f"What shape is in the {name} image?",
            "count": f"How many shapes are in the {name} image?",
        }[kind]
        refs = (target,)
    item = Item(scenes, preamble, backward, kind, question, instruction, "", refs)
    return Item(**{**item.__dict__, "answer": solve(item)})


def questions_about(item: Item, kinds: tuple[str, ...] = QUESTION_KINDS) -> list[Item]:
    """Every question of `kinds` that has one answer about the item's pictures (same scenes,
    preamble and numbering), each answered by `solve`.

    Training asks several of them after one set of pictures (follow-up chat turns): the pictures cost most
    of a sequence, so extra questions multiply the supervision per forward pass for a few tokens each.
    """
    scenes, count = item.scenes, len(item.scenes)
    drafts: list[tuple[str, str, tuple[int, ...]]] = []
    for display, scene in enumerate(scenes):
        name = _name(display, count, item.backward)
        drafts.append(("color", f"What color is the shape in the {name} image?", (display,)))
        drafts.append(("shape", f"What shape is in the {name} image?", (display,)))
        unique = sum(s.color == scene.color and s.shape == scene.shape for s in scenes) == 1
        if unique:
            drafts.append(("which", f"Which image shows a {scene.color} {scene.shape}?", (display,)))
            if display + 1 < count:
                question = f"What color is the shape in the image right after the one showing a {scene.color} {scene.shape}?"
                drafts.append((TWO_HOP, question, (display, display + 1)))
    for first in range(count):
        for second in range(first + 1, count):
            names = [_name(i, count, item.backward) for i in (first, second)]
            drafts.append(("same_color", f"Do the {names[0]} image and the {names[1]} image have the same color?", (first, second)))
    questions = []
    for kind, question, refs in drafts:
        if kind in kinds:
            draft = Item(scenes, item.preamble, item.backward, kind, question, item.instruction, "", refs)
            questions.append(Item(**{**draft.__dict__, "answer": solve(draft)}))
    return questions


def make_split(split: str, size: int, max_images: int | None = None, variant: str | TaskSpec = "default") -> list[Item]:
    """The first `size` items of a split ('train', 'validation' or 'test') of the task `variant`."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_SEEDS)}")
    task = task_spec(variant)
    most = task.max_images if max_images is None else max_images
    return [make_item(SPLIT_SEEDS[split], i, most, task.min_images, task.kinds) for i in range(size)]


def render_item(item: Item, variant: str | TaskSpec = "default") -> list[Image.Image]:
    """The item's pictures at the variant's image size, in display order."""
    size = task_spec(variant).image_size
    return [render(scene, size) for scene in item.scenes]


def image_label(item: Item, display_index: int) -> str:
    """The text before each picture, e.g. "second image:" (numbered from the end when the preamble says so),
    as multi-image chat templates label pictures ("Picture 1:")."""
    return f" {_name(display_index, len(item.scenes), item.backward)} image: "


def messages(item: Item, images: list[Image.Image] | None = None, answer: str | None = None) -> list[dict]:
    """Chat messages: preamble, each image after its label, then the question; with `answer`, the
    assistant turn too."""
    pictures = images if images is not None else [render(s) for s in item.scenes]
    content = [{"type": "text", "text": item.prompt_before}]
    for index, picture in enumerate(pictures):
        content += [{"type": "text", "text": image_label(item, index)}, {"type": "image", "image": picture}]
    content.append({"type": "text", "text": " " + item.prompt_after})
    chat = [{"role": "user", "content": content}]
    if answer is not None:
        chat.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return chat


def build_tokenizer(variant: str | TaskSpec = "default"):
    """The byte-level toy tokenizer plus one token per task word (shorter prompts, one-token answers)."""
    from transformers import AddedToken

    from . import toy

    vocabulary = task_spec(variant).vocabulary
    tokenizer = toy.build_tokenizer()
    words = [w for w in vocabulary] + [w.capitalize() for w in vocabulary]
    tokenizer.add_tokens([AddedToken(w, single_word=True, normalized=False) for w in sorted(set(words))])
    return tokenizer
