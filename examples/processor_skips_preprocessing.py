"""VLCacheProcessor: a stored image is neither preprocessed nor encoded again.

    python examples/processor_skips_preprocessing.py
"""

from vlcache_hf import CacheStore, VLCache, VLCacheProcessor
from vlcache_hf.compat import with_cache
from vlcache_hf.tools import toy
from vlcache_hf.tools.demo import load_demo_model

model, processor, _ = load_demo_model()
store = CacheStore()
wrapped = VLCacheProcessor(processor, model, store)  # behaves like the processor it wraps
photos = [toy.make_image(21), toy.make_image(22)]
for question in ("Which photo is brighter?", "Now describe the second one."):
    text = wrapped.apply_chat_template([toy.message("user", *photos, question)], add_generation_prompt=True)
    inputs = wrapped(text=text, images=photos)  # pixels only for images the store lacks
    cache = VLCache(model, store=store)
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False, **with_cache(model, cache))
    print(f"stored images: {wrapped.last_hits}; {cache.report.summary()}")
