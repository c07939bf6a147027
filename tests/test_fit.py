"""``xbt fit``: cache -> stage 1 -> stage 2 from one config file, finished steps skipped."""

from __future__ import annotations

import json
import logging

import pytest
import yaml

from xbt.cli import main as cli
from xbt.demo.models import BUILDERS, TinyClipConfig
from xbt.errors import InputError
from xbt.model import XBTModel
from xbt.train.fit import FitConfig, fit

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
    return {"old_model": old_ref, "new_model": new_ref, "run_dir": str(root / "run"),
            "stage1": {"captions": str(root / "captions.txt"), "epochs": 1, "batch_size": 16, "baselines": ""},
            "stage2": {"source": str(root / "pairs"), "max_steps": 2, "batch_size": 8, "max_bad_fraction": 0.2,
                       "save_steps": 2}}


def test_fit_runs_both_stages_then_skips_them(config_values, tmp_path, caplog):
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(config_values))
    assert cli(["fit", str(path)]) == 0
    adapter = FitConfig.from_file(path).run_dir + "/stage2/adapter"
    model = XBTModel.from_pretrained(adapter)
    assert model.old_reference == config_values["old_model"]
    assert json.loads(open(f"{adapter}/xbt_config.json").read())["training"]["steps"] == 2

    weights = open(f"{adapter}/adapter_model.safetensors", "rb").read()
    with caplog.at_level(logging.INFO, logger="xbt"):
        fit(FitConfig.from_file(path))
    assert sum("already done" in r.message for r in caplog.records) == 2
    assert open(f"{adapter}/adapter_model.safetensors", "rb").read() == weights

    changed = {**config_values, "stage2": {**config_values["stage2"], "max_steps": 3}}
    with pytest.raises(InputError, match="made with other options"):
        fit(FitConfig(**changed))


def test_fit_config_errors(config_values, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({**config_values, "epochs": 3}))
    with pytest.raises(InputError, match=r"unknown keys \['epochs'\]"):
        FitConfig.from_file(path)
    with pytest.raises(InputError, match="set by xbt fit"):
        fit(FitConfig(**{**config_values, "stage2": {"output_dir": "elsewhere"}}))
    with pytest.raises(InputError, match="Section stage1"):
        fit(FitConfig(**{**config_values, "run_dir": str(tmp_path / "r"), "stage1": {"no_such_option": 1}}))
