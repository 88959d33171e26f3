"""The embedded trained model: loads offline, really answers the synthetic VQA task, and on it the vlcache
policy repairs non-prefix reuse better than naive reuse (all measured here, nothing hard-coded)."""

from __future__ import annotations

import random
from statistics import mean

import pytest
import torch

from vlcache_hf import VLCache
from vlcache_hf.compat import with_cache
from vlcache_hf.probe import Mode, chat_inputs, compare_modes, moved_image_request
from vlcache_hf.tools import synthetic
from vlcache_hf.tools.pretrained import DEFAULT_MODEL_DIR, load_default

#: measured: 62.5 % on the whole test split (eval/synthetic/evaluate.py), 63.3 % on this 60-item slice;
#: chance is about 35 %
SLICE_ACCURACY = 0.6


@pytest.fixture(scope="module")
def trained():
    return load_default()


def test_checkpoint_is_small_and_offline(trained):
    size = sum(path.stat().st_size for path in DEFAULT_MODEL_DIR.iterdir())
    assert size <= 25 * 1024 * 1024
    model, processor = trained
    assert model.config.text_config.hidden_size >= 128 and model.config.text_config.num_hidden_layers >= 4


def test_full_policy_scores_on_a_fixed_test_slice(trained, capsys):
    model, processor = trained
    items = synthetic.make_split("test", 60)
    correct = 0
    for item in items:
        inputs = chat_inputs(processor, synthetic.messages(item))
        cache = VLCache(model, policy="full")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=2, do_sample=False, **with_cache(model, cache))
        answer = processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        correct += answer == item.answer
    accuracy = correct / len(items)
    with capsys.disabled():
        print(f"\n[trained model] policy full, test items 0-59: accuracy {accuracy:.3f}")
    assert accuracy >= SLICE_ACCURACY


def test_vlcache_kl_below_naive_at_5_percent(trained, capsys):
    model, processor = trained
    modes = [Mode("none", "none"), Mode("vlcache", "vlcache", 0.05)]
    rng = random.Random(0)
    kls: dict[str, list[float]] = {"none": [], "vlcache": []}
    for item in synthetic.make_split("test", 16):
        images = [synthetic.render(s) for s in item.scenes]
        request = moved_image_request(images, rng, probe=synthetic.messages(item, images))
        _, results = compare_modes(model, processor, request, modes)
        for result in results:
            kls[result.mode].append(result.kl)
    naive, ours = mean(kls["none"]), mean(kls["vlcache"])
    with capsys.disabled():
        print(f"\n[trained model] KL(full‖·) on 16 moved-image test items: naive {naive:.3e}, vlcache@5% {ours:.3e}")
    assert ours < naive
