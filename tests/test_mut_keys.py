"""Store keys are a persistent format: every key is rebuilt here by hand from blake3 and the byte layout the
docstrings of `vlcache_hf.store.keys` describe (each part length-prefixed, 8 bytes little-endian), never from
the code under test. A changed domain string, part order, separator or header would orphan every stored
entry (or let two different inputs share one): each such change fails here (eval/mutate.py keys)."""

from __future__ import annotations

import json

import blake3
import numpy as np
import pytest
import torch

from vlcache_hf.store import keys


def by_hand(*parts: bytes | str) -> str:
    data = [p.encode() if isinstance(p, str) else p for p in parts]
    return blake3.blake3(b"".join(len(p).to_bytes(8, "little") + p for p in data)).hexdigest()


PIXELS = torch.tensor([[0.5, 1.0, -2.0], [3.0, 4.25, 8.0]])  # float32 [2, 3]


def test_digest_length_prefixes_each_part():
    assert keys.digest("ab", "c") == by_hand(b"ab", b"c")
    assert keys.digest("ab", "c") != keys.digest("a", "bc")
    assert keys.digest(b"\x00\x01", memoryview(b"xyz")) == by_hand(b"\x00\x01", b"xyz")
    assert keys.digest() == blake3.blake3(b"").hexdigest()


def test_tensor_parts_are_header_and_raw_bytes():
    header, data = keys.tensor_parts(PIXELS.t())  # not contiguous: hashed as its contiguous copy
    assert header == b"torch.float32|(3, 2)"
    assert bytes(data) == np.ascontiguousarray(PIXELS.numpy().T).tobytes()


def test_image_keys_by_hand():
    raw = PIXELS.numpy().tobytes()
    assert keys.image_key_from_pixels(PIXELS, (1, 2, 4), "s") == by_hand(
        "image-pixels", "1,2,4", "s", "torch.float32|(2, 3)", raw
    )
    assert keys.image_key_from_pixels(PIXELS, torch.tensor([1, 2, 4])) == by_hand(
        "image-pixels", "1,2,4", "", "torch.float32|(2, 3)", raw
    )
    assert keys.image_key_from_seen(PIXELS, "cfg") == by_hand("image-seen", "cfg", "torch.float32|(2, 3)", raw)
    seen = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    assert keys.image_key_from_seen(seen, "cfg") == by_hand("image-seen", "cfg", "uint8|(2, 2, 3)", seen.tobytes())
    assert keys.image_key_from_seen(seen[:, ::-1], "cfg") == by_hand(
        "image-seen", "cfg", "uint8|(2, 2, 3)", np.ascontiguousarray(seen[:, ::-1]).tobytes()
    )


def test_encoder_options_canonical_text():
    assert keys.encoder_options({}) == "" and keys.encoder_options({"layer": None}) == ""
    tensor_digest = by_hand("tensor", "torch.int64|(2,)", np.array([1, 2], dtype=np.int64).tobytes())
    text = keys.encoder_options({"z": None, "layer": -2, "t": torch.tensor([1, 2]), "pair": (1, 2), "m": {3: "x"}})
    assert text == '{"layer": -2, "m": {"3": "x"}, "pair": [1, 2], "t": "' + tensor_digest + '"}'
    assert keys.encoder_options({"s": {1}}) == json.dumps({"s": repr({1})})  # not JSON: its repr
    # the same options given in another order are the same options, nested mappings included
    assert keys.encoder_options({"m": {"b": 1, "a": 2}}) == keys.encoder_options({"m": {"a": 2, "b": 1}}) == '{"m": {"a": 2, "b": 1}}'
    assert keys.with_encoder_options("k", "") == "k"
    assert keys.with_encoder_options("k", text) == by_hand("encoder-options", "k", text)


def test_fingerprint_and_entry_keys_by_hand():
    assert keys.model_fingerprint("{}", "w", "torch.float32", "0.1") == by_hand("model", "{}", "w", "torch.float32", "0.1")
    for kind in ("enc", "kv", "pfx", "alias"):
        assert keys.entry_key(kind, "fp", "c") == f"{kind}-" + by_hand(kind, "fp", "c")
    with pytest.raises(ValueError, match=r"unknown entry kind 'img'; expected one of \('enc', 'kv', 'pfx', 'alias'\)"):
        keys.entry_key("img", "fp", "c")
    assert keys.prefix_root("fp") == by_hand("prefix-root", "fp")


def test_prefix_chain_by_hand():
    tokens = [5, 6, 7, 8, 9]
    root = by_hand("prefix-root", "fp")
    first = by_hand(root, '["5", "img"]')
    second = by_hand(first, '["7", "8"]')
    assert keys.chain_prefix_hashes("fp", tokens, {1: "img"}, 2) == [first, second]  # token 9: no full chunk
    assert keys.chain_prefix_hashes("fp", tokens[:1], {}, 2) == []

    positions = torch.tensor([[0, 1, 2, 3, 4]])
    visible = torch.tensor([False, True, True, True, True])
    pos0, vis0 = positions[:, 0:2].numpy().tobytes(), visible[0:2].numpy().tobytes()
    expected = by_hand(root, '["5", "img"]', "positions", "torch.int64|(1, 2)", pos0, "visible", "torch.bool|(2,)", vis0)
    assert keys.chain_prefix_hashes("fp", tokens, {1: "img"}, 2, positions, visible)[0] == expected


def test_context_hashes_by_hand():
    assert keys.CONTEXT_BLOCK == 64
    tokens = list(range(100, 170))  # 70 tokens: one full block of 64, then 6
    items = [str(t) for t in tokens]
    root = by_hand("prefix-root", "fp")
    block = by_hand(root, json.dumps(items[:64]))
    got = keys.context_hashes("fp", tokens, {}, [70, 3, 64, 3])
    assert got == {
        3: by_hand("context", root, json.dumps(items[:3])),
        64: by_hand("context", block, "[]"),
        70: by_hand("context", block, json.dumps(items[64:70])),
    }
    # the prefix chain at chunk size 64 is the same block chain: passing it changes nothing
    chain = keys.chain_prefix_hashes("fp", tokens, {}, keys.CONTEXT_BLOCK)
    assert chain == [block]
    assert keys.context_hashes("fp", tokens, {}, [70], block_hashes=chain) == {70: got[70]}
    positions = torch.arange(70).view(1, 70) * 2
    visible = torch.arange(70) % 3 != 0

    def parts(a: int, b: int) -> list:
        return [json.dumps(items[a:b]), "positions", f"torch.int64|(1, {b - a})", positions[:, a:b].numpy().tobytes(),
                "visible", f"torch.bool|({b - a},)", visible[a:b].numpy().tobytes()]

    block = by_hand(root, *parts(0, 64))
    assert keys.context_hashes("fp", tokens, {}, [3, 66], positions, visible) == {
        3: by_hand("context", root, *parts(0, 3)),
        66: by_hand("context", block, *parts(64, 66)),
    }
