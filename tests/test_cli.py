"""The `vlcache` command line: help without torch, `--version`, one-line user errors with exit code 2, no
directory created by read-only commands, and `bench --out` that never overwrites results without `--force`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import vlcache_hf
from vlcache_hf.tools.cli import BENCH_DEFAULT_OUT, BENCH_SIZES, build_parser, main

HELP_COMMANDS = [
    ["--help"],
    ["--version"],
    ["demo", "--help"],
    ["bench", "--help"],
    ["calibrate", "--help"],
    ["store", "--help"],
    ["store", "ls", "--help"],
    ["store", "stats", "--help"],
    ["store", "verify", "--help"],
    ["store", "gc", "--help"],
]

# Runs `python -m vlcache_hf.tools.cli ARGS` for each command in one fresh interpreter, then reports its exit
# codes, outputs and which heavy modules got imported along the way.
RUNNER = """
import contextlib, io, json, runpy, sys
report = []
for argv in json.loads(sys.argv[1]):
    sys.argv = ["vlcache", *argv]
    out = io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out):
        try:
            runpy.run_module("vlcache_hf.tools.cli", run_name="__main__")
        except SystemExit as exit:
            code = exit.code
    report.append({"argv": argv, "code": code, "out": out.getvalue()})
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "safetensors", "matplotlib"))
print(json.dumps({"report": report, "heavy": heavy}))
"""


def test_help_and_version_import_no_torch():
    """Every `--help` (and `--version`) is answered before torch or transformers is imported (no timing here:
    the latency figures are in the closing note of issue 15)."""
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, json.dumps(HELP_COMMANDS)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["heavy"] == []
    for item in result["report"]:
        assert item["code"] == 0, item
        assert item["out"].strip(), item
    by_argv = {" ".join(item["argv"]): item["out"] for item in result["report"]}
    assert by_argv["--version"].strip() == f"vlcache-hf {vlcache_hf.__version__}"
    for name in ("demo", "bench", "calibrate", "store"):
        assert name in by_argv["--help"]
    assert "--force" in by_argv["bench --help"] and "--budget" in by_argv["store gc --help"]
    assert "LayerProfile" in by_argv["calibrate --help"]  # calibration's docstring, read without importing it


def test_version_matches_the_package_metadata():
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1) == vlcache_hf.__version__


def test_bench_options_agree_with_the_benchmark():
    from vlcache_hf.tools.bench import SIZES

    assert sorted(BENCH_SIZES) == sorted(SIZES)
    args = build_parser().parse_args(["bench"])
    assert args.out == BENCH_DEFAULT_OUT and "eval" not in Path(args.out).parts
    assert args.device is None and not args.force  # the device is resolved when the benchmark runs


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("command", ["ls", "stats", "verify"])
def test_read_only_store_commands_do_not_create_a_missing_directory(command, tmp_path, capsys):
    missing = tmp_path / "missing"
    assert main(["store", command, "--path", str(missing)]) == 2
    assert one_line_error(capsys) == f"vlcache: error: no cache directory at {missing}"
    assert not missing.exists()


def test_store_on_a_file_and_gc_on_a_missing_directory(tmp_path, capsys):
    file = tmp_path / "file"
    file.write_text("x")
    assert main(["store", "ls", "--path", str(file)]) == 2
    assert "is not a directory" in one_line_error(capsys)
    assert main(["store", "gc", "--path", str(tmp_path / "missing"), "--budget", "1GB"]) == 2
    assert "no cache directory" in one_line_error(capsys) and not (tmp_path / "missing").exists()


@pytest.mark.parametrize("budget", ["0", "--budget=-1GB", "abc", "12 parsecs", "0.0001B"])
def test_gc_bad_budgets_are_one_line_errors(budget, tmp_path, capsys):
    option = [budget] if budget.startswith("--") else ["--budget", budget]
    assert main(["store", "gc", "--path", str(tmp_path), *option]) == 2
    assert one_line_error(capsys).startswith("vlcache: error: --budget: ")


def test_gc_negative_temp_age_is_an_error(tmp_path, capsys):
    assert main(["store", "gc", "--path", str(tmp_path), "--budget", "1GB", "--temp-age", "-1"]) == 2
    assert "--temp-age" in one_line_error(capsys)


def test_usage_errors_are_one_line_exit_2(capsys):
    for argv in ([], ["demo", "--max-new-tokens", "0"], ["demo", "--recompute-ratio", "x"], ["bench", "--size", "huge"],
                 ["bench", "--repeats", "0"], ["store", "gc", "--path", "p"], ["nonsense"]):
        with pytest.raises(SystemExit) as exit:
            main(argv)
        assert exit.value.code == 2
        assert one_line_error(capsys).startswith("vlcache")


def test_demo_input_mistakes_fail_before_loading_a_model(tmp_path, capsys):
    assert main(["demo", "--policy", "bogus"]) == 2
    assert "unknown policy 'bogus'" in one_line_error(capsys)
    assert main(["demo", "--recompute-ratio", "1.5"]) == 2
    assert "recompute_ratio" in one_line_error(capsys)
    assert main(["demo", "--model", "/nonexistent"]) == 2
    assert one_line_error(capsys) == "vlcache: error: --model /nonexistent: no such model directory"
    assert main(["demo", "--model", str(tmp_path)]) == 2  # a directory that is not a model
    assert "cannot load it" in one_line_error(capsys)


def test_user_errors_leave_no_traceback_in_a_real_process(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "vlcache_hf.tools.cli", "store", "ls", "--path", str(tmp_path / "missing")],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip() == f"vlcache: error: no cache directory at {tmp_path / 'missing'}"


def test_bench_refuses_to_overwrite_results_without_force(tmp_path, capsys):
    earlier = tmp_path / "smoke.md"
    earlier.write_text("committed results")
    assert main(["bench", "--smoke", "--out", str(tmp_path), "--name", "smoke"]) == 2
    err = one_line_error(capsys)
    assert str(earlier) in err and "--force" in err
    assert earlier.read_text() == "committed results"
    file = tmp_path / "a-file"
    file.write_text("")
    assert main(["bench", "--smoke", "--out", str(file)]) == 2
    assert "not a directory" in one_line_error(capsys)
    assert main(["bench", "--smoke", "--scenarios", "xz", "--out", str(tmp_path / "new")]) == 2
    assert "--scenarios" in one_line_error(capsys)
    assert main(["bench", "--smoke", "--modes", "full,bogus", "--out", str(tmp_path / "new")]) == 2
    assert "bogus" in one_line_error(capsys) and not (tmp_path / "new").exists()


def test_bench_markdown_flags_one_repeat_as_noise():
    from vlcache_hf.tools.bench import ModeResult, markdown

    row = ModeResult("b", "naive", {"median": 0.01, "min": 0.01, "max": 0.01}, speedup=98.0)
    noisy, measured = markdown([row], repeats=1), markdown([row], repeats=3)
    assert "speedup vs full †" in noisy and "noise" in noisy.splitlines()[-1]
    assert "†" not in measured and "noise" not in measured
