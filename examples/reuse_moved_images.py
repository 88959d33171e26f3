"""Reuse the encoder output and KV cache of images that come back at a new position.

Runs in seconds on a CPU with the embedded tiny model (or a random-weight toy model if absent):
    python examples/reuse_moved_images.py
"""

from vlcache_hf import CacheStore, VLCache
from vlcache_hf.compat import with_cache
from vlcache_hf.tools import toy
from vlcache_hf.tools.demo import load_demo_model

model, processor, description = load_demo_model()
store = CacheStore()  # shared by every request; one in-memory tier by default
pictures = [toy.make_image(seed) for seed in (1, 2)]

# First request: the images are new, so they are encoded and prefilled, then published to the store.
first = toy.chat_inputs(processor, [toy.message("user", "Two photos:", *pictures, "Describe the first.")])
cache = VLCache(model, store=store, policy="none")
model.generate(**first, max_new_tokens=8, do_sample=False, **with_cache(model, cache))
print("request 1:", cache.report.summary())

# Second request: other text before the images, and the images swapped. Prefix caching cannot help here;
# VLCache reuses both images' encoder output and K/V at their new positions.
second = toy.chat_inputs(processor, [toy.message("user", "A new question about", pictures[1], pictures[0], "Which is brighter?")])
cache = VLCache(model, store=store, policy="none")
out = model.generate(**second, max_new_tokens=8, do_sample=False, **with_cache(model, cache))
print("request 2:", cache.report.summary())
print("answer:", processor.decode(out[0, second["input_ids"].shape[1]:], skip_special_tokens=True))
