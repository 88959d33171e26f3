"""vLLM's encoder cache backed by a `CacheStore`: `VLCacheECConnector`.

vLLM keeps vision-encoder outputs inside one engine process and drops them on restart. This connector plugs
into vLLM v1's encoder-cache connector interface (`ECConnectorBase`, loaded through
`ec_transfer_config.ec_connector_module_path`) and keeps them in our store — memory, disk, Redis — so every
vLLM instance sharing the store, and every Hugging Face process using `VLCache` on the same checkpoint, skips
the vision encoder for an image any of them has encoded:

    from vllm import LLM
    from vlcache_hf.integrations.vllm import ec_transfer_config
    llm = LLM(model=path, ec_transfer_config=ec_transfer_config("disk:///data/vlcache", "redis://cache:6379/0"))

Entries follow the rules of every other reader: checksummed safetensors bound to their store key, refused
unless written for this checkpoint (`checkpoint_fingerprint`: config.json + every checkpoint tensor in the
engine's dtype) and for an item of this size; a fault is a miss.

How it runs inside vLLM. The scheduler asks `has_cache_item(identifier)` before it schedules the encoder for
an item. We answer yes only after reading the entry from the store and validating it, and then copy it to
this engine's *staging* directory (a private tmpfs folder): the worker, which vLLM may run in another
process, loads the staged copy in `start_load_caches`. So an entry that another process evicts or corrupts
after the check can never reach the model, and the worker never lacks an output the scheduler counted on.
The worker publishes every output it computes in `save_caches`, with the item's layout that the scheduler
passed along (write-behind, off the request's path).

Keys: vLLM names an item by its `identifier` (its own hash of the image and processor options, or the
client's `multi_modal_uuids` entry as given when no processor options are set). `image_uuids()` computes our
content key of an image, so a client that sends it as the uuid hits the entries `generate` writes, and the
reverse. A uuid is an identity claim vLLM trusts; send only keys from `image_uuids()`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ...errors import VLCacheError
from ...models.serving import processed_item_keys

if TYPE_CHECKING:
    from .connector import VLCacheECConnector

CONNECTOR_NAME = "VLCacheECConnector"
MODULE_PATH = __name__

__all__ = ["CONNECTOR_NAME", "VLCacheECConnector", "ec_transfer_config", "image_uuids"]


def __getattr__(name: str) -> Any:
    """`VLCacheECConnector` is imported on first use: this package (`image_uuids`, `ec_transfer_config`) works
    in a client process without vLLM installed."""
    if name == "VLCacheECConnector":
        from .connector import VLCacheECConnector

        return VLCacheECConnector
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def ec_transfer_config(*store_urls: str, role: str = "ec_both", events: str | None = None) -> dict[str, Any]:
    """The `ec_transfer_config` for `vllm.LLM(...)` / `vllm serve --ec-transfer-config '<json>'`.

    `store_urls`: the store's tiers, top-down (`CacheStore.from_url` syntax: `disk:///path?budget=50GiB`,
    `redis://host:6379/0`, `memory://cpu?budget=8GiB`); at least one persistent tier, since vLLM's scheduler
    and worker may be separate processes and restarts should keep the entries.
    `role`: `ec_both` (load and publish), `ec_consumer` (load only) or `ec_producer` (publish only).
    `events`: a file to which each connector process appends one JSON line per load, save and refusal
    (for tests and benchmarks).
    """
    if not store_urls:
        raise VLCacheError("ec_transfer_config needs at least one store URL, e.g. 'disk:///data/vlcache'")
    extra: dict[str, Any] = {"store": list(store_urls)}
    if events is not None:
        extra["events"] = str(events)
    return {
        "ec_connector": CONNECTOR_NAME,
        "ec_connector_module_path": MODULE_PATH,
        "ec_role": role,
        "ec_connector_extra_config": extra,
    }


def image_uuids(processor: Any, images: Sequence[Any], dtype: torch.dtype | str = torch.float32) -> list[str]:
    """Our content key of each image, to send as vLLM's `multi_modal_uuids={"image": [...]}` (without
    `mm_processor_kwargs`, which make vLLM rehash the uuid), so vLLM and `generate` use the same entries.

    `processor` is the checkpoint's Hugging Face processor (`AutoProcessor.from_pretrained(path)`) and
    `dtype` the dtype the model runs in (`vllm.LLM(dtype=...)`, `from_pretrained(dtype=...)`): the key covers
    the pixels as the vision tower reads them.
    """
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."))
    return processed_item_keys(processor, images, dtype)
