"""The ``xbt`` console script.

Each subcommand lives in the module that owns its concept and is imported only when
it runs, so ``xbt --help`` and ``xbt --version`` import nothing heavy. A subcommand is
a function ``run(argv) -> int`` that parses its options with
:func:`xbt.config.parse_configs` from its dataclass configs; its module imports torch
and friends inside functions only, so ``xbt CMD --help`` stays fast too.

Every :class:`~xbt.errors.XBTError` (argparse's own errors included: see
:class:`xbt.config.CommandParser`) ends as one line ``xbt CMD: error: MESSAGE`` on
stderr and exit status 2.

Output: logging is configured once here (xbt's own INFO messages by default; other
libraries' with ``-v``). Progress bars (tqdm, datasets, huggingface_hub) show only
when stderr is a terminal, so CI logs stay readable; ``xbt --progress CMD`` shows them
anyway (see :func:`configure_progress`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from .config import CommandParser
from .errors import XBTError

# name -> (module:function, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("xbt.commands:info", "load a model reference and print its dims, fingerprint and LoRA targets"),
    "demo": ("xbt.demo.command:main", "run the embedded default end to end on generated data and tiny models"),
    "eval": ("xbt.eval_cli:main", "cross-model retrieval matrix, backfill curve and report (faiss)"),
    "train": ("xbt.train.commands:train", "stage 2: train LoRA adapters + ψ on image-text pairs (accelerate-ready)"),
    "pretrain-text": ("xbt.train.commands:pretrain_text", "stage 1: train the projection ψ (new → old text space) from cached caption embeddings"),
    "fit": ("xbt.train.fit:run", "the whole training from one config file: cache, stage 1, stage 2 (done steps skipped)"),
    "embed": ("xbt.embed:run", "encode images or texts into a space (old, native model, xbt: adapter) as sharded safetensors + faiss"),
    "export": ("xbt.export:run", "write an adapter as a standalone checkpoint (LoRA merged, ψ folded) or ONNX"),
    "plan": ("xbt.plan_command:run", "order a stored gallery for backfilling; predicted curve and cost in hours"),
    "push": ("xbt.hub:push_command", "publish an adapter directory (with model card and eval) to the Hugging Face Hub"),
    "check-pairs": ("xbt.data.check:main", "decode every image of an image-text source once and report bad files"),
}

# Environment switches of the progress bars xbt's dependencies draw; read when those libraries are imported.
PROGRESS_SWITCHES = ("TQDM_DISABLE", "HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS")


def configure_progress(show: bool | None = None) -> None:
    """Switch progress bars off unless ``show`` is True or (``show`` None) stderr is a terminal.

    Works through the libraries' environment switches (``TQDM_DISABLE=1`` and the
    datasets / huggingface_hub ones), so it must run before tqdm is imported, and child
    processes (``accelerate launch`` workers) inherit it. Without an explicit choice a
    switch the user set already is left alone; ``show=True`` (``--progress``) clears the
    switches, since they may be left from an earlier call in the same process. Entry points
    other than this console script (the scripts that ``accelerate launch`` runs) call it
    first thing.
    """
    if show is True:
        for name in PROGRESS_SWITCHES:
            os.environ.pop(name, None)
        return
    if show is None and sys.stderr.isatty():
        return
    for name in PROGRESS_SWITCHES:
        os.environ.setdefault(name, "1")


def _version() -> str:
    from . import __version__

    return __version__


def _parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="xbt",
        description="Cross-modal backward-compatible training: make a new CLIP model's embeddings "
                    "searchable against an old model's gallery, without re-embedding the gallery.",
        epilog="commands:\n" + "\n".join(f"  {name:<16}{text}" for name, (_, text) in COMMANDS.items())
               + "\n\nRun 'xbt COMMAND --help' for a command's options. Every command reads --config FILE "
                 "(YAML or JSON) too; flags override it.",
    )
    parser.add_argument("--version", action="version", version=f"xbt {_version()}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("--progress", action="store_true",
                        help="show progress bars even when stderr is not a terminal (by default only on one)")
    parser.add_argument("command", nargs="?", choices=sorted(COMMANDS), metavar="COMMAND")
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def _one_line(message: str) -> str:
    return "; ".join(line.strip() for line in message.splitlines() if line.strip())


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        options = parser.parse_args(argv)
    except XBTError as error:
        print(f"xbt: error: {_one_line(str(error))}", file=sys.stderr)
        return 2
    if options.command is None:
        parser.print_help()
        return 0
    # xbt's own logs at INFO by default; other libraries' chatter only with -v.
    logging.basicConfig(level=logging.INFO if options.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("xbt").setLevel(logging.DEBUG if options.verbose else logging.INFO)
    configure_progress(True if options.progress else None)
    target, _ = COMMANDS[options.command]
    module_name, function_name = target.split(":")
    try:
        command = getattr(importlib.import_module(module_name), function_name)
        return int(command(options.args) or 0)
    except XBTError as error:
        print(f"xbt {options.command}: error: {_one_line(str(error))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
