"""`LayerProfile`: per-layer sensitivity to reused K/V, and the rule that turns a budget into layer budgets.

Recompute sets are nested (a token recomputed at layer l must have been computed at l − 1), so layer
budgets can only shrink with depth. The profile therefore stores, for each layer l, the *remaining error*
w_l: the output error (KL of the next-token distribution, full recompute ‖ reuse) left when the moved
tokens are recomputed at layers < l and reused from layer l on. w_0 is naive reuse's error, w_L = 0, and
w_l − w_{l+1} is layer l's own sensitivity (its reused vs recomputed K/V, given the layers below were
recomputed). Budgets follow w: k_l ∝ w_l, capped at the number of moved tokens, averaging the requested
ratio (`allocate_budgets`). Without a profile, `default_weights` (uniform) is used.

Profiles are JSON: they carry the model fingerprint (a profile from another model is refused), the
library version, the calibration settings and the measured curve, so a reader can see where budgets
came from.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import VLCacheError

PROFILE_FORMAT = 1
ALLOCATION_RULE = "k_l = min(moved, c * w_l), c such that mean_l k_l = recompute_ratio * moved; w = remaining error"
DEFAULT_ALLOCATION = "default: uniform w_l = 1 (no calibration profile given)"


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def default_weights(num_layers: int) -> list[float]:
    """The same budget at every layer. Measured on every toy family, random-weight and trained, a layer's
    own sensitivity grows with depth (eval/results/fidelity_probe_*.md), and nested sets make a token
    recomputed deep also cost every layer above it, so front-loading the budget wastes it; a calibrated
    profile shifts it where a model needs."""
    return [1.0] * num_layers


def allocate_budgets(weights: list[float], num_moved: int, ratio: float) -> list[int]:
    """Non-increasing per-layer counts k_l ≤ num_moved with mean ≈ ratio × num_moved, proportional to weights.

    Water-filling: layers whose share exceeds `num_moved` are capped and the rest is spread over the
    others. Weights are made non-increasing first (nested sets cannot grow with depth).
    """
    num_layers = len(weights)
    if num_moved == 0 or ratio <= 0 or num_layers == 0:
        return [0] * num_layers
    if ratio >= 1:
        return [num_moved] * num_layers
    monotone, running = [], math.inf
    for w in weights:
        running = min(running, max(float(w), 0.0))
        monotone.append(running)
    if sum(monotone) <= 0:
        monotone = [1.0] * num_layers
    target = ratio * num_moved * num_layers
    low, high = 0.0, num_moved / max(min(w for w in monotone if w > 0), 1e-30)
    for _ in range(100):  # bisection on the scale c: sum_l min(moved, c w_l) = target
        mid = (low + high) / 2
        if sum(min(num_moved, mid * w) for w in monotone) < target:
            low = mid
        else:
            high = mid
    counts = [min(num_moved, int(round(high * w))) for w in monotone]
    counts[0] = max(counts[0], 1)
    for layer in range(1, num_layers):  # rounding must not break nesting
        counts[layer] = min(counts[layer], counts[layer - 1])
    return counts


@dataclass
class LayerProfile:
    """Per-layer sensitivity of one model, measured by `vlcache_hf.calibrate`."""

    model_fingerprint: str
    num_layers: int
    remaining_error: list[float]  # w_l, l = 0..L-1 (w_L = 0 is implied)
    sensitivity: list[float]  # w_l - w_{l+1}: layer l's own share of the error
    naive_kl: float  # mean KL(full ‖ naive reuse) over the calibration requests
    seed: int
    num_samples: int
    library_version: str
    allocation_rule: str = ALLOCATION_RULE
    per_sample_depth_kl: list[list[float]] = field(default_factory=list)
    format: int = PROFILE_FORMAT

    def __post_init__(self) -> None:
        """Refuse a profile whose numbers cannot be budgets (JSON admits NaN and Infinity; a budget of NaN
        would only fail later, deep inside a request)."""
        if isinstance(self.num_layers, bool) or not isinstance(self.num_layers, int) or self.num_layers < 1:
            raise VLCacheError(f"malformed LayerProfile: num_layers must be a positive int, got {self.num_layers!r}")
        if not isinstance(self.remaining_error, list) or len(self.remaining_error) != self.num_layers:
            raise VLCacheError("malformed LayerProfile: remaining_error must have one value per layer")
        rows = [("remaining_error", self.remaining_error), ("sensitivity", self.sensitivity), ("naive_kl", [self.naive_kl])]
        rows += [("per_sample_depth_kl", row) for row in self.per_sample_depth_kl]
        for name, values in rows:
            if not isinstance(values, list) or not all(_finite(v) for v in values):
                raise VLCacheError(
                    f"malformed LayerProfile: {name} must hold finite numbers, got {str(values)[:80]}; "
                    "re-create the profile with `vlcache calibrate`"
                )

    def budgets(self, num_moved: int, ratio: float) -> list[int]:
        return allocate_budgets(self.remaining_error, num_moved, ratio)

    def check_model(self, model_fingerprint: str, num_layers: int) -> None:
        """Refuse a profile measured on another model: its budgets would be meaningless here."""
        if self.model_fingerprint != model_fingerprint or self.num_layers != num_layers:
            raise VLCacheError(
                f"this LayerProfile was calibrated for model {self.model_fingerprint[:16]}… with {self.num_layers} layers, "
                f"not for this model ({model_fingerprint[:16]}…, {num_layers} layers); run `vlcache calibrate` for it"
            )

    def describe(self) -> str:
        return f"profile {self.model_fingerprint[:12]} (seed {self.seed}, {self.num_samples} samples)"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json())
        return path

    @classmethod
    def from_dict(cls, data: dict) -> LayerProfile:
        if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
            raise VLCacheError(f"not a vlcache LayerProfile (format {PROFILE_FORMAT}): {str(data)[:80]!r}")
        try:
            profile = cls(**data)
        except TypeError as err:
            raise VLCacheError(f"malformed LayerProfile: {err}") from err
        return profile

    @classmethod
    def load(cls, path: str | Path) -> LayerProfile:
        path = Path(path)
        if path.is_dir():
            raise VLCacheError(f"{path} is a directory; pass the profile's JSON file (e.g. {path / 'profile.json'})")
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise VLCacheError(f"no LayerProfile at {path}; create one with `vlcache calibrate --out {path}`") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise VLCacheError(f"{path} is not valid JSON: {err}") from err
        except OSError as err:
            raise VLCacheError(f"cannot read the LayerProfile at {path}: {err}") from err
        return cls.from_dict(data)
