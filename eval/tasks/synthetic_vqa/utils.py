"""lmms-eval hooks of the local `synthetic_vqa` tasks (data: eval/synthetic/data/*.parquet).

Each doc is one item of `vlcache_hf.tools.synthetic`: a preamble, 2–3 small labelled pictures, then a
question and an instruction. `doc_to_text` is the text of `synthetic.messages(item)` (the prompt the
embedded model was trained on, rebuilt from the doc's `record`) with one `<image>` placeholder where each
picture goes (lmms-eval's convention; the `vlcache` model puts the pictures there). The score is exact match
of the lowercased first word of the model's answer with the one-word gold answer.
"""

from __future__ import annotations

import json
import re

from vlcache_hf.tools import synthetic

_WORD = re.compile(r"[a-z]+")
_KIND_CHOICES = {
    "color": list(synthetic.COLORS),
    "shape": list(synthetic.SHAPES),
    "count": list(synthetic.NUMBERS),
    "same_color": ["yes", "no"],
}


def doc_to_visual(doc):
    return [image.convert("RGB") for image in doc["images"]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kwargs = lmms_eval_specific_kwargs or {}
    item = synthetic.Item.from_record(json.loads(doc["record"]))
    content = synthetic.messages(item, images=[None] * len(item.scenes))[0]["content"]
    text = "".join("<image>" if part["type"] == "image" else part["text"] for part in content)
    return f"{kwargs.get('pre_prompt', '')}{text}{kwargs.get('post_prompt', '')}"


def first_word(text: str) -> str:
    words = _WORD.findall((text or "").lower())
    return words[0] if words else ""


def process_results(doc, results):
    prediction = results[0] if results else ""
    return {"exact_match": float(first_word(prediction) == doc["answer"].lower())}


# multiple choice (`synthetic_vqa_mc`, scored by loglikelihood): the answer words a question of this kind allows


def doc_to_choice(doc):
    if doc["kind"] == "which":
        return list(synthetic.ORDINALS[: int(doc["num_images"])])
    return list(_KIND_CHOICES[doc["kind"]])


def doc_to_target(doc):
    return doc_to_choice(doc).index(doc["answer"])
