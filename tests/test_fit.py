"""``xbt fit``: cache -> stage 1 -> stage 2 from one config file; checked first, finished steps skipped, resumable."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from xbt.cli import main as cli
from xbt.demo.models import BUILDERS, TinyClipConfig
from xbt.errors import InputError
from xbt.model import XBTModel
from xbt.train.checkpoints import list_checkpoints
from xbt.train.fit import config_from, fit, plan
from xbt.train.records import RECORD_FILE

from helpers import write_pairs


@pytest.fixture(scope="module")
def config_values(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fit")
    new_ref = BUILDERS["open_clip"](root / "new", TinyClipConfig(seed=0))
    old_ref = BUILDERS["hf"](root / "old", TinyClipConfig(embed_dim=24, width=32, seed=1))
    write_pairs(root / "pairs", 16)
    colours, shapes = ("red", "green", "blue", "yellow", "white"), ("square", "circle", "star", "triangle")
    (root / "captions.txt").write_text("\n".join(f"a {size} {c} {s}" for c in colours for s in shapes
                                                 for size in ("small", "large", "tiny")) + "\n")
    # bf16 in both sections: one Accelerator serves both stages, each autocasts on its own.
    return {"old_model": old_ref, "new_model": new_ref, "run_dir": str(root / "run"), "cpu": True,
            "cache": {"cache_dtype": "float32"},
            "stage1": {"captions": str(root / "captions.txt"), "epochs": 1, "batch_size": 16, "baselines": "",
                       "mixed_precision": "bf16"},
            "stage2": {"source": str(root / "pairs"), "max_steps": 4, "batch_size": 8, "max_bad_fraction": 0.2,
                       "save_steps": 2, "mixed_precision": "bf16"}}


def adapter_weights(folder: Path) -> dict:
    return {**load_file(str(folder / "adapter_model.safetensors")), **load_file(str(folder / "projection" / "model.safetensors"))}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


def test_fit_in_bf16_runs_both_stages_skips_them_and_resumes(config_values, tmp_path, caplog):
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(config_values))
    assert cli(["fit", str(path)]) == 0
    adapter = Path(config_from(path).run_dir) / "stage2" / "adapter"
    model = XBTModel.from_pretrained(adapter)
    assert model.old_reference == config_values["old_model"]
    assert json.loads((adapter / "xbt_config.json").read_text())["training"]["steps"] == 4
    finished = adapter_weights(adapter)

    with caplog.at_level(logging.INFO, logger="xbt"):
        fit(config_from(path))
    assert sum("already done" in r.message for r in caplog.records) == 2
    assert same(adapter_weights(adapter), finished)

    # A fit killed after stage 2's step-2 checkpoint: rerun, it resumes there and ends with the same weights.
    stage2 = adapter.parent
    for checkpoint in list_checkpoints(stage2)[1:]:
        shutil.rmtree(checkpoint)
    shutil.rmtree(adapter)
    record = json.loads((stage2 / RECORD_FILE).read_text())
    (stage2 / RECORD_FILE).write_text(json.dumps({**record, "finished": False}))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="xbt"):
        fit(config_from(path))
    assert any("Resumed from" in r.message and "at step 2 of 4" in r.message for r in caplog.records)
    loads = [r.getMessage() for r in caplog.records if r.name.startswith("xbt.backbones") and
             r.getMessage().startswith("Loaded ")]
    for reference in (config_values["old_model"], config_values["new_model"]):  # each model loaded once per run
        assert sum(message.startswith(f"Loaded {reference} ") for message in loads) == 1, loads
    assert same(adapter_weights(adapter), finished)

    with pytest.raises(InputError, match="made with other options"):
        fit(config_from(path, ["--stage2.max_steps", "5"]))


def test_dotted_overrides_reach_their_section_with_yaml_types(config_values, tmp_path):
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(config_values))
    checked = plan(config_from(path, ["--stage2.max_steps", "3", "--stage1.epochs=2", "--run_dir", str(tmp_path / "x"),
                                      "--stage2.loss_weights", "{new_new: 1, anchor: 0.5}"]))
    stage2, stage1 = checked.stage2[0], checked.stage1[2]
    assert stage2.max_steps == 3 and stage1.epochs == 2 and checked.config.run_dir == str(tmp_path / "x")
    assert stage2.output_dir == str(tmp_path / "x" / "stage2") and stage2.given_weights == {"new_new": 1.0,
                                                                                            "anchor": 0.5}
    assert checked.cache.cache_dir == str(tmp_path / "x" / "cache") and checked.cache.cache_dtype == "float32"


@pytest.mark.parametrize("change, message", [
    ({"stage2": {"source": "x", "lerning_rate": 0.1}},
     r"Section stage2: unknown key\(s\) \['lerning_rate'\]; allowed keys: \[.*'learning_rate'"),
    ({"stage1": {"epochs": 0}}, "Section stage1: epochs: got 0"),
    ({"stage1": {"mixed_precision": "fp8"}}, "Section stage1: mixed_precision: got 'fp8'"),
    ({"stage2": {"source": "x", "max_steps": -1}}, "Section stage2: max_steps: got -1"),
    ({"stage2": {"source": "x", "batch_size": 1}}, "Section stage2: batch_size: got 1"),
    ({"stage2": {"source": "x", "loss_weights": "anchr=1"}}, r"Section stage2: loss_weights: unknown term\(s\)"),
    ({"stage2": {"source": "x", "loss_weights": {"text_to_old_image": 1.0}}},
     "Section stage2: .*the term text_to_old_image needs stored old image embeddings"),
    ({"stage2": {"source": "x", "loss_weights": "full_new=1"}},  # stage 1's ψ decides: no extra dims by default
     "Section stage2: .*the term full_new needs a ψ with extra dimensions"),
    ({"stage2": {"source": "x", "output_dir": "elsewhere"}}, r"\['output_dir'\] are set by xbt fit itself"),
    ({"cache": {"cache_dtype": "int8"}}, "Section cache: cache_dtype must be one of"),
    ({"stage2": "max_steps: 3"}, "Section stage2: got 'max_steps: 3'; allowed: a mapping"),
])
def test_every_section_is_checked_before_any_model_is_read(tmp_path, change, message):
    # The models do not exist: an error about the sections proves nothing tried to load them first.
    values = {"old_model": f"hf:{tmp_path}/no-old", "new_model": f"open_clip:local-dir:{tmp_path}/no-new",
              "run_dir": str(tmp_path / "run"), "stage2": {"source": "x"}, **change}
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(values))
    started = time.perf_counter()
    with pytest.raises(InputError, match=message):
        fit(config_from(path))
    logging.getLogger(__name__).info("rejected in %.3f s", time.perf_counter() - started)
    assert not (tmp_path / "run").exists()  # nothing was written either


def test_fit_file_errors_through_the_console_script(config_values, tmp_path, capsys):
    rows = [
        ({**config_values, "epochs": 3}, [], r"unknown key(s) ['epochs'] at the top level; allowed keys:"),
        ("- a\n- list\n", [], "must hold one mapping"),
        (None, [], "does not exist"),
        (config_values, ["--stage3.max_steps", "1"], "unknown key(s) ['stage3'] at the top level"),
        (config_values, ["--stage2.max_steps"], "option --stage2.max_steps expects a value"),
        ({k: v for k, v in config_values.items() if k != "run_dir"}, [], "missing key(s) ['run_dir']"),
    ]
    for number, (content, overrides, message) in enumerate(rows):
        path = tmp_path / f"fit{number}.yaml"
        if content is not None:
            path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
        assert cli(["fit", str(path), *overrides]) == 2, message
        error = capsys.readouterr().err
        assert message in error and "Traceback" not in error, error
