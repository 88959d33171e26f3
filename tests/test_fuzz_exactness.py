"""Differential exactness fuzzing in CI: random request sequences, every promised equality against plain generate.

The strategy and the runner live in eval/fuzz_exactness.py (the long campaign: `--examples 5000`); CI runs a
bounded, derandomized number of the same scenarios over all six toy families, so a failure here replays
identically. A failing scenario is printed by Hypothesis and replays with
`python eval/fuzz_exactness.py --replay '<Scenario(...)>'`; the campaign shrinks failures to minimal ones.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from vlcache_hf.tools import toy

_PATH = Path(__file__).resolve().parents[1] / "eval" / "fuzz_exactness.py"
_spec = importlib.util.spec_from_file_location("fuzz_exactness", _PATH)
fuzz = importlib.util.module_from_spec(_spec)
sys.modules["fuzz_exactness"] = fuzz  # dataclasses resolve their module by name
_spec.loader.exec_module(fuzz)

EXAMPLES_PER_FAMILY = 40  # 240 scenarios, ≈ 500 requests: ~45 s on 2 quiet cores


@pytest.mark.parametrize("family", toy.FAMILIES)
@settings(
    max_examples=EXAMPLES_PER_FAMILY,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],  # shrinking is the campaign's job: a failing CI run stays bounded
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_every_promised_equality_holds(family, data):
    scenario = data.draw(fuzz.scenarios([family]), label="scenario")
    result = fuzz.run_scenario(scenario)
    wrong = [f"step {c.step} [{c.kind}] {c.detail} (max logit diff {c.max_diff:.3e})" for c in result.failures]
    assert not wrong, "\n".join(wrong)


def test_compare_flags_a_logit_change_beyond_tolerance():
    """The comparison itself: the same run passes, a logit moved by 10x the tolerance does not."""
    model, processor = fuzz.toy_pair("qwen2_5_vl")
    inputs = processor(text=["<|im_start|>user\nhello<|im_end|>\n"], return_tensors="pt")
    plain = fuzz._generate(model, inputs, "qwen2_5_vl")
    length = inputs["input_ids"].shape[1]
    assert fuzz.compare(plain, plain, length) == (True, 0.0, "")
    moved = type(plain)(**{**plain, "logits": tuple(t.clone() for t in plain.logits)})
    moved.logits[1][0, 7] += 10 * fuzz.TOLERANCE
    ok, diff, detail = fuzz.compare(plain, moved, length)
    assert not ok and diff >= 9 * fuzz.TOLERANCE and detail.startswith("logits: step 1")


def test_palette_images_share_index_bytes_but_not_pictures():
    """The pool can draw two palette images that only a keying by picture (not by index bytes) tells apart."""
    a = fuzz.ImageSpec(1, 56, 56, "P", palette=0).render()
    b = fuzz.ImageSpec(1, 56, 56, "P", palette=1).render()
    assert a.tobytes() == b.tobytes()
    assert a.convert("RGB").tobytes() != b.convert("RGB").tobytes()
