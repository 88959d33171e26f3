"""A multi-turn chat where every turn re-sends the conversation: earlier turns come back as an exact prefix.

    python examples/multi_turn_chat.py
"""

from vlcache_hf import CacheStore, VLCache
from vlcache_hf.compat import with_cache
from vlcache_hf.tools import toy
from vlcache_hf.tools.demo import load_demo_model

model, processor, description = load_demo_model()
store = CacheStore()
chat = [toy.message("user", "My photos:", toy.make_image(5), toy.make_image(6), "What is in the first one?")]
for question in ("And the second?", "Which one is darker?"):
    inputs = toy.chat_inputs(processor, chat)
    cache = VLCache(model, store=store, policy="none", prefix_chunk_size=16)
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False, **with_cache(model, cache))
    answer = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    print(f"{cache.report.summary()}\n  -> {answer!r}")
    chat += [toy.message("assistant", answer), toy.message("user", question)]
