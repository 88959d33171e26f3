"""`vlcache calibrate`: load a model and its samples, run the calibration pass, write the LayerProfile.

The pass itself is runtime (`vlcache_hf.calibration.calibrate`); what only the command needs lives here,
in the tooling: the embedded model from `demo`, synthetic pictures from `synthetic`, a directory of images.
`tools/cli.py` imports this module only when the command runs (it imports torch).
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from ..calibration import calibrate
from ..errors import VLCacheError


def load_images(data: str | None, num_samples: int, images_per_sample: int, seed: int) -> list[list]:
    """Samples from a directory of images (grouped in sorted order), or seeded synthetic pictures."""
    from PIL import Image

    if data is None:
        from .synthetic import make_split, render

        items = make_split("validation", num_samples)
        return [[render(scene) for scene in item.scenes] for item in items]
    folder = Path(data)
    if not folder.is_dir():
        raise VLCacheError(f"--data {data!r} is not a directory of images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp", ".bmp"})
    if len(files) < 2:
        raise VLCacheError(f"--data {data}: need at least 2 images (.png/.jpg/.jpeg/.webp/.bmp), found {len(files)}")
    rng = random.Random(seed)
    samples = []
    for _ in range(num_samples):
        chosen = rng.sample(files, min(images_per_sample, len(files)))
        samples.append([Image.open(path).convert("RGB") for path in chosen])
    return samples


def calibrate_command(args: argparse.Namespace) -> int:
    """Run `vlcache calibrate` with its parsed arguments (see `cli.add_calibrate_command`)."""
    from .demo import load_demo_model

    model, processor, description = load_demo_model(None if args.model == "default" else args.model)
    samples = load_images(args.data, args.samples, args.images_per_sample, args.seed)
    print(f"calibrating {description} on {len(samples)} samples (seed {args.seed})")
    profile = calibrate(model, processor, samples, seed=args.seed)
    path = profile.save(args.out)
    print(f"naive-reuse KL {profile.naive_kl:.3e}; remaining error by layer:")
    for layer, (left, own) in enumerate(zip(profile.remaining_error, profile.sensitivity, strict=False)):
        print(f"  layer {layer:2d}  remaining {left:.3e}  own {own:.3e}")
    print(f"wrote {path}")
    return 0
