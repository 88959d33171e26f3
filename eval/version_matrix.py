"""Run the test suite under other transformers releases and record what passed: the source of README's
"tested with" versions.

    python eval/version_matrix.py --transformers 5.18.0 5.24.0 --out eval/results/version_matrix.md

For each release it makes a virtual environment under `--work` that sees this interpreter's packages
(a `.pth` file: torch and the rest are shared, nothing large is downloaded) and installs only that
transformers release (and whatever it pins) into it, so it shadows this environment's copy. It then runs
the README's test command there (`python -m pytest -q`, plus `--pytest-args`) from the repository root and
records the versions actually imported, the pytest summary line and the time. Any failure is kept in the
table as it is: the script never retries.
"""

from __future__ import annotations

import argparse
import platform
import re
import site
import subprocess
import sys
import time
import venv
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
VERSIONS_PROBE = "import sys, torch, transformers; print(transformers.__version__, torch.__version__, sys.version.split()[0])"


def make_env(work: Path, transformers_version: str) -> Path:
    """A venv that layers one transformers release over this interpreter's site-packages; its python."""
    env = work / f"transformers-{transformers_version}"
    python = env / "bin" / "python"
    if not python.exists():
        venv.create(env, with_pip=True)
        inner = Path(subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
        # addsitedir (not a bare path) so the parent's own .pth files run too: the editable install's finder
        parents = "; ".join(f"site.addsitedir({d!r})" for d in site.getsitepackages())
        (inner / "zz_shared_parent.pth").write_text(f"import site; {parents}\n", encoding="utf-8")
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", f"transformers=={transformers_version}"],
        check=True,
    )
    return python


def run_suite(python: Path, pytest_args: list[str]) -> dict:
    versions = subprocess.check_output([python, "-c", VERSIONS_PROBE], text=True, cwd=ROOT).split()
    start = time.perf_counter()
    run = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args], cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    lines = [line for line in run.stdout.splitlines() if re.search(r"\b(passed|failed|error)", line)]
    summary = lines[-1].strip("= ") if lines else f"no summary (exit {run.returncode})"
    failed = [line for line in run.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return {
        "transformers": versions[0],
        "torch": versions[1],
        "python": versions[2],
        "exit": run.returncode,
        "summary": summary,
        "failed": failed,
        "seconds": round(seconds),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transformers", nargs="+", required=True, help="transformers releases to test")
    parser.add_argument("--work", type=Path, default=Path("/tmp/vlcache-versions"), help="where the venvs go")
    parser.add_argument("--pytest-args", default="", help="extra pytest arguments, e.g. '-x'")
    parser.add_argument("--out", type=Path, default=ROOT / "eval" / "results" / "version_matrix.md")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)

    rows = []
    for version in tqdm(args.transformers, desc="transformers releases", unit="release"):
        rows.append(run_suite(make_env(args.work, version), args.pytest_args.split()))
        tqdm.write(f"transformers {version}: {rows[-1]['summary']}")
    shown = " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# The test suite under each transformers release",
        "",
        f"Command: `python eval/version_matrix.py {shown}` — {platform.machine()}, {platform.system()}; "
        "README's test command (`python -m pytest -q`) in a venv that layers the release over the project's environment.",
        "",
        "| transformers | torch | python | pytest | exit | time s |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['transformers']} | {row['torch']} | {row['python']} | {row['summary']} | {row['exit']} | {row['seconds']} |")
    for row in rows:
        if row["failed"]:
            lines += ["", f"Failed under transformers {row['transformers']}:", "", *[f"- `{line}`" for line in row["failed"]]]
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0 if all(row["exit"] == 0 for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
