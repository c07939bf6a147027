"""The console script's contract: one flag dialect from dataclasses, ``--config`` everywhere,
help without torch, and every bad input ending in one ``xbt CMD: error:`` line (exit status 2)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
import yaml

from xbt.cli import COMMANDS
from xbt.config import apply_dotted_overrides, configs_from_mapping, option_names, parse_configs
from xbt.errors import InputError

from helpers import write_pairs

XBT = [sys.executable, "-m", "xbt"]


def run_xbt(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """The real console script in a fresh process (stderr is a pipe, not a terminal)."""
    return subprocess.run([*XBT, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})


# -- the bad-input table ----------------------------------------------------------------------------------------------

OLD, NEW = "open_clip:local-dir:{tmp}/no_old_model", "hf:{tmp}/no_new_model"  # never loaded: checks come first
PRETRAIN = ["pretrain-text", "--captions", "{tmp}/captions.txt", "--old_model", OLD, "--new_model", NEW,
            "--output_dir", "{tmp}/psi"]
TRAIN = ["train", "--old_model", OLD, "--new_model", NEW, "--projection", "{tmp}/psi", "--output_dir", "{tmp}/out",
         "--source", "{tmp}/pairs"]
STORED_EVAL = ["eval", "--galleries", "old={tmp}/gallery.npy", "--queries", "old={tmp}/queries.npy",
               "--output_dir", "{tmp}/eval"]
FIT_FILE = {"old_model": OLD, "new_model": NEW, "run_dir": "{tmp}/run",
            "stage1": {"captions": "{tmp}/captions.txt"}, "stage2": {"source": "{tmp}/pairs"}}
CAPTIONS = "".join(f"a caption number {i}\n" for i in range(20))
VECTORS = np.random.default_rng(0).normal(size=(6, 8)).astype(np.float32)  # six stored 8-d embeddings


ROWS = [
    # (argv, files written into tmp first, fragments the one error line must hold)
    pytest.param(["pretrain-text", *PRETRAIN[1:], "--kind", "quadratic"], {"captions.txt": CAPTIONS},
                 ["kind", "'quadratic'"], id="unknown-psi-kind"),
    pytest.param([*TRAIN, "--lora_rank", "0"], {}, ["lora_rank", "0"], id="lora-rank-0"),
    pytest.param([*PRETRAIN, "--learning_rate", "-0.001"], {"captions.txt": CAPTIONS}, ["learning_rate", "-0.001"],
                 id="negative-learning-rate"),
    pytest.param([*TRAIN, "--max_steps", "-1"], {}, ["max_steps", "-1"], id="max-steps-negative"),
    pytest.param([*TRAIN, "--mixed_precision", "fp12"], {}, ["mixed_precision", "'fp12'"], id="mixed-precision-unknown"),
    pytest.param(["pretrain-text", "--config", "{tmp}/stage1.yaml"], {"stage1.yaml": {"learning_rat": 0.1}},
                 ["stage1.yaml", "'learning_rat'", "learning_rate"], id="yaml-unknown-key"),
    pytest.param(["eval", "--config", "{tmp}/eval.yaml"], {"eval.yaml": {"gallery_size": 3}},
                 ["eval.yaml", "'gallery_size'"], id="eval-yaml-unknown-key"),
    pytest.param(["check-pairs", "--config", "{tmp}/list.yaml"], {"list.yaml": "- source\n- pairs\n"},
                 ["list.yaml", "mapping"], id="yaml-not-a-mapping"),
    pytest.param(["train", "--config", "{tmp}/broken.yaml"], {"broken.yaml": "source: [unclosed\n"},
                 ["broken.yaml", "not valid YAML", "line 2"], id="yaml-syntax-error"),
    pytest.param(["pretrain-text", "--config", "{tmp}/types.yaml"], {"types.yaml": {"epochs": "three"}},
                 ["types.yaml", "--epochs", "'three'", "int"], id="yaml-value-of-wrong-type"),
    pytest.param(["demo", "--config", "{tmp}/nowhere.yaml"], {}, ["nowhere.yaml", "does not exist"],
                 id="config-file-missing"),
    pytest.param(["info", "foo:bar"], {}, ["'foo:bar'", "open_clip:", "hf:"], id="unknown-backend-prefix"),
    pytest.param([*STORED_EVAL, "--gallery_ids", "{tmp}/ids.txt", "--query_ids", "{tmp}/ids.txt"],
                 {"gallery.npy": VECTORS, "queries.npy": VECTORS, "ids.txt": "a\nb\nc\n"}, ["gallery.npy", "6", "3"],
                 id="gallery-ids-count"),
    pytest.param(STORED_EVAL, {"gallery.npy": VECTORS, "queries.npy": VECTORS[:, :4].copy()},
                 ["dimension 4", "has 8"], id="gallery-wrong-dimension"),
    pytest.param([*PRETRAIN], {"captions.txt": "\n  \n"}, ["captions.txt", "no usable captions"],
                 id="empty-caption-file"),
    pytest.param(["check-pairs", "--source", "{tmp}/pairs", "--bogus", "1"], {}, ["--bogus"], id="unknown-flag"),
    pytest.param(TRAIN[:-2], {}, ["required", "--source"], id="missing-required-option"),
    pytest.param([*PRETRAIN, "--epochs", "three"], {"captions.txt": CAPTIONS}, ["--epochs", "'three'", "int"],
                 id="not-an-int"),
    pytest.param(["check-pairs", "--source", "{tmp}/pairs", "--shuffle", "maybe"], {}, ["--shuffle", "'maybe'"],
                 id="not-a-bool"),
    pytest.param(["demo", "--preset", "slow"], {}, ["--preset", "'slow'", "fast"], id="choice-that-does-not-exist"),
    pytest.param([*PRETRAIN, "--loss", "hinge"], {"captions.txt": CAPTIONS}, ["loss", "'hinge'"],
                 id="unknown-stage1-loss"),
    pytest.param(["check-pairs", "--source", "{tmp}/pairs", "--format", "zip"], {}, ["format", "'zip'"],
                 id="unknown-data-format"),
    pytest.param(["check-pairs", "--source", "{tmp}/nowhere"], {}, ["nowhere", "does not exist"],
                 id="source-folder-missing"),
    pytest.param(["eval", "--old_model", OLD, "--new_model", NEW, "--eval_set", "{tmp}/nowhere", "--output_dir",
                  "{tmp}/eval"], {},
                 ["nowhere", "does not exist"], id="eval-set-folder-missing"),
    pytest.param(["fit", "{tmp}/fit.yaml"], {"fit.yaml": {**FIT_FILE, "stage2": {"source": "{tmp}/pairs",
                                                                                 "max_stepz": 3}}},
                 ["stage2", "'max_stepz'"], id="fit-unknown-section-key"),
    pytest.param(["fit", "{tmp}/fit.yaml", "--stage2.nonexistent", "3"], {"fit.yaml": FIT_FILE},
                 ["stage2", "'nonexistent'"], id="fit-dotted-override-unknown-key"),
    pytest.param(["fit", "{tmp}/fit.yaml"], {"fit.yaml": "- a list\n"}, ["fit.yaml", "mapping"],
                 id="fit-file-not-a-mapping"),
    pytest.param(["push", "--adapter_dir", "{tmp}/no_adapter", "--repo_id", "org/repo"], {}, ["no_adapter", "does not exist"],
                 id="push-adapter-missing"),
    pytest.param(["push", "--adapter_dir", "{tmp}/no_adapter", "--repo_id", "org/repo", "--bogus"], {}, ["--bogus"], id="push-unknown-flag"),
    pytest.param(["info", "foo:bar", "--device_map", "x"], {}, ["--device_map"], id="info-unknown-flag"),
    pytest.param(["trian"], {}, ["'trian'", "train"], id="unknown-command"),
]


def _fill(value: Any, tmp: Path) -> Any:
    if isinstance(value, str):
        return value.replace("{tmp}", str(tmp))
    if isinstance(value, dict):
        return {key: _fill(item, tmp) for key, item in value.items()}
    return value


def _write(files: dict[str, Any], tmp: Path) -> None:
    for name, content in files.items():
        path = tmp / name
        if isinstance(content, np.ndarray):
            np.save(path, content)
        elif isinstance(content, dict):
            path.write_text(yaml.safe_dump(_fill(content, tmp)))
        else:
            path.write_text(content)


@pytest.fixture(scope="module")
def pairs_folder(tmp_path_factory) -> Path:
    """A real (small) image-text folder for the rows that need a source that exists."""
    root = tmp_path_factory.mktemp("cli_pairs")
    write_pairs(root / "pairs", 4)
    return root / "pairs"


@pytest.fixture(scope="module")
def row_results(request, tmp_path_factory, pairs_folder) -> dict[str, subprocess.CompletedProcess]:
    """The console script's result for every selected row, the processes run side by side (each one waits on
    Python's and its command's imports far more than it computes)."""
    selected = {item.callspec.id for item in request.session.items
                if getattr(item, "originalname", None) == "test_bad_input_is_one_error_line"}

    def run_row(row) -> tuple[str, subprocess.CompletedProcess]:
        argv, files, _ = row.values
        tmp = tmp_path_factory.mktemp(row.id)
        (tmp / "pairs").symlink_to(pairs_folder)
        _write(files, tmp)
        return row.id, run_xbt([_fill(word, tmp) for word in argv], tmp)

    with ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 1))) as pool:
        return dict(pool.map(run_row, [row for row in ROWS if row.id in selected]))


@pytest.mark.parametrize("argv, files, fragments", ROWS)
def test_bad_input_is_one_error_line(argv, files, fragments, request, row_results):
    result = row_results[request.node.callspec.id]
    command = argv[0] if argv[0] in COMMANDS else None
    prefix = f"xbt {command}: error: " if command else "xbt: error: "
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), result.stderr
    missing = [fragment for fragment in fragments if fragment not in lines[0]]
    assert not missing, f"{missing} not in: {lines[0]}"
    assert result.returncode == 2


# -- help and version without torch -----------------------------------------------------------------------------------

# Runs the console script in-process, then reports whether torch got imported on the way.
PROBE = ("import json, runpy, sys\n"
         "sys.argv = ['xbt', *sys.argv[1:]]\n"
         "code = 0\n"
         "try:\n"
         "    runpy.run_module('xbt', run_name='__main__')\n"
         "except SystemExit as exit:\n"
         "    code = exit.code\n"
         "print(json.dumps({'code': code, 'torch': 'torch' in sys.modules}), file=sys.stderr)\n")
HELP_ROWS = [pytest.param(["--help"], id="xbt --help"), pytest.param(["--version"], id="xbt --version")] + [
    pytest.param([name, "--help"], id=f"xbt {name} --help") for name in COMMANDS]


@pytest.mark.parametrize("args", HELP_ROWS)
def test_help_and_version_do_not_import_torch(args, tmp_path):
    result = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    report = json.loads(result.stderr.splitlines()[-1])
    assert report["code"] in (0, None), result.stderr
    assert result.stdout.startswith("usage: xbt" if args[-1] == "--help" else "xbt ")
    assert not report["torch"]


def test_import_xbt_is_lazy_and_complete(tmp_path):
    script = ("import sys, xbt\n"
              "assert 'torch' not in sys.modules, 'import xbt imported torch'\n"
              "assert set(xbt.__all__) <= set(dir(xbt))\n"
              "from xbt import images\n"
              "assert xbt.InputError.__module__ == 'xbt.errors'\n"
              "assert xbt.load_backbone.__module__.startswith('xbt.backbones') and 'torch' in sys.modules\n"
              "assert all(getattr(xbt, name) is not None for name in xbt.__all__)\n"
              "try:\n"
              "    xbt.not_a_name\n"
              "except AttributeError as error:\n"
              "    assert 'not_a_name' in str(error)\n"
              "else:\n"
              "    raise SystemExit('no AttributeError')\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# -- progress bars --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, bar_shown", [([], False), (["--progress"], True)], ids=["default", "--progress"])
def test_progress_bars_only_on_a_terminal_or_asked_for(flags, bar_shown, tmp_path, pairs_folder):
    # check-pairs draws a tqdm bar "checking pairs"; stderr here is a pipe, as in CI logs.
    result = run_xbt([*flags, "check-pairs", "--source", str(pairs_folder), "--max_bad_fraction", "0.5"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert ("checking pairs" in result.stderr) is bar_shown, result.stderr


# -- the parser itself (in-process) -----------------------------------------------------------------------------------

@dataclass
class Inputs:
    """Where things come from."""

    source: str = field(metadata={"help": "the data folder"})
    kind: Literal["linear", "mlp"] = field(default="mlp", metadata={"help": "shape of ψ"})
    towers: list[str] = field(default_factory=lambda: ["text", "image"], metadata={"help": "towers to adapt"})
    ks: tuple[int, ...] = field(default=(1, 5), metadata={"help": "recall cut-offs"})
    hidden_dim: int | None = field(default=None, metadata={"help": "hidden width"})
    weights: dict[str, float] = field(default_factory=dict, metadata={"help": "loss weights by term"})
    report_to: str = field(default="none", metadata={"help": "trackers", "choices": ("none", "tensorboard")})


@dataclass
class Run:
    """How the run goes."""

    learning_rate: float = field(default=1e-4, metadata={"help": "peak learning rate (100% = 1)"})
    max_steps: int = field(default=10, metadata={"help": "optimizer steps"})
    learn_temperature: bool = field(default=True, metadata={"help": "train the temperature"})
    seed: int = field(default=0, metadata={"help": "seed"})

    def __post_init__(self):
        if self.max_steps < 1:
            raise InputError(f"--max_steps must be at least 1, got {self.max_steps}.")


@dataclass
class Other:
    seed: int = field(default=0, metadata={"help": "seed"})


def parse(argv: list[str]) -> tuple:
    return parse_configs([Inputs, Run, Other], argv, prog="xbt test", description="a test command")


@pytest.mark.parametrize("argv, expected", [
    (["--source", "d"], {"source": "d", "kind": "mlp", "towers": ["text", "image"], "ks": (1, 5),
                         "learning_rate": 1e-4, "learn_temperature": True}),
    (["--source=d", "--kind", "linear", "--towers", "text", "--ks", "1", "10", "--hidden_dim", "64"],
     {"kind": "linear", "towers": ["text"], "ks": (1, 10), "hidden_dim": 64}),
    (["--source", "d", "--learning-rate", "3e-4", "--max-steps", "7", "--hidden-dim", "8"],
     {"learning_rate": 3e-4, "max_steps": 7, "hidden_dim": 8}),  # the dashed spelling is an alias
    (["--source", "d", "--learn_temperature"], {"learn_temperature": True}),
    (["--source", "d", "--learn_temperature", "false"], {"learn_temperature": False}),
    (["--source", "d", "--no_learn_temperature"], {"learn_temperature": False}),
    (["--source", "d", "--no-learn-temperature"], {"learn_temperature": False}),
    (["--source", "d", "--weights", "anchor=0.5", "new_new=1"], {"weights": {"anchor": 0.5, "new_new": 1.0}}),
    (["--source", "d", "--seed", "3"], {"seed": 3}),
])
def test_flags_of_every_type(argv, expected):
    inputs, run, other = parse(argv)
    values = {**dataclasses.asdict(inputs), **dataclasses.asdict(run)}
    assert {name: values[name] for name in expected} == expected
    assert other.seed == run.seed  # one name, one option: it fills every dataclass that declares it


@pytest.mark.parametrize("argv, fragments", [
    (["--kind", "quadratic", "--source", "d"], ["--kind", "'quadratic'", "linear, mlp"]),
    (["--source", "d", "--report_to", "wandb"], ["--report_to", "'wandb'", "tensorboard"]),
    (["--source", "d", "--max_steps", "1.5"], ["--max_steps", "'1.5'", "int"]),
    (["--source", "d", "--learning_rate", "fast"], ["--learning_rate", "'fast'", "float"]),
    (["--source", "d", "--learn_temperature", "maybe"], ["--learn_temperature", "'maybe'"]),
    (["--source", "d", "--weights", "anchor"], ["--weights", "'anchor'", "NAME=VALUE"]),
    (["--source", "d", "--weights", "a=1", "a=2"], ["--weights", "twice"]),
    (["--source", "d", "--max_steps", "0"], ["--max_steps", "0"]),  # __post_init__'s own InputError
    (["--source", "d", "--max_stp", "3"], ["--max_stp"]),  # no prefix matching
    (["--source", "d", "stray"], ["stray"]),
    ([], ["required", "--source"]),
])
def test_flag_errors_are_input_errors(argv, fragments):
    with pytest.raises(InputError) as caught:
        parse(argv)
    assert all(fragment in str(caught.value) for fragment in fragments), str(caught.value)
    assert "\n" not in str(caught.value)


def test_config_file_values_are_checked_like_flags_and_flags_override_them(tmp_path):
    path = tmp_path / "c.yaml"
    # YAML reads 1e-3 as a string and 64 as an int; both are converted like the flag words would be.
    path.write_text("source: d\nlearning_rate: 1e-3\nks: [1, 10]\nhidden_dim: 64\nlearn_temperature: false\n"
                    "weights: {anchor: 1}\n")
    inputs, run, _ = parse(["--config", str(path), "--hidden_dim", "8"])
    assert (inputs.source, run.learning_rate, inputs.ks, inputs.hidden_dim, run.learn_temperature, inputs.weights) \
        == ("d", 1e-3, (1, 10), 8, False, {"anchor": 1.0})
    (tmp_path / "c.json").write_text(json.dumps({"source": "j", "max_steps": 4}))
    assert parse(["--config", str(tmp_path / "c.json")])[1].max_steps == 4


@pytest.mark.parametrize("text, fragments", [
    ("source: d\nmax_steps: three\n", ["c.yaml", "--max_steps", "'three'"]),
    ("source: d\nmax_steps: 2.5\n", ["--max_steps", "2.5"]),
    ("source: d\nkind: cubic\n", ["--kind", "'cubic'"]),
    ("source: d\ntowers: text\n", ["--towers", "list"]),
    ("source: d\nsource_dir: x\n", ["unknown options ['source_dir']", "allowed: source, kind"]),
    ("source: null\n", ["--source", "None"]),
    ("- a\n", ["c.yaml", "mapping"]),
    ("source: [\n", ["c.yaml", "not valid YAML"]),
    ("max_steps: 0\nsource: d\n", ["--max_steps", "0"]),
    ("kind: mlp\n", ["required", "--source"]),
])
def test_config_file_errors(text, fragments, tmp_path):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(InputError) as caught:
        parse(["--config", str(tmp_path / "c.yaml")])
    assert all(fragment in str(caught.value) for fragment in fragments), str(caught.value)


def test_help_lists_every_option_with_its_help_and_default(capsys):
    with pytest.raises(SystemExit) as exit:
        parse(["--help"])
    assert exit.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for fragment in ("usage: xbt test", "--config FILE", "the data folder (required)", "--kind {linear,mlp}",
                     "shape of ψ (default: mlp)", "peak learning rate (100% = 1) (default: 0.0001)",
                     "--towers TEXT [TEXT ...] towers to adapt (default: text image)",
                     "--learn_temperature [true|false]", "--no_learn_temperature sets false", "Where things come from."):
        assert fragment in text
    assert "--learning-rate" not in text  # aliases are accepted, not advertised


def test_configs_from_mapping_names_where_the_values_came_from():
    inputs, run, _ = configs_from_mapping([Inputs, Run, Other], {"source": "s", "max_steps": "5"}, "section stage2")
    assert (inputs.source, run.max_steps) == ("s", 5)
    for values, fragment in [({"source": "s", "max_stepz": 1}, "unknown options ['max_stepz']"),
                             ({"source": "s", "max_steps": 0}, "--max_steps must be at least 1, got 0"),
                             ({}, "required: --source")]:
        with pytest.raises(InputError, match="^section stage2: ") as caught:
            configs_from_mapping([Inputs, Run, Other], values, "section stage2")
        assert fragment in str(caught.value)


SCHEMA = {"old_model": None, "run_dir": None, "stage2": option_names([Run])}


def test_dotted_overrides_set_nested_values_read_as_yaml():
    values = {"run_dir": "a", "stage2": {"max_steps": 800, "seed": 1}}
    result = apply_dotted_overrides(values, ["--stage2.max_steps", "3", "--run_dir=x", "--stage2.learning_rate",
                                             "1e-3", "--stage2.learn_temperature", "false"], schema=SCHEMA)
    assert result == {"run_dir": "x", "stage2": {"max_steps": 3, "seed": 1, "learning_rate": "1e-3",
                                                 "learn_temperature": False}}
    assert values["stage2"]["max_steps"] == 800  # the input mapping is not changed
    # ... and the section's parsing converts what YAML left a string
    assert configs_from_mapping([Run], result["stage2"], "stage2")[0].learning_rate == 1e-3
    assert apply_dotted_overrides({}, ["--stage3.x", "[1, 2]"]) == {"stage3": {"x": [1, 2]}}  # no schema: any key


@pytest.mark.parametrize("argv, fragments", [
    (["--stage2.nonexistent", "3"], ["--stage2.nonexistent", "section 'stage2'", "'nonexistent'", "max_steps"]),
    (["--stage3.max_steps", "3"], ["'stage3'", "stage2"]),
    (["--run_dir.x", "3"], ["'run_dir'", "not a section"]),
    (["--stage2.max_steps"], ["--stage2.max_steps", "expects a value"]),
    (["stray"], ["'stray'"]),
])
def test_dotted_override_errors(argv, fragments):
    with pytest.raises(InputError) as caught:
        apply_dotted_overrides({"run_dir": "a", "stage2": {}}, argv, schema=SCHEMA)
    assert all(fragment in str(caught.value) for fragment in fragments), str(caught.value)
