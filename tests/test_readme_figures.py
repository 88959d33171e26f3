"""Every figure in README's results section, and in every figure block of README and docs/, is found in the
committed file it cites.

A *figure block* starts with an HTML comment naming its sources and runs to the next one, to an
`<!-- end figures -->` comment or to the end of its section::

    <!-- figures: eval/results/fidelity_deep.md eval/results/train_deep_vqa.json#test_accuracy -->

A JSON source may name a subtree (`#key.key`) so that a figure is looked up only where it belongs, not among a
training run's thousands of loss values. Each number the block shows a reader (outside code spans, link targets
and comments) must equal a number of a cited source, to the precision the README prints it with: `28954 ms`
matches `28953.9`, `3.45e-2` matches `3.448e-02`, `88.75 %` matches `0.8875`, `4.3 h` matches `15608.5`
seconds. Every results file cited must say which command wrote it. README's "Measured results" section must be
covered by blocks from its first number on.

The numbers are not checked against a recomputation here (the commands take minutes to hours): this test keeps
README from drifting away from the committed results, and from showing figures no committed file holds.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"<!--\s*figures:\s*(.*?)\s*-->", re.S)
BLOCK_END = re.compile(r"<!--\s*end figures\s*-->|^## ", re.M)
SECTION_END = re.compile(r"^## ", re.M)
# A figure as README prints it: digits (thousands may be grouped with commas), a fraction, an exponent, then
# an optional unit. Digits glued to letters ("Qwen2.5", "x86_64", "fp32", "LLaVA-1.5") are names, not figures.
FIGURE = re.compile(
    r"(?<![\w.])(?<![A-Za-z]-)(?P<int>\d{1,3}(?:,\d{3})+|\d+)(?:\.(?P<frac>\d+))?(?:e(?P<exp>[-+]?\d+))?(?![\w])"
    r"(?:\s?(?P<unit>%|×|ms|s|min|h|MiB|MB|GiB|GB|KiB|M|k)(?![\w]))?"
)
RANGE = re.compile(r"(?<![\w.])(?P<low>\d+(?:\.\d+)?)–(?P<high>\d+(?:\.\d+)?)\s?(?P<unit>%|×|ms|s|min|h)(?![\w])")
SOURCE_NUMBER = re.compile(r"[-+]?\d+(?:,\d{3})*(?:\.\d+)?(?:[eE][-+]?\d+)?(?P<ratio>\s?[×x](?![\w]))?")
# what one unit of a figure may be in a source: a percentage as a percentage or a fraction, a duration in
# the same unit or in (milli)seconds, a count in units, a size in bytes or in its own unit
SCALES = {
    None: (1.0,),
    "%": (1.0, 0.01),
    "×": (1.0,),
    "ms": (1.0, 1e-3),
    "s": (1.0, 1e3),
    "min": (1.0, 60.0),
    "h": (1.0, 3600.0, 60.0),
    "M": (1.0, 1e6),
    "k": (1.0, 1e3),
    "MiB": (1.0, 2.0**20),
    "MB": (1.0, 1e6, 2.0**20),
    "GiB": (1.0, 2.0**30),
    "GB": (1.0, 1e9, 2.0**30),
    "KiB": (1.0, 2.0**10),
}


@dataclass(frozen=True)
class SourceNumber:
    value: float
    unit: str | None = None  # "×" when the source prints a ratio, else None


@dataclass(frozen=True)
class Figure:
    text: str
    value: float
    resolution: float  # one unit of the last digit printed
    unit: str | None

    def matches(self, number: SourceNumber) -> bool:
        if self.unit == "×" and number.unit != "×":  # a ratio is only ever another ratio
            return False
        return any(
            abs(self.value * scale - number.value) <= self.resolution * scale / 2 * (1 + 1e-9) + 1e-12
            for scale in SCALES[self.unit]
        )


def figures_in(text: str) -> list[Figure]:
    """The figures a reader sees in a piece of Markdown: code spans, link targets and comments are left out."""
    text = re.sub(r"<!--.*?-->", " ", text, flags=re.S)
    text = re.sub(r"```.*?```", " ", text, flags=re.S)
    text = re.sub(r"`[^`]*`", " ", text)
    text = re.sub(r"\]\([^)]*\)", "]", text)
    text = RANGE.sub(r"\g<low> \g<unit>–\g<high> \g<unit>", text)  # "10–20 %": both ends are percentages
    found = []
    for match in FIGURE.finditer(text):
        digits, frac, exp = match["int"].replace(",", ""), match["frac"] or "", match["exp"]
        value = float(f"{digits}.{frac}" if frac else digits)
        resolution = 10.0 ** -len(frac)
        if exp is not None:
            value, resolution = value * 10.0 ** int(exp), resolution * 10.0 ** int(exp)
        found.append(Figure(match.group(0), value, resolution, match["unit"]))
    return found


def _json_numbers(node) -> list[SourceNumber]:
    if isinstance(node, bool):
        return []
    if isinstance(node, (int, float)):
        return [SourceNumber(float(node))]
    if isinstance(node, str):
        return _text_numbers(node)
    if isinstance(node, dict):
        return [n for value in node.values() for n in _json_numbers(value)] + [n for key in node for n in _text_numbers(key)]
    if isinstance(node, list):
        return [n for value in node for n in _json_numbers(value)]
    return []


def _text_numbers(text: str) -> list[SourceNumber]:
    return [
        SourceNumber(float(m.group(0).removesuffix(m["ratio"] or "").replace(",", "")), "×" if m["ratio"] else None)
        for m in SOURCE_NUMBER.finditer(text)
    ]


def source_numbers(spec: str) -> list[SourceNumber]:
    """Every number of a cited source: `path` (any text file) or `path.json#key.key` (that subtree)."""
    path, _, subtree = spec.partition("#")
    file = ROOT / path
    assert file.is_file(), f"cited source {path} does not exist"
    text = file.read_text(encoding="utf-8")
    if not path.endswith(".json"):
        assert not subtree, f"{spec}: only a JSON source can name a subtree"
        return _text_numbers(text)
    node = json.loads(text)
    for key in filter(None, subtree.split(".")):
        assert isinstance(node, dict) and key in node, f"{spec}: no key {key!r}"
        node = node[key]
    return _json_numbers(node)


@dataclass
class Block:
    document: str
    line: int
    sources: list[str]
    text: str


def figure_blocks(document: Path) -> list[Block]:
    """The figure blocks of a Markdown file: from each marker to the next marker, end comment or `## ` heading."""
    text = document.read_text(encoding="utf-8")
    blocks = []
    for match in MARKER.finditer(text):
        start = match.end()
        ends = [m.start() for m in (MARKER.search(text, start), BLOCK_END.search(text, start)) if m]
        end = min(ends, default=len(text))
        line = text.count("\n", 0, match.start()) + 1
        blocks.append(Block(document.name, line, match.group(1).split(), text[start:end]))
    return blocks


def unmatched(block: Block) -> list[str]:
    numbers = [n for spec in block.sources for n in source_numbers(spec)]
    return [f.text for f in figures_in(block.text) if not any(f.matches(n) for n in numbers)]


DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [block for document in DOCUMENTS for block in figure_blocks(document)]


@pytest.mark.parametrize("block", BLOCKS, ids=[f"{b.document}:{b.line}" for b in BLOCKS])
def test_every_figure_is_in_the_file_it_cites(block):
    assert block.sources, f"{block.document}:{block.line}: a figures marker names no source"
    missing = unmatched(block)
    assert not missing, f"{block.document}:{block.line}: not found in {block.sources}: {missing}"


def test_readme_results_section_is_covered_by_figure_blocks():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("\n## Measured results")
    end = SECTION_END.search(text, start + 2).start()
    section = text[start:end]
    first_marker = MARKER.search(section)
    assert first_marker, "README's results section has no figures marker"
    uncovered = figures_in(section[: first_marker.start()].split("\n", 2)[-1])
    assert not uncovered, f"figures before the first marker of README's results section: {[f.text for f in uncovered]}"
    assert len(MARKER.findall(section)) >= 8  # one per results paragraph or table, not one for the whole section


def test_cited_results_files_name_the_command_that_wrote_them():
    results = {spec.partition("#")[0] for block in BLOCKS for spec in block.sources if spec.startswith("eval/results/")}
    assert results
    for path in sorted(results):
        text = (ROOT / path).read_text(encoding="utf-8")
        assert re.search(r"\b(python|vlcache) [-\w./]+", text), f"{path} does not name the command that wrote it"


def test_the_check_notices_a_changed_figure():
    """The matching is loose on purpose (rounding, units): it must still catch a figure that moved.

    Every figure of two significant digits or more in the blocks is scaled by 1.37 (and by 0.73); nearly all
    of the moved figures must be reported (a few may land on another number of the same file by chance).
    """
    moved = caught = 0
    for block in BLOCKS:
        numbers = [n for spec in block.sources for n in source_numbers(spec)]
        for figure in figures_in(block.text):
            if figure.value / figure.resolution < 10:  # one significant digit: too coarse to move reliably
                continue
            for factor in (1.37, 0.73):
                wrong = Figure(figure.text, figure.value * factor, figure.resolution, figure.unit)
                moved += 1
                caught += not any(wrong.matches(n) for n in numbers)
    assert moved > 200
    assert caught >= 0.9 * moved, f"only {caught} of {moved} moved figures were caught"


@pytest.mark.parametrize(
    ("text", "number", "expected"),
    [
        ("28954 ms", 28953.9, True),
        ("28954 ms", 28955.6, False),
        ("3.45e-2", 3.448e-2, True),
        ("3.45e-2", 3.456e-2, False),
        ("88.75 %", 0.8875, True),
        ("88.75 %", 0.8885, False),
        ("4.3 h", 15608.5, True),
        ("4.3 h", 16000.0, False),
        ("64,000 items", 64000, True),
        ("1.26×", SourceNumber(1.2594, "×"), True),
        ("1.26×", 1.2594, False),
        ("0.97e-2", 9.723e-3, True),
    ],
)
def test_figure_matching_by_hand(text, number, expected):
    (figure,) = figures_in(text)
    number = number if isinstance(number, SourceNumber) else SourceNumber(float(number))
    assert figure.matches(number) is expected


def test_names_and_code_are_not_figures():
    assert figures_in("Qwen2.5-VL and LLaVA-1.5 on x86_64 in fp32, `--items 1000`, [link](eval/results/a1.md) <!-- 7 -->") == []
