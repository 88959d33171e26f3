"""The `vlcache` command line: demo, bench, calibrate, store maintenance.

Every parser is built here (and in the light `store_cli`) without importing torch or transformers, so
`vlcache --help`, `--version` and each subcommand's `--help` answer at once; each handler imports what it
runs. A user mistake (a `VLCacheError`, a missing file or directory, a bad argument) is one line on stderr
and exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import ast
import sys
from importlib.util import find_spec
from pathlib import Path
from typing import NoReturn

from .._version import __version__
from ..errors import VLCacheError

#: `vlcache bench --size` choices: the keys of `vlcache_hf.tools.bench.SIZES` (a test checks they agree)
BENCH_SIZES = ("medium", "small", "smoke", "7b")
#: where `vlcache bench` writes unless `--out` says otherwise: a directory of its own under the current one
BENCH_DEFAULT_OUT = "vlcache-bench"


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line: `vlcache demo: error: ... (see `vlcache demo --help`)`."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _module_doc(module: str) -> str | None:
    """A module's docstring, read from its source without importing it (the module may import torch)."""
    try:
        spec = find_spec(module)
        if spec is None or spec.origin is None:
            return None
        return ast.get_docstring(ast.parse(Path(spec.origin).read_text(encoding="utf-8")))
    except (ImportError, OSError, SyntaxError, ValueError):
        return None


# ------------------------------------------------------------------------------------------- handlers


def _demo(args: argparse.Namespace) -> int:
    from .demo import format_results, run_demo

    description, results = run_demo(args.policy, args.recompute_ratio, args.model, args.max_new_tokens)
    print(format_results(description, args.policy, results, args.recompute_ratio))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .bench import run

    return run(args)


def _calibrate(args: argparse.Namespace) -> int:
    from .calibrate_cli import calibrate_command

    return calibrate_command(args)


# -------------------------------------------------------------------------------------------- parsers


def add_demo_command(sub) -> None:
    demo = sub.add_parser(
        "demo",
        help="multi-turn conversation over images: plain generate vs VLCache, per turn",
        description="A multi-turn conversation over several images, served by plain `generate` and by VLCache "
        "side by side: per turn both answers, TTFT, encoder hits, tokens reused and whether the reuse was exact.",
    )
    demo.add_argument("--policy", default="vlcache", help="selection policy: full, none, first_k, random, cacheblend, "
                      "vlcache or a registered one (default: vlcache)")
    demo.add_argument("--recompute-ratio", type=float, default=0.05,
                      help="share of moved image tokens to recompute, in [0, 1] (default: 0.05)")
    demo.add_argument("--model", default=None, help="a saved model directory (default: the embedded model)")
    demo.add_argument("--max-new-tokens", type=_positive_int, default=12)
    demo.set_defaults(handler=_demo)


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `vlcache bench` (defaults that need torch, such as `--device`, resolve when it runs)."""
    parser.add_argument("--size", choices=BENCH_SIZES, default="medium")
    parser.add_argument("--smoke", action="store_true", help="tiny model, one repeat (for CI; timings are noise)")
    parser.add_argument("--repeats", type=_positive_int, default=None,
                        help="timed repeats per mode after a warm-up (default: the size's, 3; 1 is noise)")
    parser.add_argument("--scenarios", default="abcd", help="subset of a,b,c,d")
    parser.add_argument("--modes", default=None, help="comma-separated mode names, e.g. 'hf-prefix,naive,naive + processor' "
                        "(default: all available; 'hf-prefix + native GQA' runs only when named)")
    parser.add_argument("--sweep", action="store_true", help="also sweep images, tokens per image and budget")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="default: float32 on CPU, bfloat16 on GPU")
    parser.add_argument("--out", default=BENCH_DEFAULT_OUT,
                        help=f"output directory (default: ./{BENCH_DEFAULT_OUT}); files of the same --name there "
                        "are never overwritten without --force")
    parser.add_argument("--name", default=None, help="file stem of the outputs (default: ttft_<size>_<device>)")
    parser.add_argument("--force", action="store_true", help="overwrite earlier results of the same --name in --out")


def add_bench_command(sub) -> None:
    doc = _module_doc("vlcache_hf.tools.bench")
    bench = sub.add_parser(
        "bench",
        help="TTFT benchmark, every reuse mode side by side",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_bench_arguments(bench)
    bench.set_defaults(handler=_bench)


def add_calibrate_command(sub) -> None:
    """`vlcache calibrate` (run by `tools/calibrate_cli.py`, which imports torch: only when it runs; the help
    text is `vlcache_hf.calibration`'s docstring, read without importing it)."""
    calibrate = sub.add_parser(
        "calibrate",
        help="measure per-layer sensitivity to reused K/V and write a LayerProfile (JSON)",
        description=_module_doc("vlcache_hf.calibration"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    calibrate.add_argument("--model", default="default", help="HF model directory, or 'default' (the embedded model)")
    calibrate.add_argument("--data", default=None, help="directory of images (default: synthetic pictures)")
    calibrate.add_argument("--samples", type=_positive_int, default=8, help="number of moved-image requests")
    calibrate.add_argument("--images-per-sample", type=_positive_int, default=3)
    calibrate.add_argument("--seed", type=int, default=0)
    calibrate.add_argument("--out", required=True, help="where to write the profile JSON")
    calibrate.set_defaults(handler=_calibrate)


def build_parser() -> argparse.ArgumentParser:
    from .store_cli import add_store_commands

    parser = _Parser(prog="vlcache", description="vlcache-hf: reuse image encoder and KV caches.")
    parser.add_argument("--version", action="version", version=f"vlcache-hf {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,bench,calibrate,store}")
    add_demo_command(sub)
    add_bench_command(sub)
    add_calibrate_command(sub)
    add_store_commands(sub)
    return parser


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # the command as typed (bench records it with its results)
    try:
        return int(args.handler(args) or 0)
    except (VLCacheError, FileNotFoundError, NotADirectoryError, PermissionError) as err:
        # user mistakes: bad input (VLCacheError is the library's ValueError for it) or a path that is missing
        # or not this user's; other exceptions are bugs and keep their traceback
        print(f"vlcache: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vlcache: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
