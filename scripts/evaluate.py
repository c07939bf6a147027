"""Evaluate adapters and baselines: the same as ``xbt eval`` (see ``xbt eval --help``)."""

import sys

from xbt.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
