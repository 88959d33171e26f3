"""Fingerprint internals on tiny modules, every expected value rebuilt by hand from blake3 and the byte layout
the docstrings describe (eval/mutate.py fingerprint). The end-to-end cases are in test_fingerprint.py."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import blake3
import pytest
import torch
from accelerate import cpu_offload
from torch import nn

import vlcache_hf.fingerprint as fp_module
from vlcache_hf import VLCacheError
from vlcache_hf.fingerprint import fingerprint, weights_digest
from vlcache_hf.store.entry import FORMAT_VERSION


def by_hand(*parts: bytes | str) -> str:
    data = [p.encode() if isinstance(p, str) else p for p in parts]
    return blake3.blake3(b"".join(len(p).to_bytes(8, "little") + p for p in data)).hexdigest()


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(to_dict=lambda: {"b": 1, "a": torch.float32, "_name_or_path": "x",
                                                       "transformers_version": "9", "_attn_implementation_autoset": True})
        self.lin = nn.Linear(2, 1)
        with torch.no_grad():
            self.lin.weight.copy_(torch.tensor([[1.0, -2.0]]))
            self.lin.bias.fill_(0.5)


def _digest_by_hand(model: nn.Module) -> str:
    parts = []
    for name, tensor in sorted(model.state_dict().items()):
        parts += [name, f"{tensor.dtype}|{tuple(tensor.shape)}", tensor.detach().contiguous().numpy().tobytes()]
    return by_hand(*parts)


def test_weights_digest_and_fingerprint_by_hand():
    model = Tiny()
    digest = by_hand("lin.bias", "torch.float32|(1,)", torch.tensor([0.5]).numpy().tobytes(),
                     "lin.weight", "torch.float32|(1, 2)", torch.tensor([[1.0, -2.0]]).numpy().tobytes())
    assert weights_digest(model) == digest
    config = '{"a": "torch.float32", "b": 1}'  # sorted keys, str() for what JSON cannot hold, bookkeeping keys dropped
    assert fp_module._config_json(model) == config
    assert fingerprint(model) == by_hand("model", config, digest, "torch.float32", FORMAT_VERSION)


def test_weights_are_hashed_once_until_they_change(monkeypatch):
    model = Tiny()
    calls = []
    real = fp_module.weights_digest
    monkeypatch.setattr(fp_module, "weights_digest", lambda m: calls.append(1) or real(m))
    first = fingerprint(model)
    assert fingerprint(model) == first and len(calls) == 1  # memoized
    with torch.no_grad():
        model.lin.bias.add_(1.0)  # in place: the version counter moves
    assert fingerprint(model) != first and len(calls) == 2


def test_a_new_view_of_the_same_storage_is_seen():
    """Same storage, same data pointer: only the tensor's identity tells a reshaped weight apart."""
    model = Tiny()
    model.lin = nn.Linear(2, 2)
    before = fingerprint(model)
    weight = model.lin.weight
    model.lin.weight = nn.Parameter(weight.detach().t(), requires_grad=False)  # transposed view, same data_ptr
    assert model.lin.weight.data_ptr() == weight.data_ptr()
    assert fingerprint(model) != before
    assert fingerprint(model) == fingerprint(model, refresh=True)


def test_meta_weights_without_offload_are_refused():
    model = Tiny()
    model.lin = nn.Linear(2, 1, device="meta")
    message = ("weight 'lin.bias' is on the meta device and not offloaded by accelerate: its values are unknown, so "
               "the model cannot be fingerprinted (load the model's weights first)")
    with pytest.raises(VLCacheError) as err:
        weights_digest(model)
    assert str(err.value) == message


@pytest.mark.parametrize("nested", [False, True])
def test_offloaded_weights_hash_like_their_loaded_twin(nested):
    """accelerate's own cpu_offload: the module holds meta tensors, its hooks' weights maps the values."""
    model = Tiny()
    if nested:
        model.block = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
        model.register_buffer("scale", torch.tensor([3.0]))
    twin = copy.deepcopy(model)
    expected = _digest_by_hand(twin)
    cpu_offload(model, execution_device=torch.device("cpu"))
    assert any(t.is_meta for t in model.state_dict().values())
    found = fp_module.offloaded_weights(model)
    assert set(found) == {n for n, t in model.state_dict().items() if t.is_meta}
    for name, tensor in found.items():
        assert torch.equal(tensor, twin.state_dict()[name])
    assert weights_digest(model) == expected == weights_digest(twin)


def test_config_json_keeps_what_changes_the_model():
    model = Tiny()
    text = fp_module._config_json(model)
    assert json.loads(text) == {"a": "torch.float32", "b": 1}
    model.config = SimpleNamespace(to_dict=lambda: {"a": "torch.float32", "b": 2, "_name_or_path": "y"})
    assert fp_module._config_json(model) != text


def _offloaded_twin(model: nn.Module) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    twin = copy.deepcopy(model)
    values = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    return twin, values


def test_offload_hooks_on_the_root_with_submodules_and_in_sequence():
    """accelerate's hook shapes: one `AlignDevicesHook` on the root placing all submodules (names without a
    prefix), and a `SequentialHook` whose first hook holds no weights."""
    from accelerate.hooks import AlignDevicesHook, ModelHook, add_hook_to_module

    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Linear(2, 1))
    twin, values = _offloaded_twin(model)
    add_hook_to_module(model, AlignDevicesHook(execution_device="cpu", offload=True, weights_map=values,
                                               offload_buffers=True, place_submodules=True))
    assert all(t.is_meta for t in model.state_dict().values())
    found = fp_module.offloaded_weights(model)
    assert sorted(found) == sorted(values)  # parameters and buffers of every submodule, named from the root
    assert "1.running_mean" in found and "0.weight" in found
    assert weights_digest(model) == _digest_by_hand(twin)

    outer = nn.Sequential(nn.Linear(2, 1))
    twin, values = _offloaded_twin(outer[0])
    add_hook_to_module(outer[0], ModelHook())
    add_hook_to_module(outer[0], AlignDevicesHook(execution_device="cpu", offload=True, weights_map=values), append=True)
    assert sorted(fp_module.offloaded_weights(outer)) == ["0.bias", "0.weight"]
    assert weights_digest(outer) == _digest_by_hand(nn.Sequential(twin))


def test_a_hook_that_does_not_offload_is_not_a_source_of_values():
    from accelerate.hooks import AlignDevicesHook

    model = nn.Sequential(nn.Linear(2, 1, device="meta"))
    model[0]._hf_hook = AlignDevicesHook(execution_device="cpu", offload=False,
                                         weights_map={"weight": torch.ones(1, 2), "bias": torch.ones(1)})
    assert fp_module.offloaded_weights(model) == {}
    with pytest.raises(VLCacheError, match="is on the meta device and not offloaded by accelerate"):
        weights_digest(model)
