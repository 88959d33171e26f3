"""The `vlcache` command line: demo, bench, calibrate, store maintenance."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from .demo import format_results, run_demo

    description, results = run_demo(args.policy, args.recompute_ratio, args.model, args.max_new_tokens)
    print(format_results(description, args.policy, results))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlcache", description="vlcache-hf: reuse image encoder and KV caches.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="multi-turn conversation over images: plain vs VLCache, per turn")
    demo.add_argument("--policy", default="vlcache", help="selection policy (default: vlcache)")
    demo.add_argument("--recompute-ratio", type=float, default=0.05)
    demo.add_argument("--model", default=None, help="a saved model directory (default: the embedded model)")
    demo.add_argument("--max-new-tokens", type=int, default=12)
    demo.set_defaults(handler=_demo)

    # `bench` has its own parser (vlcache_hf.bench); listed here for --help, dispatched in main
    sub.add_parser("bench", help="TTFT benchmark, every mode side by side (see `vlcache bench --help`)", add_help=False)

    for module, adder in (("store_cli", "add_store_commands"), ("calibration", "add_calibrate_command")):
        try:
            mod = __import__(f"vlcache_hf.{module}", fromlist=[adder])
        except ImportError:
            continue
        if hasattr(mod, adder):
            getattr(mod, adder)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from .bench import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
