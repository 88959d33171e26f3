"""Mutation testing, one critical module at a time, with mutmut 3 and that module's focused tests.

    python eval/mutate.py --list
    python eval/mutate.py rope plan codec          # run these modules (smallest first is a good habit)
    python eval/mutate.py rope --show-survivors    # also print each survivor's diff

The modules, their files and their focused test commands live in pyproject.toml under
`[tool.vlcache-mutation.<module>]`; the options shared by every run are `[tool.mutmut]` there. mutmut reads
one `[tool.mutmut]` per directory, so for each module this script builds a work directory
(`--work`, default /tmp/vlcache-mut/<module>) holding a snapshot of `src/` and `tests/` and a pyproject.toml
whose `[tool.mutmut]` is the shared options plus the module's `only_mutate` and test selection. mutmut then
writes its mutants into that directory's own `mutants/` copy: the repository's `src/` never holds a mutant.

At the end it prints, and with `--json` writes, per module: mutants, killed, survived, timeout, no tests (no
selected test runs the mutated function), other, score ((killed + timeout) / (killed + timeout + survived +
no tests)), and the surviving mutants' names. Survivors and their verdicts
(killed by a new test, or equivalent and why) are recorded by hand in eval/mutation_report.md.

Run it with `OMP_NUM_THREADS=1` on a shared machine; `--max-children` sets mutmut's parallel workers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")


def load_config() -> tuple[dict, dict]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))
    tool = data.get("tool", {})
    return tool.get("mutmut", {}), tool.get("vlcache-mutation", {})


def prepare(module: str, spec: dict, shared: dict, work: Path) -> None:
    """A fresh work dir: snapshot of src/ and tests/, and a pyproject.toml with this module's mutmut section."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "src", work / "src", ignore=ignore)
    shutil.copytree(ROOT / "tests", work / "tests", ignore=ignore)
    options = dict(shared)
    options["only_mutate"] = list(spec["files"])
    options["pytest_add_cli_args_test_selection"] = list(spec["tests"])
    lines = ["[tool.pytest.ini_options]", 'testpaths = ["tests"]', "", "[tool.mutmut]"]
    lines += [f"{key} = {_toml_value(value)}" for key, value in options.items()]
    (work / "pyproject.toml").write_text("\n".join(lines) + "\n", "utf-8")


def mutmut_bin() -> str:
    candidate = Path(sys.executable).with_name("mutmut")
    return str(candidate) if candidate.exists() else "mutmut"


def parse_results(text: str) -> dict[str, str]:
    """`mutmut results --all true` prints `    <mutant name>: <status>` per mutant."""
    status: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, value = line.strip().rpartition(": ")
        if sep and name and "__mutmut_" in name:
            status[name] = value.strip()
    return status


def summarize(status: dict[str, str]) -> dict:
    """Counts per status; score = (killed + timeout) / (killed + timeout + survived + no tests): a mutant that no
    selected test even runs is as alive as one that survives them."""
    counts = {"mutants": len(status), "killed": 0, "survived": 0, "timeout": 0, "no tests": 0, "other": 0}
    for value in status.values():
        counts[value if value in counts else "other"] += 1
    caught = counts["killed"] + counts["timeout"]
    judged = caught + counts["survived"] + counts["no tests"]
    counts["score"] = round(caught / judged, 4) if judged else None
    counts["survivors"] = sorted(name for name, value in status.items() if value == "survived")
    counts["others"] = {name: value for name, value in sorted(status.items()) if value not in ("killed", "survived", "timeout")}
    return counts


def run_module(module: str, spec: dict, shared: dict, work: Path, max_children: int, show: bool) -> dict:
    prepare(module, spec, shared, work)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    # mutmut puts mutants/src first on sys.path of its own workers. (Pointing PYTHONPATH at it too, so that
    # tests which start a Python subprocess would run the mutant there, makes mutmut's stats run record no
    # test at all: tests that check a behaviour only in a subprocess do not count for mutation testing.)
    env.pop("PYTHONPATH", None)
    started = time.monotonic()
    run = subprocess.run([mutmut_bin(), "run", "--max-children", str(max_children)], cwd=work, env=env,
                         capture_output=True, text=True)
    elapsed = time.monotonic() - started
    (work / "mutmut-run.log").write_text(run.stdout + run.stderr, "utf-8")
    if run.returncode != 0:
        tail = (run.stdout + run.stderr)[-2000:]
        print(f"{module}: mutmut run failed ({run.returncode}); log in {work}/mutmut-run.log\n{tail}", file=sys.stderr)
        return {"module": module, "error": f"mutmut run failed ({run.returncode})", "seconds": round(elapsed, 1)}
    res = subprocess.run([mutmut_bin(), "results", "--all", "true"], cwd=work, env=env, capture_output=True, text=True)
    summary = summarize(parse_results(res.stdout))
    summary["module"] = module
    summary["files"] = spec["files"]
    summary["tests"] = spec["tests"]
    summary["seconds"] = round(elapsed, 1)
    if show:
        for name in summary["survivors"]:
            diff = subprocess.run([mutmut_bin(), "show", name], cwd=work, env=env, capture_output=True, text=True)
            print(diff.stdout)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modules", nargs="*", help="module names from [tool.vlcache-mutation] (default: all)")
    parser.add_argument("--list", action="store_true", help="list the configured modules and exit")
    parser.add_argument("--work", type=Path, default=Path("/tmp/vlcache-mut"), help="parent of the work dirs")
    parser.add_argument("--max-children", type=int, default=1, help="mutmut's parallel workers (default 1)")
    parser.add_argument("--show-survivors", action="store_true", help="print each survivor's diff")
    parser.add_argument("--json", type=Path, help="write the per-module summaries here")
    args = parser.parse_args(argv)

    shared, modules = load_config()
    if args.list:
        for name, spec in modules.items():
            print(f"{name}: mutate {' '.join(spec['files'])}; tests {' '.join(spec['tests'])}")
        return 0
    unknown = [m for m in args.modules if m not in modules]
    if unknown:
        parser.error(f"unknown modules {unknown}; configured: {sorted(modules)}")
    summaries = []
    for module in args.modules or list(modules):
        summary = run_module(module, modules[module], shared, args.work / module, args.max_children,
                             args.show_survivors)
        summaries.append(summary)
        if "error" in summary:
            continue
        print(f"{module}: {summary['mutants']} mutants, {summary['killed']} killed, {summary['survived']} survived, "
              f"{summary['timeout']} timeout, {summary['no tests']} no tests, {summary['other']} other, "
              f"score {summary['score']} "
              f"({summary['seconds']} s)", flush=True)
        for name in summary["survivors"]:
            print(f"    survived: {name}")
        for name, value in summary["others"].items():
            print(f"    {value}: {name}")
    if args.json:
        args.json.write_text(json.dumps(summaries, indent=2) + "\n", "utf-8")
    return 1 if any("error" in s for s in summaries) else 0


if __name__ == "__main__":
    sys.exit(main())
