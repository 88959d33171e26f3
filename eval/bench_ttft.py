"""TTFT benchmark (same as `vlcache bench`): every reuse mode side by side. See `--help`."""

import sys

from vlcache_hf.tools.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
