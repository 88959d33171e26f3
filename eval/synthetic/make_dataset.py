"""Export the synthetic multi-image VQA evaluation splits to parquet (what the lmms-eval task reads).

    python eval/synthetic/make_dataset.py                 # writes eval/synthetic/data/{validation,test}.parquet
    python eval/synthetic/make_dataset.py --check         # regenerate in memory, compare with the files

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


def build_split(split: str, size: int):
    """The `datasets.Dataset` of the first `size` items of `split`."""
    from datasets import Dataset

    rows: dict[str, list] = {name: [] for name in features()}
    for index, item in enumerate(synthetic.make_split(split, size)):
        rows["id"].append(f"{split}-{index:05d}")
        rows["images"].append([_png(synthetic.render(scene)) for scene in item.scenes])
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
    parser.add_argument("--test-size", type=int, default=SIZES["test"])
    args = parser.parse_args(argv)
    sizes = {"validation": args.validation_size, "test": args.test_size}

    if args.check:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            for split, size in sizes.items():
                fresh = Path(tmp) / f"{split}.parquet"
                build_split(split, size).to_parquet(str(fresh))
                stored = args.out / f"{split}.parquet"
                same = stored.is_file() and fresh.read_bytes() == stored.read_bytes()
                print(f"{split}: {'identical' if same else 'DIFFERENT'} ({_digest(fresh)})")
                if not same:
                    raise SystemExit(1)
        return

    args.out.mkdir(parents=True, exist_ok=True)
    for split, size in sizes.items():
        path = args.out / f"{split}.parquet"
        dataset = build_split(split, size)
        dataset.to_parquet(str(path))
        kinds = {kind: dataset["kind"].count(kind) for kind in sorted(set(dataset["kind"]))}
        print(f"{split}: {len(dataset)} items, {sum(dataset['num_images'])} images, {path.stat().st_size / 1e6:.2f} MB, "
              f"sha256 {_digest(path)}; kinds {kinds} -> {path}")


if __name__ == "__main__":
    main()
