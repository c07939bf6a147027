"""Command-line parsing of dataclass configs (the pattern every ``xbt`` stage command follows).

A command declares its options as dataclasses (one concept each, field ``metadata["help"]``
as the help text) and calls :func:`parse_configs`. transformers' ``HfArgumentParser``
turns every field into a ``--flag``; ``--config FILE`` (YAML or JSON, one flat mapping
of field names) provides values that flags given on the command line override::

    xbt pretrain-text --config stage1.yaml --epochs 3

Unknown keys in a config file, like unknown flags, are errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import InputError


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A flat mapping of option names to values from a .yaml/.yml/.json file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise InputError(f"Config file {str(path)!r} does not exist.")
    text = path.read_text()
    try:
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise InputError(f"Config file {str(path)!r} is not valid {path.suffix[1:].upper()}: {error}") from error
    if not isinstance(values, dict):
        raise InputError(f"Config file {str(path)!r} must hold one mapping of option names to values.")
    return values


def parse_configs(types: Sequence[type], argv: Sequence[str], prog: str, description: str) -> tuple:
    """Instances of ``types`` from ``--config FILE`` (optional) overridden by the flags in ``argv``."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(list(types), prog=prog, description=description)
    parser.add_argument("--config", default=None, help="YAML or JSON file of option values (flags override it)")
    known = {field.name for kind in types for field in dataclasses.fields(kind)}
    # --config alone first: the file may provide options that are otherwise required.
    only_config = argparse.ArgumentParser(add_help=False)
    only_config.add_argument("--config", default=None)
    options, _ = only_config.parse_known_args(list(argv))
    if options.config:
        values = read_config_file(options.config)
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"Config file {options.config!r} has unknown options {unknown}; known: {sorted(known)}.")
        parser.set_defaults(**values)
        for action in parser._actions:  # an option the file gives is no longer required on the command line
            if action.dest in values:
                action.required = False
    # the result also holds a namespace with --config itself, then the unparsed strings
    results = parser.parse_args_into_dataclasses(list(argv), return_remaining_strings=True)
    if results[-1]:
        parser.error(f"unrecognized arguments: {' '.join(results[-1])}")
    return tuple(results[: len(types)])
