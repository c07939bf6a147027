"""Command-line parsing of dataclass configs: the one flag dialect of every ``xbt`` command.

A command declares its options as dataclasses (one concept each) and calls
:func:`parse_configs`. Every ``init`` field becomes an option:

- ``--field_name`` (the dialect), with ``--field-name`` accepted as an alias;
- its type from the annotation: ``str``, ``int``, ``float``, ``bool`` (``--flag``,
  ``--flag true|false``, ``--no_flag``), ``X | None``, ``list[X]`` / ``tuple[X, ...]``
  (``--field a b c``), ``dict[str, X]`` (``--field name=value ...``), ``Literal[...]``;
- ``metadata["help"]`` as its help text, with the default shown; ``metadata["choices"]``
  restricts the values; ``metadata["positional"]`` makes it a positional argument;
- required when the field has no default (on the command line or in the config file).

A name declared by several of the command's dataclasses is one option that fills them
all (one concept, one name). ``--config FILE`` (YAML or JSON: one flat mapping of option
names) gives values that flags override::

    xbt pretrain-text --config stage1.yaml --epochs 3

Values from a file are checked and converted exactly like flags. Every mistake (an
unknown flag or key, a missing required option, a value of the wrong type, a choice
that does not exist, a file that is missing or not a mapping, and the dataclasses' own
``__post_init__`` checks) raises :class:`~xbt.errors.InputError`, which the console
script prints as one line ``xbt CMD: error: ...`` with exit status 2.

Nothing here imports torch: ``xbt CMD --help`` costs only the command's config modules.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import typing
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from types import UnionType
from typing import Any, Literal, NoReturn

from .errors import InputError

_SCALARS = (str, int, float, bool)
_METAVARS = {str: "TEXT", int: "INT", float: "FLOAT", bool: "true|false"}
_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; each option under its first spelling only (``--batch_size``, not its alias)."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings or action.nargs == 0:
            return super()._format_action_invocation(action)
        metavar = self._format_args(action, self._get_default_metavar_for_optional(action))
        return f"{action.option_strings[0]} {metavar}"


class CommandParser(argparse.ArgumentParser):
    """An :class:`argparse.ArgumentParser` whose errors raise :class:`InputError` instead of printing usage.

    argparse's messages name the option and the value (``argument --epochs: invalid
    value 'abc'; expected an int``); the console script prints them as its one error
    line. ``--help`` still prints and exits with status 0.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("allow_abbrev", False)  # a prefix of an option is a typo, not that option
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise InputError(message)


@dataclasses.dataclass(frozen=True)
class Option:
    """One command-line option, derived from a dataclass field."""

    name: str
    kind: type                      # the scalar type of the value (or of each item)
    container: type | None = None   # list, tuple or dict (of ``kind``), or None for a scalar
    optional: bool = False          # ``X | None``: None is a valid value
    choices: tuple | None = None
    positional: bool = False
    help: str = ""
    required: bool = False          # the field has no default
    default: Any = None             # the field's default, for the help text

    @property
    def flag(self) -> str:
        return self.name if self.positional else f"--{self.name}"

    def describe(self) -> str:
        """What a value must be, for error messages: 'an int', 'a list, each one of a, b', ..."""
        if self.choices is not None:
            what = "one of " + ", ".join(map(str, self.choices))
        else:
            what = {str: "a string", int: "an int", float: "a float", bool: "true or false"}[self.kind]
        if self.container is dict:
            what = f"a mapping of names, each to {what}"
        elif self.container is not None:
            what = f"a list, each {what}"
        return what + (" (or null)" if self.optional else "")


def _option(field: dataclasses.Field, annotation: Any, owner: type) -> Option:
    """The :class:`Option` of one dataclass field (TypeError for an annotation no flag can express)."""
    where = f"{owner.__name__}.{field.name}: {annotation!r}"
    optional = False
    if typing.get_origin(annotation) in (typing.Union, UnionType):
        members = [member for member in typing.get_args(annotation) if member is not type(None)]
        if len(members) != 1:
            raise TypeError(f"{where}: only 'X | None' unions can be options")
        optional, annotation = True, members[0]
    container = None
    origin = typing.get_origin(annotation)
    if origin in (list, tuple):
        items = typing.get_args(annotation)
        if origin is tuple and (len(items) != 2 or items[1] is not Ellipsis):
            raise TypeError(f"{where}: tuples must be tuple[X, ...]")
        container, annotation = origin, items[0]
    elif origin is dict:
        key, annotation = typing.get_args(annotation)
        if key is not str:
            raise TypeError(f"{where}: mappings must have str keys")
        container = dict
    choices = field.metadata.get("choices")
    if typing.get_origin(annotation) is Literal:
        choices = typing.get_args(annotation)
        annotation = type(choices[0])
    if annotation not in _SCALARS:
        raise TypeError(f"{where}: option values must be str, int, float or bool")
    default = field.default
    if field.default_factory is not dataclasses.MISSING:
        default = field.default_factory()
    required = default is dataclasses.MISSING
    return Option(field.name, annotation, container, optional, tuple(choices) if choices is not None else None,
                  bool(field.metadata.get("positional")), field.metadata.get("help", ""), required,
                  None if required else default)


def options_of(config_types: Sequence[type]) -> dict[str, Option]:
    """The options of a command's dataclasses by name, in declaration order (a shared name once)."""
    options: dict[str, Option] = {}
    for kind in config_types:
        hints = typing.get_type_hints(kind)
        for field in dataclasses.fields(kind):
            if not field.init:
                continue
            option = _option(field, hints[field.name], kind)
            known = options.get(field.name)
            if known is None:
                options[field.name] = option
                continue
            if (known.kind, known.container, known.optional, known.choices) != (
                    option.kind, option.container, option.optional, option.choices):
                raise TypeError(f"{kind.__name__}.{field.name} has another type than the option of that name "
                                f"in an earlier config of the same command")
            if option.required and not known.required:  # one value fills both: it must be given
                options[field.name] = dataclasses.replace(known, required=True, default=None)
    return options


def option_names(config_types: Sequence[type]) -> list[str]:
    """The option names of a command's (or a config section's) dataclasses."""
    return list(options_of(config_types))


# -- values: one conversion for flags, config files and fit sections ------------------------------------------------

def _scalar(option: Option, value: Any) -> Any:
    """``value`` as ``option.kind`` (strings are parsed like flags), or ValueError."""
    kind = option.kind
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        raise ValueError
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError
    if kind is int:
        if isinstance(value, float):
            raise ValueError
        return int(value)  # a str that is no int raises ValueError
    if kind is float:
        return float(value)
    return str(value)  # a number given for a str option (YAML reads `split: 2024` as an int)


def convert(option: Option, value: Any) -> Any:
    """``value`` (from a file, a mapping or a parsed flag) checked and converted for ``option``.

    Raises :class:`InputError` naming the option, the value and what is allowed.
    """
    def fail() -> NoReturn:
        raise InputError(f"option {option.flag}: invalid value {value!r}; expected {option.describe()}.")

    if value is None:
        if option.optional:
            return None
        fail()
    try:
        if option.container is dict:
            if not isinstance(value, Mapping) or not all(isinstance(key, str) for key in value):
                fail()
            converted: Any = {key: _scalar(option, item) for key, item in value.items()}
            items = list(converted.values())
        elif option.container is not None:
            if isinstance(value, (str, Mapping)) or not isinstance(value, Collection):
                fail()
            items = [_scalar(option, item) for item in value]
            converted = option.container(items)
        else:
            converted = _scalar(option, value)
            items = [converted]
    except ValueError:
        fail()
    if option.choices is not None and any(item not in option.choices for item in items):
        fail()
    return converted


def _convert_all(options: Mapping[str, Option], values: Mapping[str, Any]) -> dict[str, Any]:
    unknown = [name for name in values if name not in options]
    if unknown:
        raise InputError(f"unknown options {unknown}; allowed: {', '.join(options)}.")
    return {name: convert(options[name], value) for name, value in values.items()}


def _instantiate(config_types: Sequence[type], options: Mapping[str, Option], given: Mapping[str, Any],
                 where_missing: str = "") -> tuple:
    missing = [option.flag for name, option in options.items()
               if option.required and name not in given]
    if missing:
        raise InputError(f"the following options are required: {', '.join(missing)}{where_missing}.")
    # a value not given leaves the dataclass's own default (and default_factory)
    return tuple(kind(**{field.name: given[field.name] for field in dataclasses.fields(kind)
                         if field.init and field.name in given})
                 for kind in config_types)


def configs_from_mapping(config_types: Sequence[type], values: Mapping[str, Any], where: str) -> tuple:
    """Instances of ``config_types`` from one flat mapping of option names to values.

    The dict half of :func:`parse_configs`, for example for a section of an ``xbt fit``
    file. Unknown names, values of the wrong type, missing required options and the
    dataclasses' own ``__post_init__`` checks raise :class:`InputError` whose message
    starts with ``where`` (e.g. ``"section stage2 of fit.yaml"``). A value not given
    leaves the dataclass's own default.
    """
    options = options_of(config_types)
    try:
        return _instantiate(config_types, options, _convert_all(options, values))
    except InputError as error:
        raise InputError(f"{where}: {error}") from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a .yaml/.yml/.json file (InputError when missing, unparsable or not a mapping)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise InputError(f"config file {str(path)!r} does not exist.")
    text = path.read_text()
    try:
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as error:
        raise InputError(f"config file {str(path)!r} is not valid JSON: {error.msg} "
                         f"(line {error.lineno}, column {error.colno}).") from error
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(error, "problem", None) or " ".join(str(error).split())
        raise InputError(f"config file {str(path)!r} is not valid YAML: {problem}{where}.") from error
    if not isinstance(values, dict):
        raise InputError(f"config file {str(path)!r} must hold one mapping of option names to values, "
                         f"not {type(values).__name__}.")
    return values


# -- the command line -----------------------------------------------------------------------------------------------

def _bool_text(text: str) -> bool:
    if text.lower() in _TRUE + _FALSE:
        return text.lower() in _TRUE
    raise argparse.ArgumentTypeError(f"invalid value {text!r}; expected true or false")


def _item_parser(option: Option):
    """The argparse ``type`` of one command-line word of ``option`` (its messages name the value)."""
    def parse(text: str) -> Any:
        if option.container is dict:
            name, sep, text = text.partition("=")
            if not sep or not name:
                raise argparse.ArgumentTypeError(f"invalid value {name + sep + text!r}; expected NAME=VALUE")
        try:
            value = _scalar(option, text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}; expected {option.describe()}") from None
        if option.choices is not None and value not in option.choices:
            raise argparse.ArgumentTypeError(f"invalid choice {text!r}; choose from "
                                             f"{', '.join(map(str, option.choices))}")
        return (name, value) if option.container is dict else value

    return parse


class _ListOnce(argparse.Action):
    """A list option takes all its values after one flag: a repeat would silently drop the first values."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if hasattr(namespace, self.dest):
            raise argparse.ArgumentError(self, f"given more than once; give it once with all its values, "
                                               f"e.g. {self.option_strings[0]} A B")
        setattr(namespace, self.dest, values)


def _help(option: Option) -> str:
    text = option.help.replace("%", "%%")
    if "default" in text.lower() and not option.required:  # the help text says it already
        return text
    if option.required:
        suffix = "required"
    elif option.container is not None and not option.default:
        suffix = "default: none"
    else:
        default = option.default
        if option.container is dict:
            default = " ".join(f"{key}={value}" for key, value in default.items())
        elif option.container is not None:
            default = " ".join(map(str, default))
        suffix = f"default: {default}".replace("%", "%%")
    if option.kind is bool and option.container is None:
        suffix += f"; --no_{option.name} sets false"
    return f"{text} ({suffix})" if text else f"({suffix})"


def _add(group: argparse._ArgumentGroup, option: Option) -> None:
    # Every option defaults to SUPPRESS, so the namespace holds exactly what was given;
    # required options are checked after merging with --config.
    common: dict[str, Any] = {"dest": option.name, "default": argparse.SUPPRESS, "help": _help(option),
                              "metavar": _METAVARS[option.kind]}
    if option.choices is not None:
        common["metavar"] = "{" + ",".join(map(str, option.choices)) + "}"
    if option.container is dict:
        common["metavar"] = "NAME=VALUE"
    if option.positional:
        del common["dest"]
        common["metavar"] = option.name.upper() if option.choices is None else common["metavar"]
        group.add_argument(option.name, nargs="*" if option.container else "?", type=_item_parser(option), **common)
        return
    flags = [f"--{option.name}"] + ([f"--{option.name.replace('_', '-')}"] if "_" in option.name else [])
    if option.kind is bool and option.container is None:
        group.add_argument(*flags, nargs="?", const=True, type=_bool_text, **common)
        negations = [f"--no_{option.name}", f"--no-{option.name.replace('_', '-')}"]
        group.add_argument(*negations, action="store_const", const=False, dest=option.name,
                           default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        return
    if option.container:
        group.add_argument(*flags, nargs="+", type=_item_parser(option), action=_ListOnce, **common)
    else:
        group.add_argument(*flags, type=_item_parser(option), **common)


def _title(kind: type) -> str:
    """A dataclass's docstring first line, unless it is the one dataclasses generate."""
    doc = (kind.__doc__ or "").strip()
    return "" if not doc or doc.startswith(f"{kind.__name__}(") else doc.splitlines()[0]


def build_parser(config_types: Sequence[type], prog: str, description: str | None) -> CommandParser:
    """The parser of a command: one argument group per dataclass, plus ``--config``."""
    parser = CommandParser(prog=prog, description=description)
    parser.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                        help="YAML or JSON file: one mapping of option names (as spelled here, without --) to "
                             "values; flags given on the command line override it")
    seen: set[str] = set()
    for kind in config_types:
        group = parser.add_argument_group(kind.__name__, _title(kind) or None)
        for name, option in options_of([kind]).items():
            if name not in seen:
                seen.add(name)
                _add(group, option)
    return parser


def parse_configs(types: Sequence[type], argv: Sequence[str], prog: str, description: str | None) -> tuple:
    """Instances of the dataclasses ``types`` from ``--config FILE`` (optional) overridden by the flags in ``argv``.

    ``prog`` is the command as the user types it (``"xbt train"``), ``description`` the
    text ``--help`` prints above the options. ``--help`` prints and raises SystemExit(0);
    every mistake raises :class:`InputError` (see the module docstring).
    """
    options = options_of(types)
    namespace = vars(build_parser(types, prog, description).parse_args(list(argv)))
    config_file = namespace.pop("config", None)
    given: dict[str, Any] = {}
    if config_file is not None:
        values = read_config_file(config_file)
        try:
            given = _convert_all(options, values)
        except InputError as error:  # say where the bad value came from
            raise InputError(f"config file {config_file!r}: {error}") from None
    for name, value in namespace.items():
        if options[name].container is dict:  # NAME=VALUE words, parsed into pairs
            if len(dict(value)) != len(value):
                raise InputError(f"option {options[name].flag}: a name is given twice in {value!r}.")
            value = dict(value)
        given[name] = convert(options[name], value)  # lists of tuple options become tuples
    return _instantiate(types, options, given, " (on the command line or in a --config file)")


# -- xbt fit FILE --section.option VALUE ----------------------------------------------------------------------------

def apply_dotted_overrides(values: Mapping[str, Any], argv: Sequence[str], *,
                           schema: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A copy of the nested mapping ``values`` with ``--a.b VALUE`` / ``--a.b=VALUE`` words of ``argv`` applied.

    For ``xbt fit FILE --stage2.max_steps 3 --run_dir x``: each dotted name is a path into
    the mapping (``stage2`` → ``max_steps``); each value is read with ``yaml.safe_load``
    (``3`` → 3, ``true`` → True, ``[a, b]`` → a list), so it is then checked like a value
    in the file. ``schema`` (optional) lists what may be set: a mapping of top-level names
    to ``None`` (a plain value) or to the collection of a section's option names (e.g.
    :func:`option_names` of the section's dataclasses). Without a schema, any key is set
    and the section's own parsing judges it. Raises :class:`InputError` for a word that
    is not ``--name``, a name without a value, a path through something that is not a
    section, or (with ``schema``) a section or key that does not exist, naming both.
    """
    import yaml

    result = copy.deepcopy(dict(values))
    words = list(argv)
    position = 0
    while position < len(words):
        word = words[position]
        if not word.startswith("--") or len(word) == 2:
            raise InputError(f"unexpected argument {word!r}; overrides are written --section.option VALUE.")
        name, sep, text = word[2:].partition("=")
        if not sep:
            if position + 1 >= len(words) or words[position + 1].startswith("--"):
                raise InputError(f"option --{name} expects a value.")
            position += 1
            text = words[position]
        position += 1
        path = name.split(".")
        if not all(path):
            raise InputError(f"option --{name}: empty part in the dotted name.")
        if schema is not None:
            _check_path(path, schema)
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text  # not YAML (e.g. an unbalanced bracket): the string itself
        node = result
        for depth, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise InputError(f"option --{name}: {'.'.join(path[:depth + 1])!r} is not a section "
                                 f"(it holds {child!r}).")
            node = child
        node[path[-1]] = value
    return result


def _check_path(path: list[str], schema: Mapping[str, Any]) -> None:
    """InputError unless ``path`` names a top-level value or a section's option in ``schema``."""
    flag = "--" + ".".join(path)
    top, rest = path[0], path[1:]
    if top not in schema:
        raise InputError(f"option {flag}: unknown name {top!r}; allowed: {', '.join(schema)}.")
    section = schema[top]
    if section is None or isinstance(section, str):
        if rest:
            raise InputError(f"option {flag}: {top!r} is a value, not a section.")
        return
    if len(rest) != 1:
        raise InputError(f"option {flag}: write --{top}.OPTION with one option name of section {top!r}.")
    if rest[0] not in section:
        raise InputError(f"option {flag}: section {top!r} has no option {rest[0]!r}; "
                         f"allowed: {', '.join(section)}.")
