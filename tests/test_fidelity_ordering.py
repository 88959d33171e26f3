"""Fidelity ordering on random-weight models of every family: at a 5 % budget, vlcache's first-token KL
against full recomputation is below naive reuse's and not above a random selection's of the same size.

Measured over the same seeded moved-image requests for all policies (images first seen after another
preamble, in another order); the values are printed so a regression shows its size.
"""

from __future__ import annotations

import random
from statistics import mean

from vlcache_hf.probe import Mode, compare_modes, moved_image_request
from vlcache_hf.tools import toy

MODES = [Mode("none", "none"), Mode("vlcache", "vlcache", 0.05), Mode("random", "random", 0.05)]


def test_vlcache_beats_naive_and_random_at_5_percent(models, family, capsys):
    model, processor = models(family)
    size = 128 if family == "qwen3_vl" else 112
    rng = random.Random(0)
    kls: dict[str, list[float]] = {mode.label: [] for mode in MODES}
    spent: dict[str, list[float]] = {mode.label: [] for mode in MODES}
    for request_index in range(4):
        images = [toy.make_image(100 + 3 * request_index + k, size) for k in range(3)]
        _, results = compare_modes(model, processor, moved_image_request(images, rng), MODES)
        for result in results:
            kls[result.mode].append(result.kl)
            spent[result.mode].append(result.recomputed_fraction)
    kl = {label: mean(values) for label, values in kls.items()}
    with capsys.disabled():
        print(
            f"\n[{family}] KL(full‖·) at 5 %: naive {kl['none']:.3e}, vlcache {kl['vlcache']:.3e}, random {kl['random']:.3e}; "
            f"recomputed: vlcache {mean(spent['vlcache']) * 100:.1f} %, random {mean(spent['random']) * 100:.1f} %"
        )
    assert abs(mean(spent["vlcache"]) - mean(spent["random"])) < 0.01  # equal budgets
    assert kl["vlcache"] < kl["none"]
    assert kl["vlcache"] <= kl["random"]
