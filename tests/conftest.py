"""Tiny models built once per test session (offline, seeded), and small helpers shared by the tests."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import pytest
from helpers import EncoderCounter

from vlcache_hf.models import get_adapter
from vlcache_hf.tools import toy


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


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    """A real redis-server on 127.0.0.1 at a free port, for one test module (CI installs the Debian package)."""
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server must be installed in CI (.ci/run installs the Debian package)")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    pytest.importorskip("redis")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path_factory.mktemp("redis"))],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)
