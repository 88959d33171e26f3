"""The connector class itself (imports vLLM); see the package docstring for what it does and why."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from vllm.distributed.ec_transfer.ec_connector.base import (
    ECConnectorBase,
    ECConnectorMetadata,
    ECConnectorRole,
)

from ...encoder import load_encoder_entry
from ...errors import VLCacheError
from ...fingerprint import checkpoint_fingerprint
from ...models.serving import serving_format
from ...store.entry import EncoderEntry
from ...store.keys import ENCODER_KIND, entry_key
from ...store.store import CacheStore
from . import CONNECTOR_NAME

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)

#: staged copies kept for items vLLM checked but has not scheduled yet (aborted requests never claim theirs):
#: past this many, those staged more than STAGED_TTL seconds ago are dropped (a later check stages them again).
#: Recent ones are never dropped, so an item checked in this scheduling step is still there when it is allocated.
MAX_STAGED = 256
STAGED_TTL = 60.0


@dataclass
class VLCacheECMetadata(ECConnectorMetadata):
    """Scheduler → worker for one step: items to load from staging, and the layout of items to encode."""

    loads: dict[str, str] = field(default_factory=dict)  # identifier -> staged file
    layouts: dict[str, tuple[int, ...]] = field(default_factory=dict)  # identifier -> layout (for saves)


class VLCacheECConnector(ECConnectorBase):
    """vLLM encoder-cache connector over a `CacheStore` (see the module docstring)."""

    def __init__(self, vllm_config: VllmConfig, role: ECConnectorRole):
        super().__init__(vllm_config=vllm_config, role=role)
        transfer = vllm_config.ec_transfer_config
        extra = dict(getattr(transfer, "ec_connector_extra_config", None) or {})
        urls = extra.get("store")
        urls = [urls] if isinstance(urls, str) else list(urls or [])
        if not urls:
            raise VLCacheError(f"{CONNECTOR_NAME} needs ec_connector_extra_config={{'store': [<store URLs>]}}")
        self.store = CacheStore.from_url(*urls)
        model_config = vllm_config.model_config
        self.format = serving_format(model_config.hf_config)
        self.dtype: torch.dtype = model_config.dtype
        start = time.perf_counter()
        self.fingerprint = checkpoint_fingerprint(model_config.model, self.dtype, revision=model_config.revision)
        logger.info("%s: checkpoint fingerprint %s… in %.2f s", CONNECTOR_NAME, self.fingerprint[:12], time.perf_counter() - start)
        base = extra.get("staging_dir") or ("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
        self.staging = Path(base) / f"vlcache-ec-{vllm_config.instance_id or os.getppid()}"
        self.events = extra.get("events")
        self._staged: dict[str, tuple[str, float]] = {}  # scheduler: identifier -> (validated staged file, when), oldest first
        self._loads: dict[str, str] = {}  # scheduler: loads for the next step
        self._layouts: dict[str, tuple[int, ...]] = {}  # scheduler: layouts of items being encoded
        if role == ECConnectorRole.SCHEDULER:
            self.staging.mkdir(mode=0o700, parents=True, exist_ok=True)

    # -- shared -----------------------------------------------------------------------------------------
    def _key(self, identifier: str) -> str:
        return entry_key(ENCODER_KIND, self.fingerprint, identifier)

    def _event(self, event: str, identifier: str, **more: Any) -> None:
        if self.events is None:
            return
        line = json.dumps({"event": event, "identifier": identifier, "role": self.role.name, "pid": os.getpid(), **more})
        fd = os.open(self.events, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (line + "\n").encode())  # one write per line: appends of concurrent processes never interleave
        finally:
            os.close(fd)

    def shutdown(self) -> None:
        self.store.flush(timeout=30)
        if self.role == ECConnectorRole.SCHEDULER:
            shutil.rmtree(self.staging, ignore_errors=True)

    # -- scheduler side ---------------------------------------------------------------------------------
    def has_cache_item(self, identifier: str) -> bool:
        """Whether a valid entry exists; if so it is staged for this engine's worker (see module docstring)."""
        if not self.is_consumer:
            return False
        if self._staged_file(identifier) is not None:
            return True
        key = self._key(identifier)
        entry = load_encoder_entry(self.store, key, self.fingerprint, self.format.hidden_size, self.dtype)
        if entry is None:
            return False
        try:
            tensor = self.format.join(entry.embeddings, entry.deepstack).contiguous()
            path = self.staging / f"{key}.safetensors"
            partial = path.with_suffix(f".{os.getpid()}.partial")
            save_file({"output": tensor.cpu()}, str(partial))
            os.replace(partial, path)
        except (OSError, VLCacheError) as err:  # a staging failure is a miss
            logger.warning("%s: could not stage %s…: %s", CONNECTOR_NAME, identifier[:12], err)
            self._event("refused", identifier, reason=str(err))
            return False
        self._staged[identifier] = (str(path), time.monotonic())
        while len(self._staged) > MAX_STAGED:
            oldest, (oldest_path, since) = next(iter(self._staged.items()))
            if time.monotonic() - since < STAGED_TTL:
                break
            del self._staged[oldest]
            Path(oldest_path).unlink(missing_ok=True)
        return True

    def _staged_file(self, identifier: str) -> str | None:
        """The staged copy of `identifier`, if it is still there."""
        staged = self._staged.get(identifier)
        return staged[0] if staged is not None and os.path.exists(staged[0]) else None

    def update_state_after_alloc(self, request: Request, index: int) -> None:
        feature = request.mm_features[index]
        identifier = feature.identifier
        staged = self._staged_file(identifier)
        if self.is_consumer and staged is not None:
            self._loads[identifier] = staged
            del self._staged[identifier]  # the worker consumes the staged file
        elif self.is_producer:
            layout = self.format.layout(feature.modality, feature.data)
            if layout is not None:
                self._layouts[identifier] = layout

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> ECConnectorMetadata:
        meta = VLCacheECMetadata(dict(self._loads), dict(self._layouts))
        self._loads.clear()
        self._layouts.clear()
        return meta

    # -- worker side ------------------------------------------------------------------------------------
    def start_load_caches(self, encoder_cache: dict[str, torch.Tensor], **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, VLCacheECMetadata):
            return
        device = _worker_device()
        for identifier, staged in meta.loads.items():
            if identifier in encoder_cache:
                continue
            # the staged copy was validated by the scheduler and is private to this engine: failing to read
            # it is a broken machine, not a cache fault, so it raises
            encoder_cache[identifier] = load_file(staged, device=device)["output"]
            os.unlink(staged)
            self._event("load", identifier, tokens=int(encoder_cache[identifier].shape[0]))

    def save_caches(self, encoder_cache: dict[str, torch.Tensor], mm_hash: str, **kwargs: Any) -> None:
        if not self.is_producer:
            return
        meta = self._connector_metadata
        layout = meta.layouts.get(mm_hash) if isinstance(meta, VLCacheECMetadata) else None
        if layout is None:  # vLLM kept no processed data for the item: an entry without its layout is not written
            self._event("skip", mm_hash, reason="no layout")
            return
        try:
            embeddings, deepstack = self.format.split(encoder_cache[mm_hash].detach().to("cpu"))
            key = self._key(mm_hash)
            entry = EncoderEntry(embeddings.contiguous(), layout, tuple(t.contiguous() for t in deepstack))
            self.store.put(key, entry.to_stored(self.fingerprint, key))
        except VLCacheError as err:
            logger.warning("%s: not saving %s…: %s", CONNECTOR_NAME, mm_hash[:12], err)
            self._event("refused", mm_hash, reason=str(err))
            return
        self._event("save", mm_hash, tokens=int(embeddings.shape[0]))


def _worker_device() -> str:
    from vllm.platforms import current_platform

    device = current_platform.device_type
    if current_platform.is_cuda_alike():
        device = f"{device}:{current_platform.current_device()}"
    return device
