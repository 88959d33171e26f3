"""Request state belongs to the `generate` call: caches never cross, failures and copies leave the model as it was.

Every output is compared with an identical toy model that vlcache-hf never touched (`reference`), so an
expected value never comes from the code under test.
"""

from __future__ import annotations

import copy
import io
import threading

import pytest
import torch
from helpers import EncoderCounter, greedy
from transformers import LogitsProcessor, LogitsProcessorList

from vlcache_hf import CacheStore, VLCache
from vlcache_hf.models import get_adapter
from vlcache_hf.selection import SelectionContext, SelectionPolicy
from vlcache_hf.store.keys import ENCODER_KIND
from vlcache_hf.tools import toy

FAMILY = "qwen2_5_vl"


@pytest.fixture(scope="module")
def subject():
    """The model vlcache-hf is used on (its own instance: these tests copy, save and break it)."""
    return toy.build_model(FAMILY), toy.build_processor(FAMILY)


@pytest.fixture(scope="module")
def reference():
    """An identical model vlcache-hf never sees: the source of every expected output."""
    return toy.build_model(FAMILY)


def _inputs(processor, images, image: int, text: str = "What is it?"):
    return toy.chat_inputs(processor, [toy.message("user", images[image], text)])


def _keys(store: CacheStore) -> set[str]:
    return {key for tier in store.tiers for key in tier.keys()}


def _encoder_keys(store: CacheStore) -> set[str]:
    return {key for key in _keys(store) if key.startswith(ENCODER_KIND + "-")}


def _assert_same(expected, actual) -> None:
    assert torch.equal(expected.sequences, actual.sequences)
    assert (expected.scores[0] - actual.scores[0]).abs().max() < 1e-4


@pytest.mark.parametrize("created", ["used_first_created_first", "used_first_created_last"])
def test_caches_created_before_either_runs_keep_their_own_calls(subject, reference, images, created):
    model, processor = subject
    store_a, store_b = CacheStore(), CacheStore()
    if created == "used_first_created_first":
        cache_a = VLCache(model, store=store_a)
        cache_b = VLCache(model, store=store_b)
    else:
        cache_b = VLCache(model, store=store_b)
        cache_a = VLCache(model, store=store_a)
    inputs_a, inputs_b = _inputs(processor, images, 0), _inputs(processor, images, 1)

    _assert_same(greedy(reference, inputs_a), greedy(model, inputs_a, cache_a))
    assert _keys(store_b) == set()  # another tenant's store never sees this call's image
    assert len(_encoder_keys(store_a)) == 1 and cache_a.report.encoder_misses == 1
    _assert_same(greedy(reference, inputs_b), greedy(model, inputs_b, cache_b))
    assert len(_encoder_keys(store_b)) == 1 and cache_b.report.encoder_misses == 1
    assert _encoder_keys(store_a).isdisjoint(_encoder_keys(store_b))

    # a later plain generate writes into no store
    before_a, before_b = _keys(store_a), _keys(store_b)
    _assert_same(
        greedy(reference, _inputs(processor, images, 2)), greedy(model, _inputs(processor, images, 2))
    )
    assert (_keys(store_a), _keys(store_b)) == (before_a, before_b)


@pytest.mark.parametrize("other_created", ["before", "after"])
def test_exact_repeat_hits_whatever_other_caches_exist(subject, reference, images, other_created):
    model, processor = subject
    store = CacheStore()
    inputs = _inputs(processor, images, 3, "Describe this picture in detail, please.")
    greedy(model, inputs, VLCache(model, store=store, prefix_chunk_size=8))
    unused = VLCache(model, store=CacheStore()) if other_created == "before" else None
    repeat = VLCache(model, store=store, prefix_chunk_size=8)
    unused = unused or VLCache(model, store=CacheStore())

    _assert_same(greedy(reference, inputs), greedy(model, inputs, repeat))
    assert repeat.report.encoder_hits == 1 and repeat.report.encoder_misses == 0
    assert repeat.report.prefix_tokens >= 8
    assert _keys(unused.store) == set()


def test_a_cache_never_used_has_no_effect(subject, reference, images):
    model, processor = subject
    unused = VLCache(model, store=CacheStore())
    inputs = _inputs(processor, images, 4)
    _assert_same(greedy(reference, inputs), greedy(model, inputs))
    assert _keys(unused.store) == set()


def test_threads_on_one_model_never_cross_stores(subject, reference, images):
    model, processor = subject
    workers = 3
    inputs = [_inputs(processor, images, i) for i in range(workers)]
    expected = [greedy(reference, x) for x in inputs]
    stores = [CacheStore() for _ in range(workers)]
    reports: dict[tuple[int, int], object] = {}
    outputs: dict[tuple[int, int], object] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(workers)

    def serve(worker: int) -> None:
        try:
            for round_ in range(2):
                cache = VLCache(model, store=stores[worker], prefix_chunk_size=8)
                barrier.wait()  # every thread's cache exists before any of them generates
                outputs[worker, round_] = greedy(model, inputs[worker], cache)
                reports[worker, round_] = cache.report
        except BaseException as err:  # noqa: BLE001 - reported below, in the test's thread
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=serve, args=(w,)) for w in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    for worker in range(workers):
        assert len(_encoder_keys(stores[worker])) == 1
        assert (reports[worker, 0].encoder_misses, reports[worker, 1].encoder_hits) == (1, 1)
        for round_ in range(2):
            _assert_same(expected[worker], outputs[worker, round_])
    encoder_keys = [_encoder_keys(store) for store in stores]
    assert len(set.union(*encoder_keys)) == workers
    # overlapping prefills leave the model's own attention in place (later prefills over a cache depend on it)
    assert get_adapter(model).attention_config()._attn_implementation == "sdpa"


def test_asyncio_tasks_on_one_model_keep_their_own_caches(subject, reference, images):
    """Servers call `generate` from asyncio tasks via `asyncio.to_thread`, which copies the task's context into
    the worker thread: each call must still see only the cache it was handed."""
    import asyncio

    model, processor = subject
    workers = 3
    inputs = [_inputs(processor, images, i) for i in range(workers)]
    expected = [greedy(reference, x) for x in inputs]
    stores = [CacheStore() for _ in range(workers)]

    async def serve(worker: int):
        caches = [VLCache(model, store=stores[worker], prefix_chunk_size=8) for _ in range(2)]  # made up front
        outputs = []
        for cache in caches:
            outputs.append(await asyncio.to_thread(greedy, model, inputs[worker], cache))
            await asyncio.sleep(0)  # let the other tasks' calls interleave with this one's
        return outputs, [cache.report for cache in caches]

    async def main():
        return await asyncio.gather(*(serve(w) for w in range(workers)))

    results = asyncio.run(main())
    for worker, (outputs, reports) in enumerate(results):
        assert (reports[0].encoder_misses, reports[1].encoder_hits) == (1, 1)
        for output in outputs:
            _assert_same(expected[worker], output)
    encoder_keys = [_encoder_keys(store) for store in stores]
    assert all(len(keys) == 1 for keys in encoder_keys) and len(set.union(*encoder_keys)) == workers


class _FaultyStore(CacheStore):
    """A real in-memory store whose lookups or writes raise while `failing` is set (fault injection)."""

    def __init__(self, fail_on: str):
        super().__init__()
        self.fail_on, self.failing, self.calls = fail_on, True, 0

    def get(self, key):
        self.calls += 1
        if self.failing and self.fail_on == "get":
            raise RuntimeError("injected store failure")
        return super().get(key)

    def put(self, key, entry):
        self.calls += 1
        if self.failing and self.fail_on == "put":
            raise RuntimeError("injected store failure")
        return super().put(key, entry)


class _FaultyPolicy(SelectionPolicy):
    """A policy that raises when asked for its recompute set: the cache's buffers are loaded by then."""

    name = "faulty-test-policy"

    def initial_set(self, ctx: SelectionContext) -> torch.Tensor:
        raise RuntimeError("injected policy failure")


def _raise(*args) -> None:
    raise RuntimeError("injected encoder failure")


def _raise_in_forward(*args) -> None:
    raise RuntimeError("injected failure in the model's own forward")


@pytest.mark.parametrize("phase", ["encoder", "store_lookup", "selective_prefill", "model_forward", "publish"])
def test_failed_generate_leaves_model_and_store_as_they_were(subject, reference, images, phase):
    model, processor = subject
    store: CacheStore = _FaultyStore(
        "get" if phase == "store_lookup" else "put" if phase == "publish" else "none"
    )
    warm = _inputs(processor, images, 0, "First look.")
    store.failing = False
    greedy(model, warm, VLCache(model, store=store, prefix_chunk_size=8))
    store.failing = phase in ("store_lookup", "publish")
    before = _keys(store)

    policy: str | SelectionPolicy = "none"
    handle = None
    if phase == "encoder":
        handle = get_adapter(model).vision_tower.register_forward_pre_hook(_raise)
    if phase == "model_forward":  # the final norm runs in the model's forward over the prompt's tail, not before
        handle = model.model.language_model.norm.register_forward_pre_hook(_raise_in_forward)
    if phase == "selective_prefill":
        policy = _FaultyPolicy(0.0)
    inputs = toy.chat_inputs(processor, [toy.message("user", images[0], images[5], "Two of them?")])
    failed = VLCache(model, store=store, policy=policy, prefix_chunk_size=8)
    try:
        with pytest.raises(RuntimeError, match="injected"):
            greedy(model, inputs, failed)
    finally:
        if handle is not None:
            handle.remove()
        store.failing = False

    assert _keys(store) == before  # nothing of the failed call was published
    assert failed.get_seq_length() == 0  # and the cache holds nothing half-filled
    calls = store.calls
    _assert_same(greedy(reference, inputs), greedy(model, inputs))
    assert store.calls == calls  # the next plain generate never touches the store
    _assert_same(
        greedy(reference, inputs), greedy(model, inputs, VLCache(model, store=store, prefix_chunk_size=8))
    )


class _RaisingLogitsProcessor(LogitsProcessor):
    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("injected decoding failure")


def test_failure_while_decoding_leaves_model_as_it_was(subject, reference, images):
    """After the prefill succeeded its entries are published (they are exact); the model is left as it was."""
    model, processor = subject
    store = CacheStore()
    inputs = _inputs(processor, images, 5, "Decode this.")
    failing = LogitsProcessorList([_RaisingLogitsProcessor()])
    with pytest.raises(RuntimeError, match="injected decoding failure"):
        greedy(model, inputs, VLCache(model, store=store, prefix_chunk_size=8), logits_processor=failing)
    _assert_same(greedy(reference, inputs), greedy(model, inputs))
    repeat = VLCache(model, store=store, prefix_chunk_size=8)
    _assert_same(greedy(reference, inputs), greedy(model, inputs, repeat))
    assert repeat.report.encoder_hits == 1 and repeat.report.prefix_tokens >= 8


def _perturb_vision(model) -> None:
    with torch.no_grad():
        for parameter in get_adapter(model).vision_tower.parameters():
            parameter.add_(0.05 * torch.ones_like(parameter))


def test_model_deepcopy_after_use_is_independent(subject, reference, images):
    model, processor = subject
    inputs = _inputs(processor, images, 2)
    greedy(model, inputs, VLCache(model, store=CacheStore()))

    clone = copy.deepcopy(model)
    _perturb_vision(clone)
    changed_reference = copy.deepcopy(reference)
    _perturb_vision(changed_reference)
    expected = greedy(changed_reference, inputs)
    _assert_same(expected, greedy(clone, inputs))  # the copy's encoder is the copy's vision tower
    _assert_same(expected, greedy(clone, inputs, VLCache(clone, store=CacheStore(), policy="full")))
    _assert_same(greedy(reference, inputs), greedy(model, inputs))  # the original is untouched


def test_model_torch_save_after_use(subject, reference, images):
    model, processor = subject
    inputs = _inputs(processor, images, 1)
    store = CacheStore()
    greedy(model, inputs, VLCache(model, store=store))

    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    _assert_same(greedy(reference, inputs), greedy(loaded, inputs))

    counter = EncoderCounter(get_adapter(loaded).vision_tower)
    try:
        cache = VLCache(loaded, store=store, policy="full")
        _assert_same(greedy(reference, inputs), greedy(loaded, inputs, cache))
        assert counter.calls == 0 and cache.report.encoder_hits == 1
    finally:
        counter.close()


def test_deepcopy_of_a_prompt_cache_reuses_it_like_dynamic_cache(subject, reference, images):
    """transformers' recipe: prefill a prompt once, `deepcopy` its cache for each continuation."""
    model, processor = subject
    store = CacheStore()
    prompt = _inputs(processor, images, 3)
    prompt_cache = VLCache(model, store=store)
    with torch.no_grad():
        model(**prompt, past_key_values=prompt_cache)
    length = prompt_cache.get_seq_length()
    assert length == prompt["input_ids"].shape[1]
    snapshot = [(layer.keys.clone(), layer.values.clone()) for layer in prompt_cache.layers]

    pixels = {
        k: v for k, v in prompt.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")
    }
    for question in ("Is it red?", "How many shapes?"):
        extra = processor.tokenizer(question, return_tensors="pt")["input_ids"]
        ids = torch.cat([prompt["input_ids"], extra], dim=1)
        token_types = torch.zeros_like(ids)
        token_types[:, :length] = prompt["mm_token_type_ids"]
        fork = copy.deepcopy(prompt_cache)
        assert (
            fork.model is model
            and fork.store is store
            and fork.layers[0].keys is not prompt_cache.layers[0].keys
        )
        ours = model.generate(
            input_ids=ids,
            mm_token_type_ids=token_types,
            past_key_values=fork,
            max_new_tokens=4,
            do_sample=False,
        )
        plain = reference.generate(
            input_ids=ids, mm_token_type_ids=token_types, max_new_tokens=4, do_sample=False, **pixels
        )
        assert torch.equal(ours, plain)
        assert prompt_cache.get_seq_length() == length
        for layer, (keys, values) in zip(prompt_cache.layers, snapshot, strict=True):
            assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)


def test_append_after_crop_leaves_earlier_tensors_alone(subject, images):
    """As with a `DynamicCache`, a tensor the cache handed out before `crop` never changes afterwards."""
    model, processor = subject
    prompt = _inputs(processor, images, 4)
    cache = VLCache(model, store=CacheStore())
    with torch.no_grad():
        model(**prompt, past_key_values=cache)
        held = [(layer.keys, layer.values) for layer in cache.layers]
        snapshot = [(k.clone(), v.clone()) for k, v in held]
        length = cache.get_seq_length()
        cache.crop(-3)
        assert cache.get_seq_length() == length - 3
        model(input_ids=torch.tensor([[7, 8]]), past_key_values=cache)
    assert cache.get_seq_length() == length - 1
    for (keys, values), (k0, v0) in zip(held, snapshot, strict=True):
        assert torch.equal(keys, k0) and torch.equal(values, v0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_forward_beside_a_selective_prefill_is_the_models_own(attn):
    """While one thread's selective prefill has the shared attention config switched, another thread's ordinary
    forward over a cache (several new tokens after cached ones: it needs a causal mask offset by the cache) must
    compute what the model's own implementation computes. Expected logits come from the untouched reference."""
    from transformers import DynamicCache

    from vlcache_hf.attention import backend_for, selective_attention_enabled

    model, reference = (toy.build_model(FAMILY, attn_implementation=attn) for _ in range(2))
    ids = toy.build_processor(FAMILY).tokenizer("a few words of text after a cached start", return_tensors="pt")["input_ids"]
    split = ids.shape[1] // 2

    def two_steps(m) -> torch.Tensor:
        cache = DynamicCache(config=m.config)
        with torch.no_grad():
            m(input_ids=ids[:, :split], past_key_values=cache, use_cache=True)
            return m(input_ids=ids[:, split:], past_key_values=cache, use_cache=True).logits

    expected = two_steps(reference)
    got: list[torch.Tensor] = []
    config = get_adapter(model).attention_config()
    with selective_attention_enabled(config, backend_for(model.device, attn)):  # another thread's prefill
        assert config._attn_implementation != attn
        worker = threading.Thread(target=lambda: got.append(two_steps(model)))
        worker.start()
        worker.join(timeout=60)
    assert config._attn_implementation == attn
    assert (got[0] - expected).abs().max() < 1e-5
