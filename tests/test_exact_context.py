"""Exact K/V reuse means exact: stored K/V is used as exact only in the context it was computed in.

Every promised equality is checked against the unmodified model's own `generate` (float32, greedy tokens
equal, logits within 1e-4): an exact repeat and a chat continuation with policy "none" — also when the
prompt shows one image twice, and when another request showed that image elsewhere in between; inputs that
change positions (padding, video timing) are part of every key; an entry is served only under its own key.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_same_as_plain, greedy

from vlcache_hf import CacheStore, VLCache
from vlcache_hf.plan import find_image_spans, plan_prefill
from vlcache_hf.store.keys import CONTEXT_BLOCK, chain_prefix_hashes, context_hashes
from vlcache_hf.tools import toy

PREAMBLE = "Please look very carefully, and take your time, at the first picture here:"




def image_rows(model, inputs) -> list[int]:
    return (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten().tolist()


def duplicate_prompt(processor, image, preamble: str = PREAMBLE, question: str = "Same?"):
    return toy.chat_inputs(processor, [toy.message("user", preamble, image, "and this one:", image, question)])


def chunk_inside_first_image(model, inputs) -> int:
    """A prefix chunk size whose only full chunk of the prompt ends inside the image's first occurrence."""
    rows = image_rows(model, inputs)
    chunk = rows[0] + 2
    num_tokens = inputs["input_ids"].shape[1] - 1
    assert num_tokens // chunk == 1 and rows[-1] >= chunk, "the prompt layout no longer puts the chunk end in the image"
    return chunk


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
@pytest.mark.parametrize("in_between", [False, True])
def test_duplicate_image_exact_repeat_equals_plain(models, images, family, in_between):
    """The chunk ends inside the first occurrence; the rest of both occurrences must be their own K/V, not the
    other occurrence's (nor that of a policy-"full" request that showed the image elsewhere meanwhile)."""
    model, processor = models(family)
    store = CacheStore()
    inputs = duplicate_prompt(processor, images[0])
    chunk = chunk_inside_first_image(model, inputs)
    greedy(model, inputs, VLCache(model, store=store, policy="none", prefix_chunk_size=chunk))
    if in_between:
        elsewhere = toy.chat_inputs(processor, [toy.message("user", "Something else first.", images[0], "Hm?")])
        greedy(model, elsewhere, VLCache(model, store=store, policy="full", prefix_chunk_size=chunk))

    cache = assert_same_as_plain(model, inputs, lambda: VLCache(model, store=store, policy="none", prefix_chunk_size=chunk))
    report, num_tokens = cache.report, inputs["input_ids"].shape[1] - 1
    # the chunk, then the tail: both occurrences' rows past the chunk come from their own exact entries
    assert (report.prefix_tokens, report.exact_span_tokens, report.moved_tokens) == (num_tokens, 0, 0)
    assert report.kv_hits == 2 and report.reused_tokens == num_tokens

    # another question after the same images: no tail fits, the image rows past the chunk are exact spans
    other = duplicate_prompt(processor, images[0], question="And now?")
    cache = assert_same_as_plain(model, other, lambda: VLCache(model, store=store, policy="none", prefix_chunk_size=chunk))
    report, num_tokens = cache.report, other["input_ids"].shape[1] - 1
    past_prefix = sum(1 for row in image_rows(model, other) if chunk <= row < num_tokens)
    assert (report.prefix_tokens, report.exact_span_tokens, report.moved_tokens) == (chunk, past_prefix, 0)
    assert report.kv_hits == 2 and report.reused_tokens == chunk + past_prefix


def test_duplicate_image_repeat_with_another_chunk_size_is_exact(models, images):
    """Image K/V is exact by its context alone, whatever prefix chunk size either request used."""
    model, processor = models("qwen2_5_vl")
    store = CacheStore()
    inputs = duplicate_prompt(processor, images[3], "Two:")
    greedy(model, inputs, VLCache(model, store=store, policy="full", prefix_chunk_size=2))
    cache = assert_same_as_plain(model, inputs, lambda: VLCache(model, store=store, policy="none", prefix_chunk_size=1000))
    assert cache.report.prefix_tokens == 0 and cache.report.moved_tokens == 0
    assert cache.report.exact_span_tokens == len(image_rows(model, inputs))


def test_duplicate_image_chat_continuation_equals_plain(models, images):
    """Turn 2 = turn 1's prompt + an answer + a new question: turn 1's images are exact where they were."""
    model, processor = models("qwen2_5_vl")
    store = CacheStore()
    turn1 = [toy.message("user", PREAMBLE, images[1], "and this one:", images[1], "Same?")]
    first = toy.chat_inputs(processor, turn1)
    chunk = chunk_inside_first_image(model, first)
    greedy(model, first, VLCache(model, store=store, policy="none", prefix_chunk_size=chunk))

    turn2 = turn1 + [toy.message("assistant", "They look alike."), toy.message("user", "And the colours?")]
    second = toy.chat_inputs(processor, turn2)
    n1 = first["input_ids"].shape[1]
    assert torch.equal(second["input_ids"][0, :n1], first["input_ids"][0])
    cache = assert_same_as_plain(model, second, lambda: VLCache(model, store=store, policy="none", prefix_chunk_size=chunk))
    # all turn 1 prefilled — the chunk and the tail after it, both occurrences' rows from their own entries
    assert cache.report.prefix_tokens == n1 - 1 and cache.report.moved_tokens == 0
    assert cache.report.exact_span_tokens == 0 and cache.report.kv_hits == 2


def test_image_in_another_context_is_reported_as_moved(models, images):
    model, processor = models("qwen2_5_vl")
    store = CacheStore()
    greedy(model, duplicate_prompt(processor, images[2]), VLCache(model, store=store, prefix_chunk_size=16))
    moved = toy.chat_inputs(processor, [toy.message("user", "Other words.", images[2], "and", images[5], "What?")])
    cache = VLCache(model, store=store, policy="none", prefix_chunk_size=16)
    greedy(model, moved, cache)
    tokens = len(image_rows(model, moved)) // 2
    assert (cache.report.moved_tokens, cache.report.exact_span_tokens, cache.report.kv_hits) == (tokens, 0, 1)
    # image 5 was computed after a moved image, so its K/V is approximate too: stored as a moved candidate only,
    # so a repeat of this request finds both images moved, neither exact
    repeat = VLCache(model, store=store, policy="none", prefix_chunk_size=16)
    greedy(model, moved, repeat)
    assert (repeat.report.moved_tokens, repeat.report.exact_span_tokens, repeat.report.kv_hits) == (2 * tokens, 0, 2)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_left_padding_is_part_of_every_key(models, images, family):
    """Same token ids, other attention mask: positions differ, so no prefix chunk or image context matches."""
    model, processor = models(family)
    store = CacheStore()
    inputs = toy.chat_inputs(processor, [toy.message("user", "Three pads, then a long question:", images[3], "Why?")])
    pad = processor.tokenizer.pad_token_id
    ids = torch.cat([torch.full((1, 3), pad), inputs["input_ids"]], dim=1)
    unpadded = {**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
    padded = {**unpadded, "attention_mask": torch.cat([torch.zeros(1, 3, dtype=torch.long), inputs["attention_mask"]], 1)}
    if "mm_token_type_ids" in inputs:
        types = torch.cat([torch.zeros(1, 3, dtype=inputs["mm_token_type_ids"].dtype), inputs["mm_token_type_ids"]], 1)
        unpadded["mm_token_type_ids"] = padded["mm_token_type_ids"] = types
    greedy(model, unpadded, VLCache(model, store=store, policy="none", prefix_chunk_size=16))

    # recomputing every moved token leaves nothing approximate: equal to plain generate
    assert_same_as_plain(model, padded, lambda: VLCache(model, store=store, policy="first_k", recompute_ratio=1.0, prefix_chunk_size=16))
    naive = VLCache(model, store=store, policy="none", prefix_chunk_size=16)
    greedy(model, padded, naive)
    rows = image_rows(model, padded)  # chunks before the image: the padded first_k request's own, exact
    assert naive.report.prefix_tokens <= rows[0] and naive.report.exact_span_tokens == 0
    assert naive.report.moved_tokens == len(rows)
    # once computed exactly (policy "full" publishes under its own positions), the padded request repeats exactly
    greedy(model, padded, VLCache(model, store=store, policy="full", prefix_chunk_size=16))
    repeat = assert_same_as_plain(model, padded, lambda: VLCache(model, store=store, policy="none", prefix_chunk_size=16))
    assert repeat.report.prefix_tokens > 0 and repeat.report.moved_tokens == 0


def test_video_timing_is_part_of_every_key(models, images):
    """Same clip and token ids, other `second_per_grid_ts` (M-RoPE time axis): the other clip's K/V is moved."""
    model, processor = models("qwen2_5_vl")
    store = CacheStore()
    clip = toy.make_video(3)
    inputs = toy.chat_inputs(processor, [toy.message("user", "Watch this:", clip, "What moves?")])
    slow, fast = ({**inputs, "second_per_grid_ts": torch.tensor([seconds])} for seconds in (1.0, 2.0))
    assert (greedy(model, slow).scores[0] - greedy(model, fast).scores[0]).abs().max() > 1e-3, "timing must matter"
    greedy(model, slow, VLCache(model, store=store, policy="none", prefix_chunk_size=16))

    rope = {k: slow[k] for k in ("input_ids", "mm_token_type_ids", "video_grid_thw", "attention_mask")}
    differ = (model.model.get_rope_index(**rope, second_per_grid_ts=slow["second_per_grid_ts"])[0]
              != model.model.get_rope_index(**rope, second_per_grid_ts=fast["second_per_grid_ts"])[0])
    first_moved = int(differ.any(0)[0].nonzero()[0])  # the first frame group sits at time 0 in both
    assert_same_as_plain(model, fast, lambda: VLCache(model, store=store, policy="first_k", recompute_ratio=1.0, prefix_chunk_size=16))
    naive = VLCache(model, store=store, policy="none", prefix_chunk_size=16)
    greedy(model, fast, naive)
    assert 0 < naive.report.prefix_tokens <= first_moved and naive.report.exact_span_tokens == 0
    video_rows = (fast["input_ids"][0] == model.config.video_token_id).nonzero().flatten().tolist()
    assert naive.report.moved_tokens == sum(1 for row in video_rows if row >= naive.report.prefix_tokens)


@pytest.mark.parametrize("kind", ["kv", "enc"])
def test_entry_copied_under_another_key_is_refused(tmp_path, models, images, kind):
    """A disk entry copied onto another image's key is a miss (and dropped), never served."""
    model, processor = models("qwen2_5_vl")
    store = CacheStore(disk=str(tmp_path / "store"))
    tier = store.tiers[-1]
    a, b = (toy.chat_inputs(processor, [toy.message("user", "Hi", images[i], "Describe it.")]) for i in (4, 5))
    greedy(model, a, VLCache(model, store=store, policy="none", prefix_chunk_size=16))
    store.flush()  # the disk tier is written in the background
    keys_a = {k for k in tier.keys() if k.startswith(f"{kind}-")}
    scratch = CacheStore(disk=str(tmp_path / "scratch"))  # learns b's keys without storing b in `store`
    greedy(model, b, VLCache(model, store=scratch, policy="none", prefix_chunk_size=16))
    scratch.flush()
    keys_b = {k for k in scratch.tiers[-1].keys() if k.startswith(f"{kind}-")}
    assert len(keys_a) == len(keys_b) == 1
    (key_a,), (key_b,) = keys_a, keys_b
    tier.put(key_b, tier.get(key_a))  # the very bytes of a's entry, under b's key

    cache = assert_same_as_plain(model, b, lambda: VLCache(model, store=store, policy="none", prefix_chunk_size=16))
    report = cache.report
    store.flush()
    assert (report.exact_span_tokens, report.moved_tokens, report.encoder_hits) == (0, 0, 0)
    assert tier.get(key_b).metadata["key"] == key_b  # the copy was dropped, then b's own entry published


def test_plan_keeps_each_occurrence_of_an_image_apart():
    """One image twice: its first occurrence exact, its second moved; only the moved one may be recomputed, and
    exactness (what may be published as exact) ends where it starts."""
    img = 9
    ids = torch.tensor([[1, img, img, 2, img, img, 3]])
    spans = find_image_spans(ids, img, [2, 2], ["x", "x"])
    plan = plan_prefill(6, spans, 0, span_hits={1: True, 4: False})
    assert [(s.start, s.end) for s in plan.reused_spans] == [(1, 3), (4, 6)]
    assert [(s.start, s.end) for s in plan.moved_spans] == [(4, 6)]
    assert plan.exact_until == 4 and plan.fresh_mask.nonzero().flatten().tolist() == [0, 3]


def test_context_hash_covers_positions_and_mask_but_not_the_chunk_size():
    ids, keys = [1, 2, 9, 9, 3, 4], {2: "x", 3: "x"}
    pos, visible = torch.arange(6)[None], torch.ones(6, dtype=torch.bool)
    base = context_hashes("fp", ids, keys, [4, 6], pos, visible)
    assert context_hashes("fp", ids, keys, [4], pos, visible)[4] == base[4]
    assert context_hashes("fp", ids, keys, [4], pos + 1, visible)[4] != base[4]
    assert context_hashes("fp", ids, keys, [4], pos, torch.tensor([False] + [True] * 5))[4] != base[4]
    assert context_hashes("fp", ids, {2: "y", 3: "y"}, [4], pos, visible)[4] != base[4]
    assert base[4] != base[6]
    assert chain_prefix_hashes("fp", ids, keys, 2, pos, visible) != chain_prefix_hashes("fp", ids, keys, 2, pos + 1, visible)
    # the engine hands over its prefix chain when the chunk size is the context block: the same hashes
    long_ids = list(range(3 * CONTEXT_BLOCK))
    long_pos, long_visible = torch.arange(len(long_ids))[None], torch.ones(len(long_ids), dtype=torch.bool)
    blocks = chain_prefix_hashes("fp", long_ids, {}, CONTEXT_BLOCK, long_pos, long_visible)
    ends = [5, CONTEXT_BLOCK, 2 * CONTEXT_BLOCK + 7]
    assert context_hashes("fp", long_ids, {}, ends, long_pos, long_visible, blocks) == context_hashes(
        "fp", long_ids, {}, ends, long_pos, long_visible
    )


def test_moved_reuse_of_a_duplicated_image_uses_its_first_occurrence(models, images):
    """An image shown twice is stored as its first occurrence's K/V under its content key (the second one's goes
    under content + context), so a later request showing it in another context re-rotates the first occurrence's
    K/V: its values are exactly those the plain model computed at the first occurrence, not at the second (the
    K/V of a 'last write wins' store, which gave other approximate-reuse figures)."""
    model, processor = models("qwen2_5_vl")
    store = CacheStore()
    warmup = duplicate_prompt(processor, images[4])
    greedy(model, warmup, VLCache(model, store=store, policy="full"), max_new_tokens=1)
    moved = toy.chat_inputs(processor, [toy.message("user", "Other words here.", images[4], "What?")])
    cache = VLCache(model, store=store, policy="none", publish=False)
    greedy(model, moved, cache, max_new_tokens=1)
    rows = image_rows(model, warmup)
    tokens = len(rows) // 2
    first, second, here = rows[:tokens], rows[tokens:], image_rows(model, moved)
    assert (cache.report.moved_tokens, cache.report.exact_span_tokens, cache.report.kv_hits) == (tokens, 0, 1)
    with torch.no_grad():
        plain_warmup = model(**warmup, use_cache=True).past_key_values
        plain_moved = model(**moved, use_cache=True).past_key_values
    for layer, (ours, plain) in enumerate(zip(cache.layers, plain_warmup.layers, strict=True)):
        got = ours.values[0, :, here]
        assert (got - plain.values[0, :, first]).abs().max() < 1e-5, layer
        if layer > 0:  # layer 0 sees no context: both occurrences agree there
            assert (got - plain.values[0, :, second]).abs().max() > 1e-3, layer
    # re-rotated to where the image now sits: layer-0 keys (context-free) equal the plain model's at that place
    assert (cache.layers[0].keys[0, :, here] - plain_moved.layers[0].keys[0, :, here]).abs().max() < 1e-5
