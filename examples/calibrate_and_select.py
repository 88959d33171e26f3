"""Calibrate a model's per-layer sensitivity once, then serve moved images with the `vlcache` policy.

    python examples/calibrate_and_select.py

With the embedded trained model (or a random-weight toy model if absent), on CPU in under a minute:
1. `calibrate` measures, on a few requests whose images were seen before in another context, how much the
   first answer token moves when reused K/V is used from each layer on; the `LayerProfile` is saved as JSON
   (the CLI equivalent is `vlcache calibrate --out profile.json`);
2. a request with moved images runs with `policy="vlcache"` at a 5 % budget and the profile, and is compared
   with full recomputation and with naive reuse.
"""

import random

from vlcache_hf import CacheStore, LayerProfile, calibrate
from vlcache_hf.probe import chat_inputs, kl_divergence, moved_image_request, run_probe, warm_store
from vlcache_hf.tools import synthetic
from vlcache_hf.tools.demo import load_demo_model

model, processor, description = load_demo_model()
print("model:", description)

# 1. calibrate on 4 samples of 3 pictures, save, load back
samples = [[synthetic.render(scene) for scene in item.scenes] for item in synthetic.make_split("validation", 4)]
profile = calibrate(model, processor, samples, seed=0)
profile.save("/tmp/vlcache_profile.json")
profile = LayerProfile.load("/tmp/vlcache_profile.json")
print("remaining error by layer:", [f"{w:.2e}" for w in profile.remaining_error])
print("layer budgets for 64 moved tokens at 5 %:", profile.budgets(64, 0.05))

# 2. a moved-image request: the images were first seen shuffled, after another preamble
item = synthetic.make_split("test", 1)[0]
images = [synthetic.render(scene) for scene in item.scenes]
request = moved_image_request(images, random.Random(0), probe=synthetic.messages(item, images))
store = CacheStore()
warm_store(model, chat_inputs(processor, request.warmup), store)
inputs = chat_inputs(processor, request.probe)
full = run_probe(model, inputs, store, "full", max_new_tokens=2)
for policy, ratio in (("none", 0.0), ("vlcache", 0.05)):
    out = run_probe(model, inputs, store, policy, ratio, profile=profile, max_new_tokens=2)
    answer = processor.tokenizer.decode(out.tokens, skip_special_tokens=True)
    print(
        f"{policy:8s} answer {answer!r:10} KL(full‖{policy}) {kl_divergence(full.logits, out.logits):.2e}  "
        f"per-layer tokens {out.cache.report.recomputed_per_layer}  ({out.cache.report.allocation or 'no budgets'})"
    )
print("question:", item.question, "| expected:", item.answer)
