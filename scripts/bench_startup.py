"""Start-up time of the ``xbt`` console script: ``--help``, ``--version`` and every ``xbt CMD --help``.

Each row is the median wall time of N fresh ``python -m xbt ...`` processes, next to
``python -c pass`` (the interpreter's own start-up, the floor no command can beat) and
whether the command imported torch. Measure another checkout (for example main, to
compare before and after) with ``--root``::

    python scripts/bench_startup.py --runs 7
    python scripts/bench_startup.py --runs 7 --root /path/to/other/checkout
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Prints after the command ran, in the same process: did it import torch?
_PROBE = ("import runpy, sys\n"
          "sys.argv = ['xbt', *sys.argv[1:]]\n"
          "try:\n"
          "    runpy.run_module('xbt', run_name='__main__')\n"
          "except SystemExit:\n"
          "    pass\n"
          "print('XBT-TORCH-IMPORTED' if 'torch' in sys.modules else 'XBT-TORCH-NOT-IMPORTED', file=sys.stderr)\n")


def _environment(root: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}


def commands(root: Path) -> list[str]:
    """The command names of the checkout at ``root`` (read from its own ``xbt.cli.COMMANDS``)."""
    output = subprocess.run([sys.executable, "-c", "from xbt.cli import COMMANDS; print(' '.join(COMMANDS))"],
                            env=_environment(root), capture_output=True, text=True, check=True)
    return output.stdout.split()


def median_seconds(argv: list[str], root: Path, runs: int) -> float:
    """Median wall time of ``runs`` fresh processes of ``python ARGV``."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, *argv], env=_environment(root), capture_output=True, check=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def imports_torch(xbt_args: list[str], root: Path) -> bool:
    result = subprocess.run([sys.executable, "-c", _PROBE, *xbt_args], env=_environment(root),
                            capture_output=True, text=True, check=False)
    return "XBT-TORCH-IMPORTED" in result.stderr


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="processes per row (the median is reported)")
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1],
                        help="checkout to measure (default: this one)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    options = parser.parse_args()

    rows = [("python -c pass", ["-c", "pass"], None)]
    rows += [(f"xbt {' '.join(args)}", ["-m", "xbt", *args], args)
             for args in (["--help"], ["--version"], *([name, "--help"] for name in commands(options.root)))]
    results = []
    print(f"{'command':<28}{'median s':>10}{'torch':>8}   ({options.runs} runs each, root {options.root})")
    for label, argv, xbt_args in rows:
        seconds = median_seconds(argv, options.root, options.runs)
        torch = None if xbt_args is None else imports_torch(xbt_args, options.root)
        results.append({"command": label, "median_s": round(seconds, 3), "imports_torch": torch})
        print(f"{label:<28}{seconds:>10.3f}{'' if torch is None else ('yes' if torch else 'no'):>8}", flush=True)
    if options.json:
        options.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
