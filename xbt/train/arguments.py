"""Dataclass configs from command-line flags or one YAML/JSON file (transformers' HfArgumentParser)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import InputError

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def parse_configs(types: Sequence[type], argv: Sequence[str] | None, prog: str, description: str) -> tuple[Any, ...]:
    """One instance of each dataclass in ``types``.

    ``argv`` is either flags (``--name value``) or a single YAML/JSON file whose keys are
    the fields of all the dataclasses together; unknown keys are refused.
    """
    from transformers import HfArgumentParser

    parser = HfArgumentParser(list(types), prog=prog, description=description)
    argv = list(argv or [])
    if len(argv) == 1 and argv[0].endswith(CONFIG_SUFFIXES):
        path = Path(argv[0])
        if not path.is_file():
            raise InputError(f"Config file {str(path)!r} does not exist.")
        try:
            if path.suffix == ".json":
                return tuple(parser.parse_json_file(str(path), allow_extra_keys=False))
            return tuple(parser.parse_yaml_file(str(path), allow_extra_keys=False))
        except (ValueError, TypeError) as error:
            raise InputError(f"Config file {str(path)!r}: {error}") from error
    return tuple(parser.parse_args_into_dataclasses(argv))
