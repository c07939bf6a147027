"""The ``xbt`` console script.

Each subcommand lives in the module that owns its concept and is imported only when
it runs, so ``xbt --help`` stays fast. A subcommand is a function ``run(argv) -> int``
that builds its own parser (usually from dataclass configs).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

# name -> (module:function, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("xbt.commands:info", "load a model reference and print its dims, fingerprint and LoRA targets"),
    "demo": ("xbt.demo.run:main", "run the embedded default end to end on generated data and tiny models"),
    "eval": ("xbt.eval_cli:main", "cross-model retrieval matrix, backfill curve and report (faiss)"),
    "train": ("xbt.train.pair_stage:run", "stage 2: train LoRA adapters + ψ on image-text pairs (accelerate-ready)"),
    "pretrain-text": ("xbt.train.text_stage:run", "stage 1: train the projection ψ (new → old text space) from cached caption embeddings"),
    "fit": ("xbt.train.fit:run", "the whole training from one config file: cache, stage 1, stage 2 (done steps skipped)"),
    "push": ("xbt.hub:push_command", "publish an adapter directory (with model card and eval) to the Hugging Face Hub"),
    "check-pairs": ("xbt.data.check:main", "decode every image of an image-text source once and report bad files"),
}


def _version() -> str:
    from . import __version__

    return __version__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xbt",
        description="Cross-modal backward-compatible training: make a new CLIP model's embeddings "
                    "searchable against an old model's gallery, without re-embedding the gallery.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {name:<16}{text}" for name, (_, text) in COMMANDS.items())
               + "\n\nRun 'xbt COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"xbt {_version()}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("command", nargs="?", choices=sorted(COMMANDS), metavar="COMMAND")
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    options = parser.parse_args(argv)
    if options.command is None:
        parser.print_help()
        return 0
    # xbt's own logs at INFO by default; other libraries' chatter only with -v.
    logging.basicConfig(level=logging.INFO if options.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("xbt").setLevel(logging.DEBUG if options.verbose else logging.INFO)
    target, _ = COMMANDS[options.command]
    module_name, function_name = target.split(":")
    command = getattr(importlib.import_module(module_name), function_name)

    from .errors import XBTError

    try:
        return int(command(options.args) or 0)
    except XBTError as error:
        print(f"xbt {options.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
