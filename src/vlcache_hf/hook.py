"""The forward hooks that make `model.generate(..., past_key_values=VLCache(...))` work unchanged.

They only translate. When the model is called with a `VLCache` that has not been prefilled yet and more
than one prompt token, the pre-hook runs `engine.prefill_request` and hands the model's forward the prompt's
fresh tail — the new text after the rows the store held exactly when nothing else needs computing (a chat
turn), else the final token (the final n when the caller keeps n logits: assisted decoding; only the final
token when the caller keeps every logit). A prefill that must
return something of every position (hidden states, attentions, a loss) runs as the model's own forward
instead (`engine.plain_prefill`). Once that forward has returned, the post-hook publishes what the request
computed (`engine.publish_computed`). Every other call passes through untouched. When the prefill forward
computes several tokens (a chat turn's new text) on the CPU with SDPA, its attention runs without per-group
K/V copies between the two hooks (`attention.native_gqa_forward`: bitwise the same output, a third less time).
"""

from __future__ import annotations

import threading
from typing import Any

from torch import nn

from .attention import native_gqa_forward
from .cache_lookup import find_cache
from .engine import plain_prefill, prefill_request, publish_computed
from .errors import VLCacheError

_install_lock = threading.Lock()


def _prefill_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]):
    cache = find_cache(kwargs)
    if cache is None or cache.is_prefilled:
        return None
    if cache.model is not module:
        raise VLCacheError("this VLCache was created for another model; create one per model")
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    if input_ids is not None and input_ids.ndim == 2 and input_ids.shape[1] < 2:
        cache.mark_prefilled()
        return None
    reason = _plain_prefill_reason(module, kwargs, input_ids.shape[1]) if input_ids is not None else ""
    if reason:  # the model's own forward computes everything; the encoder cache has served its images
        plain_prefill(cache, args, kwargs, reason)
        return None
    new_kwargs = _prefill(cache, args, kwargs, _tokens_for_the_model(kwargs), _keeps_last_logits_only(kwargs))
    # the forward's attention over the whole cached prompt: for several tokens (a chat turn's new text) without
    # per-group K/V copies; a single token is left to transformers, which packs its groups itself
    cache.forward_attention = native_gqa_forward(cache.adapter.attention_config(), module.device, cache)
    return (), new_kwargs


def _publish_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
    """After a prefill forward: publish what its request computed (nothing for any other call).

    Registered with `always_call`, so it also runs when the forward raised (`output` is then None): the
    request failed as a whole, so its cache is emptied and nothing of it is published, as when its prefill
    fails.
    """
    cache = find_cache(kwargs)
    if cache is None:
        return
    if cache.forward_attention is not None:  # the prefill forward switched the model's attention: switch it back
        release, cache.forward_attention = cache.forward_attention, None
        release()
    if cache.pending_kv is None and not cache.pending_entries:
        return
    if output is None:
        cache.abandon_prefill()
        return
    try:
        publish_computed(cache)
    except BaseException:
        cache.abandon_prefill()
        raise


#: forward outputs that cover every prompt position; the selective prefill produces none of them
_EVERY_POSITION_OUTPUTS = ("output_hidden_states", "output_attentions")


def _plain_prefill_reason(module: nn.Module, kwargs: dict[str, Any], length: int) -> str:
    """Why this prefill forward needs the model's own computation of every prompt position ("" if it does not).

    Hidden states, attentions and a loss over `labels` read every position, and so does `logits_to_keep` = 0
    (all logits) or an index tensor; such a forward runs unchanged (the encoder cache still serves its images).
    """
    for flag in _EVERY_POSITION_OUTPUTS:
        value = kwargs.get(flag)
        if value if value is not None else getattr(module.config, flag, False):
            return f"{flag} was requested"
    if kwargs.get("labels") is not None:
        return "labels were given (the loss reads every position's logits)"
    keep = kwargs.get("logits_to_keep")
    if keep is not None and (not isinstance(keep, int) or keep == 0 or keep >= length):
        return f"logits_to_keep={keep if isinstance(keep, int) else 'tensor'} asks for the logits of every position"
    return ""


def _tokens_for_the_model(kwargs: dict[str, Any]) -> int:
    """How many final prompt tokens the model's own forward computes: those whose logits the caller keeps
    (assisted / prompt-lookup decoding verify their candidates in the prefill forward: `logits_to_keep` =
    candidates + 1). Without `logits_to_keep` (a direct call), the last token only."""
    keep = kwargs.get("logits_to_keep")
    return keep if isinstance(keep, int) and keep > 1 else 1


def _keeps_last_logits_only(kwargs: dict[str, Any]) -> bool:
    """True when the caller keeps only the last `logits_to_keep` logits (as `generate` does), so the model's
    forward may compute more final tokens than that: the prompt's fresh tail."""
    keep = kwargs.get("logits_to_keep")
    return isinstance(keep, int) and not isinstance(keep, bool) and keep >= 1


def _prefill(cache, args: tuple, kwargs: dict[str, Any], keep: int = 1, fresh_tail: bool = False) -> dict[str, Any]:
    """Run the request's prefill as one unit: if any phase raises, the cache is left empty and nothing this
    request computed is published, so a retry or the next request starts from the state before it."""
    try:
        new_kwargs = prefill_request(cache, args, kwargs, keep=keep, fresh_tail=fresh_tail)
    except BaseException:
        cache.abandon_prefill()
        raise
    return new_kwargs


def install(model: nn.Module) -> None:
    """Register the hooks on `model` once. Each hook is a module-level function kept in the model's own
    hook table, so a `deepcopy` or a `torch.save`d model carries it (and is not hooked twice)."""
    with _install_lock:  # two threads creating the first caches of a model at once must not hook it twice
        if _prefill_hook not in model._forward_pre_hooks.values():
            model.register_forward_pre_hook(_prefill_hook, with_kwargs=True)
        if _publish_hook not in model._forward_hooks.values():
            model.register_forward_hook(_publish_hook, with_kwargs=True, always_call=True)
