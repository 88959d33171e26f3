"""Export the synthetic multi-image VQA evaluation splits to parquet (what the lmms-eval task reads).

    python eval/synthetic/make_dataset.py                 # writes eval/synthetic/data/{validation,test}.parquet
    python eval/synthetic/make_dataset.py --check         # regenerate in memory, compare with the files
    python eval/synthetic/make_dataset.py --variant deep  # writes eval/synthetic/data/deep_test.parquet (1000 items)

Items come from `vlcache_hf.tools.synthetic.make_split` (seeded, so the files are reproducible byte for byte);
the pictures are drawn by `synthetic.render` and stored as PNG in a list-of-`datasets.Image()` column.
Columns: `id`, `images`, `preamble` (the text before the images), `question`, `instruction` (the text after
the images is `question + " " + instruction`), `answer`, `kind`, `backward`, `num_images`, and `record`
(the item as JSON, `Item.to_record()`, so `Item.from_record(json.loads(record))` gives it back).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
from pathlib import Path

from vlcache_hf.tools import synthetic

DATA_DIR = Path(__file__).resolve().parent / "data"
SIZES = {"validation": 500, "test": 2000}
#: the deep variant (224-px pictures, 2–4 per item, two-hop questions: the deep embedded model's task) is
#: exported as its test split only, with this many items
DEEP_TEST_SIZE = 1000


def features():
    from datasets import Features, Image, Sequence, Value

    return Features(
        {
            "id": Value("string"),
            "images": Sequence(Image()),
            "preamble": Value("string"),
            "question": Value("string"),
            "instruction": Value("string"),
            "answer": Value("string"),
            "kind": Value("string"),
            "backward": Value("bool"),
            "num_images": Value("int32"),
            "record": Value("string"),
        }
    )


def _png(image) -> dict:
    """PNG bytes of a PIL image (PIL's PNG encoder is deterministic; no timestamps, no text chunks)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return {"bytes": buffer.getvalue(), "path": None}


def build_split(split: str, size: int, variant: str = "default"):
    """The `datasets.Dataset` of the first `size` items of `split` of the task `variant`."""
    from datasets import Dataset

    rows: dict[str, list] = {name: [] for name in features()}
    for index, item in enumerate(synthetic.make_split(split, size, variant=variant)):
        rows["id"].append(f"{split}-{index:05d}")
        rows["images"].append([_png(image) for image in synthetic.render_item(item, variant)])
        rows["preamble"].append(item.preamble)
        rows["question"].append(item.question)
        rows["instruction"].append(item.instruction)
        rows["answer"].append(item.answer)
        rows["kind"].append(item.kind)
        rows["backward"].append(item.backward)
        rows["num_images"].append(len(item.scenes))
        rows["record"].append(json.dumps(item.to_record(), sort_keys=True))
    return Dataset.from_dict(rows, features=features())


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DATA_DIR, help="output directory (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="regenerate to a temp dir and compare with --out")
    parser.add_argument("--validation-size", type=int, default=SIZES["validation"])
    parser.add_argument("--test-size", type=int, default=None, help=f"default {SIZES['test']} ({DEEP_TEST_SIZE} for deep)")
    parser.add_argument("--variant", choices=["default", "deep"], default="default", help="which task variant")
    args = parser.parse_args(argv)
    if args.variant == "deep":
        sizes = {"test": args.test_size or DEEP_TEST_SIZE}
    else:
        sizes = {"validation": args.validation_size, "test": args.test_size or SIZES["test"]}
    prefix = "" if args.variant == "default" else f"{args.variant}_"

    if args.check:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            for split, size in sizes.items():
                fresh = Path(tmp) / f"{prefix}{split}.parquet"
                build_split(split, size, args.variant).to_parquet(str(fresh))
                stored = args.out / f"{prefix}{split}.parquet"
                same = stored.is_file() and fresh.read_bytes() == stored.read_bytes()
                print(f"{split}: {'identical' if same else 'DIFFERENT'} ({_digest(fresh)})")
                if not same:
                    raise SystemExit(1)
        return

    args.out.mkdir(parents=True, exist_ok=True)
    for split, size in sizes.items():
        path = args.out / f"{prefix}{split}.parquet"
        dataset = build_split(split, size, args.variant)
        dataset.to_parquet(str(path))
        kinds = {kind: dataset["kind"].count(kind) for kind in sorted(set(dataset["kind"]))}
        print(f"{split}: {len(dataset)} items, {sum(dataset['num_images'])} images, {path.stat().st_size / 1e6:.2f} MB, "
              f"sha256 {_digest(path)}; kinds {kinds} -> {path}")


if __name__ == "__main__":
    main()
