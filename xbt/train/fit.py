"""``xbt fit CONFIG``: the whole training (caption cache -> stage 1 -> stage 2) from one config file.

The file (YAML or JSON) names the two models and a run folder once, and each stage's
options in its own section (the stages share option names such as ``learning_rate``)::

    old_model: open_clip:ViT-B-32/openai
    new_model: hf:openai/clip-vit-large-patch14
    run_dir: runs/my-upgrade
    stage1:                     # CaptionConfig, CacheConfig, ProjectionConfig, TextStageConfig options
      captions: captions.txt
      epochs: 5
    stage2:                     # PairStageConfig, PairDataConfig, AdapterConfig, CacheConfig options
      source: data/train
      old_image_embeddings: gallery.npy
      max_steps: 800

Layout: ``RUN_DIR/cache`` (embedding caches), ``RUN_DIR/stage1`` (ψ), ``RUN_DIR/stage2``
(``adapter/`` is the result). The caches are keyed by fingerprints and reused by
themselves; a finished stage is skipped when the record it left (``xbt_fit_step.json``:
a hash of its options, the models' fingerprints and its input) matches. A stage folder
left by other options is never overwritten: the run stops and says so. A killed fit
resumes each stage from its latest checkpoint when run again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..cache import CacheConfig
from ..config import read_config_file
from ..data.captions import CaptionConfig
from ..data.pairs import PairDataConfig
from ..errors import InputError
from ..model import AdapterConfig
from ..projection import ProjectionConfig
from .pair_stage import ADAPTER_DIR, PairStageConfig
from .pair_stage import train as train_pair_stage
from .text_stage import ModelPairConfig, TextStageConfig, pretrain_text

logger = logging.getLogger(__name__)

RECORD_FILE = "xbt_fit_step.json"
STAGE1_TYPES = (CaptionConfig, CacheConfig, ProjectionConfig, TextStageConfig)
STAGE2_TYPES = (PairStageConfig, PairDataConfig, AdapterConfig, CacheConfig)


@dataclass
class FitConfig:
    """What the whole run needs besides the per-stage sections."""

    old_model: str
    new_model: str
    run_dir: str
    stage1: dict[str, Any] = field(default_factory=dict)
    stage2: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_file(cls, path: str | Path) -> FitConfig:
        values = read_config_file(path)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown, missing = sorted(set(values) - known), sorted({"old_model", "new_model", "run_dir"} - set(values))
        if unknown or missing:
            raise InputError(f"Config file {str(path)!r}: unknown keys {unknown}, missing keys {missing}. The top "
                             f"level holds old_model, new_model, run_dir and the sections stage1 and stage2.")
        return cls(**values)


def _parse_section(types: Sequence[type], values: dict[str, Any], fixed: dict[str, Any], section: str) -> tuple:
    """Instances of ``types`` from a config section; ``fixed`` values are set by fit itself."""
    from transformers import HfArgumentParser

    clash = sorted(set(values) & set(fixed))
    if clash:
        raise InputError(f"Section {section}: {clash} are set by xbt fit from the top level; remove them.")
    try:
        return HfArgumentParser(list(types)).parse_dict({**values, **fixed}, allow_extra_keys=False)
    except (ValueError, TypeError) as error:
        raise InputError(f"Section {section}: {error}") from error


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _files_digest(folder: Path, pattern: str) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.glob(pattern)):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:24]


def _step(name: str, folder: Path, done: Path, identity: dict[str, Any], run) -> bool:
    """Run a step unless its record shows it already finished with the same identity; True if it ran."""
    record_path = folder / RECORD_FILE
    key = _digest(identity)
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("key") == key and done.exists():
            logger.info("%s: already done in %s with these inputs, skipping", name, folder)
            return False
        if record.get("key") != key:
            raise InputError(f"{folder} holds a {name} made with other options or models (record {record_path}). "
                             f"Delete that folder, or choose another run_dir, to train again.")
    elif done.exists():
        raise InputError(f"{folder} already holds a {name} that xbt fit did not make; choose another run_dir.")
    folder.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps({"key": key, "identity": identity, "finished": False}, indent=2, default=str))
    run()
    record_path.write_text(json.dumps({"key": key, "identity": identity, "finished": True}, indent=2, default=str))
    return True


def fit(config: FitConfig) -> Path:
    """Stage 1 then stage 2 (each skipped when done); returns the adapter folder."""
    from ..backbones import load_backbone

    run_dir = Path(config.run_dir)
    cache = str(run_dir / "cache")
    fingerprints = {role: load_backbone(reference).fingerprint
                    for role, reference in (("old", config.old_model), ("new", config.new_model))}

    stage1_dir = run_dir / "stage1"
    captions, cache1, projection, text_stage = _parse_section(
        STAGE1_TYPES, config.stage1, {"output_dir": str(stage1_dir), "cache_dir": cache, "resume": "latest"}, "stage1")
    models = ModelPairConfig(old_model=config.old_model, new_model=config.new_model)
    identity1 = {"models": fingerprints, "options": [dataclasses.asdict(c) for c in (captions, cache1, projection,
                                                                                        text_stage)]}
    _step("stage 1 (ψ)", stage1_dir, stage1_dir / "model.safetensors", identity1,
          lambda: pretrain_text(captions, cache1, models, projection, text_stage))

    stage2_dir = run_dir / "stage2"
    pair_stage, data, adapter, cache2 = _parse_section(
        STAGE2_TYPES, config.stage2,
        {"output_dir": str(stage2_dir), "cache_dir": cache, "projection": str(stage1_dir), "resume": "latest",
         "old_model": config.old_model, "new_model": config.new_model}, "stage2")
    identity2 = {"models": fingerprints, "projection": _files_digest(stage1_dir, "*.safetensors"),
                 "options": [dataclasses.asdict(c) for c in (pair_stage, data, adapter, cache2)]}
    adapter_dir = stage2_dir / ADAPTER_DIR
    _step("stage 2 (adapters)", stage2_dir, adapter_dir / "xbt_config.json", identity2,
          lambda: train_pair_stage(pair_stage, data, adapter, cache2))
    return adapter_dir


def run(argv: Sequence[str]) -> int:
    """``xbt fit CONFIG``: cache -> stage 1 -> stage 2 from one YAML/JSON file; prints the adapter folder."""
    import argparse

    parser = argparse.ArgumentParser(prog="xbt fit", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="YAML or JSON file (see the module documentation for its layout)")
    options = parser.parse_args(list(argv))
    print(fit(FitConfig.from_file(options.config)))
    return 0
