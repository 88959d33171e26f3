"""`PrefillReport`: what one request reused, recomputed and spent time on."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class PrefillTimings:
    """Wall-clock seconds of each prefill phase (CUDA work is synchronised at phase boundaries)."""

    encoder_s: float = 0.0
    store_load_s: float = 0.0
    rerotation_s: float = 0.0
    prefill_s: float = 0.0
    publish_s: float = 0.0
    total_s: float = 0.0


@dataclass
class PrefillReport:
    """Token and cache accounting of one request's prefill.

    `reused_tokens + recomputed_tokens == total_tokens`. A token counts as recomputed if any layer computed
    it; the final prompt token is always computed (by the model's own forward, which yields the first
    logits). `recomputed_per_layer[l]` is how many tokens layer l computed. `images` counts visual items
    (images and videos); `encoder_hits` / `encoder_misses` count items; `kv_hits` / `kv_misses` count
    their token spans (one per item, or one per frame group for Qwen3-VL videos) whose K/V was / was not
    found (inside an exact prefix hit or as a stored span); policy "full" looks nothing up and reports 0.

    Reused K/V is exact or moved: `prefix_tokens` (exact prefix chunks) and `exact_span_tokens` (image tokens
    past the prefix whose stored K/V was computed in this same context: same tokens, images, positions and
    padding before them) are exact; `moved_tokens` were filled from K/V computed in another context,
    re-rotated — approximate, the tokens a selection policy may recompute. `moved_tokens` counts all of them;
    in `reused_tokens` / `recomputed_tokens` those the policy recomputes at layer 0 count as recomputed.
    """

    policy: str
    total_tokens: int
    reused_tokens: int
    prefix_tokens: int
    recomputed_tokens: int
    recomputed_per_layer: list[int]
    image_tokens: int
    images: int
    encoder_hits: int
    encoder_misses: int
    kv_hits: int
    kv_misses: int
    timings: PrefillTimings = field(default_factory=PrefillTimings)
    allocation: str = ""  # where per-layer budgets came from (layer-aware policies): a profile or the default
    #: why this prefill did less than its policy asks (no K/V reuse, or a plain prefill by the model); "" if it did not
    fallback: str = ""
    exact_span_tokens: int = 0
    moved_tokens: int = 0

    @property
    def recomputed_fraction(self) -> float:
        return self.recomputed_tokens / self.total_tokens if self.total_tokens else 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        t = self.timings
        return (
            f"{self.total_tokens} tokens: {self.reused_tokens} reused ({self.prefix_tokens} as exact prefix, "
            f"{self.exact_span_tokens} exact in context, {self.moved_tokens} moved), "
            f"{self.recomputed_tokens} computed; images {self.images}: encoder {self.encoder_hits} hit / "
            f"{self.encoder_misses} miss, KV {self.kv_hits} hit / {self.kv_misses} miss; "
            f"encoder {t.encoder_s * 1e3:.1f} ms, load {t.store_load_s * 1e3:.1f} ms, "
            f"re-rotate {t.rerotation_s * 1e3:.1f} ms, prefill {t.prefill_s * 1e3:.1f} ms"
            + (f"; {self.fallback}" if self.fallback else "")
        )
