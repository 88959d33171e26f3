"""Tiny models built once per test session (offline, seeded), and small helpers shared by the tests."""

from __future__ import annotations

import pytest
from helpers import EncoderCounter

from vlcache_hf import toy
from vlcache_hf.models import get_adapter


@pytest.fixture(scope="session", params=["qwen2_5_vl", "qwen2_vl", "qwen3_vl", "llava", "llava_next", "llava_onevision"])
def family(request) -> str:
    return request.param


@pytest.fixture(scope="session", params=["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])
def mrope_family(request) -> str:
    """Families with multimodal RoPE (three position axes)."""
    return request.param


@pytest.fixture(scope="session")
def models():
    """(model, processor) per (family, attention implementation), built lazily and kept for the session."""
    built: dict[tuple[str, str], tuple] = {}

    def get(family: str = "qwen2_5_vl", attn: str = "sdpa"):
        if (family, attn) not in built:
            built[(family, attn)] = (toy.build_model(family, attn_implementation=attn), toy.build_processor(family))
        return built[(family, attn)]

    return get


@pytest.fixture(scope="session")
def images():
    return [toy.make_image(seed) for seed in range(6)]


@pytest.fixture
def encoder_counter():
    counters: list[EncoderCounter] = []

    def make(model) -> EncoderCounter:
        counter = EncoderCounter(get_adapter(model).vision_tower)
        counters.append(counter)
        return counter

    yield make
    for counter in counters:
        counter.close()
