"""``xbt fit CONFIG``: the whole training (caption cache -> stage 1 -> stage 2) from one config file.

The file (YAML or JSON) names the two models and a run folder once, the cache options
once, and each stage's options in its own section (the stages share option names such
as ``learning_rate`` and ``batch_size``, the GLOBAL batch in both)::

    old_model: open_clip:ViT-B-32/openai
    new_model: hf:openai/clip-vit-large-patch14
    run_dir: runs/my-upgrade
    cpu: false
    cache:                      # CacheConfig options (cache_dir default: RUN_DIR/cache)
      cache_dtype: float16
    stage1:                     # CaptionConfig, ProjectionConfig, TextStageConfig options
      captions: captions.txt
      epochs: 5
    stage2:                     # PairStageConfig, PairSourceConfig, AdapterConfig options
      source: data/train
      old_image_embeddings: gallery.npy
      max_steps: 800
      mixed_precision: bf16

Options can be overridden on the command line with dotted names, values read as YAML::

    xbt fit fit.yaml --stage2.max_steps 3 --stage1.epochs 1 --run_dir runs/try

Every section is parsed and checked before any model is loaded; each model is then
loaded once and handed to the steps that need it. Layout: ``RUN_DIR/cache`` (embedding
caches), ``RUN_DIR/stage1`` (ψ), ``RUN_DIR/stage2`` (``adapter/`` is the result). A
finished stage is skipped when its record (:mod:`xbt.train.records`: a hash of its
options, the models' fingerprints and its input) matches; a stage folder left by other
options is never overwritten: the run stops and says so. A killed fit resumes each stage
from its latest checkpoint when run again.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError
from .config import FitConfig

STAGE1_DIR, STAGE2_DIR, CACHE_DIR = "stage1", "stage2", "cache"
# Options fit sets itself, per section (a user value would be silently overridden, so it is refused).
FIXED = {"stage1": ("output_dir", "resume"),
         "stage2": ("output_dir", "resume", "projection", "old_model", "new_model")}


def section_types() -> dict[str, tuple[type, ...]]:
    """The dataclasses whose options each section holds."""
    from ..adapter_config import AdapterConfig, ProjectionConfig
    from ..data.config import CacheConfig, CaptionConfig, PairSourceConfig
    from .config import PairStageConfig, TextStageConfig

    return {"cache": (CacheConfig,), "stage1": (CaptionConfig, ProjectionConfig, TextStageConfig),
            "stage2": (PairStageConfig, PairSourceConfig, AdapterConfig)}


def _coerce(value: Any, annotation: Any) -> Any:
    """Numbers written as strings in YAML (PyYAML reads ``1e-3`` as a string) become numbers."""
    if isinstance(value, str) and annotation in (float, int, "float", "int"):
        kind = float if annotation in (float, "float") else int
        try:
            return kind(value)
        except ValueError:
            return value
    return value


def parse_section(section: str, types: Sequence[type], values: dict[str, Any],
                  fixed: dict[str, Any]) -> tuple:
    """Instances of ``types`` from one section's ``values`` plus the ``fixed`` ones fit sets itself."""
    allowed = sorted(f.name for kind in types for f in dataclasses.fields(kind) if f.name not in fixed)
    clash = sorted(set(values) & set(fixed))
    if clash:
        raise InputError(f"Section {section}: {clash} are set by xbt fit itself; remove them (allowed keys: "
                         f"{allowed}).")
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise InputError(f"Section {section}: unknown key(s) {unknown}; allowed keys: {allowed}.")
    values = {**values, **fixed}
    instances = []
    for kind in types:
        hints = typing.get_type_hints(kind)
        options = {f.name: _coerce(values[f.name], hints.get(f.name)) for f in dataclasses.fields(kind)
                   if f.name in values}
        try:
            instances.append(kind(**options))
        except InputError as error:
            raise InputError(f"Section {section}: {error}") from error
        except (ValueError, TypeError) as error:  # configs of other modules that do not raise InputError yet
            raise InputError(f"Section {section}: {error}") from error
    return tuple(instances)


@dataclass
class FitPlan:
    """Every section of a fit file, parsed and checked (no model loaded yet)."""

    config: FitConfig
    cache: Any
    stage1: tuple  # (CaptionConfig, ProjectionConfig, TextStageConfig)
    stage2: tuple  # (PairStageConfig, PairSourceConfig, AdapterConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.config.run_dir)


def plan(config: FitConfig) -> FitPlan:
    """Parse and check every section; raises :class:`InputError` before anything is loaded."""
    from .pair_stage import loss_weights

    types = section_types()
    run_dir = Path(config.run_dir)
    (cache,) = parse_section("cache", types["cache"], {"cache_dir": str(run_dir / CACHE_DIR), **config.cache}, {})
    stage1 = parse_section("stage1", types["stage1"], config.stage1,
                           {"output_dir": str(run_dir / STAGE1_DIR), "resume": "latest"})
    stage2 = parse_section("stage2", types["stage2"], config.stage2,
                           {"output_dir": str(run_dir / STAGE2_DIR), "resume": "latest",
                            "projection": str(run_dir / STAGE1_DIR), "old_model": config.old_model,
                            "new_model": config.new_model})
    try:
        loss_weights(stage2[0], stage1[1].extra_dims)  # a weighted term whose needs the run does not meet fails now
    except InputError as error:
        raise InputError(f"Section stage2: {error}") from error
    check_references(config)
    return FitPlan(config, cache, stage1, stage2)


def check_references(config: FitConfig) -> None:
    """Both references parse (local folders exist); the new model is a backbone, the old one may be an adapter."""
    from ..references import parse_reference

    parse_reference(config.old_model)  # a backbone, or an adapter of a chained upgrade
    if parse_reference(config.new_model).is_adapter:
        raise InputError(f"new_model: {config.new_model!r} is an xbt adapter; the NEW model gets the LoRA adapters "
                         f"and must be a backbone (hf: or open_clip:). An adapter can be old_model.")


def fit(config: FitConfig | FitPlan, accelerator=None) -> Path:
    """Stage 1 then stage 2 (each skipped when done); returns the adapter folder.

    ``accelerator``: the run's one when the caller has it (the demo); else made here.
    """
    from ..backbones import load_backbone
    from ..encoders import load_encoder
    from . import engine
    from .pair_stage import ADAPTER_DIR
    from .pair_stage import train as train_pair_stage
    from .records import files_digest, run_step
    from .config import ModelPairConfig
    from .text_stage import pretrain_text

    checked = config if isinstance(config, FitPlan) else plan(config)
    config = checked.config
    accelerator = accelerator or engine.make_accelerator(cpu=config.cpu)
    old = load_encoder(config.old_model, device=accelerator.device)  # a backbone or an adapter (chained upgrade)
    new = load_backbone(config.new_model, device=accelerator.device)
    fingerprints = {"old": old.model_id, "new": new.fingerprint}
    main = accelerator.is_main_process

    stage1_dir = checked.run_dir / STAGE1_DIR
    captions, projection, text_stage = checked.stage1
    models = ModelPairConfig(old_model=config.old_model, new_model=config.new_model)
    identity1 = {"models": fingerprints,
                 "options": [dataclasses.asdict(c) for c in (captions, checked.cache, projection, text_stage)]}
    run_step("stage 1 (ψ)", stage1_dir, identity1,
             lambda: bool(pretrain_text(captions, checked.cache, models, projection, text_stage, accelerator,
                                        encoders=(old, new))),
             done=stage1_dir / "model.safetensors", main_process=main)

    stage2_dir = checked.run_dir / STAGE2_DIR
    pair_stage, data, adapter = checked.stage2
    identity2 = {"models": fingerprints, "projection": files_digest(stage1_dir, "*.safetensors"),
                 "options": [dataclasses.asdict(c) for c in (pair_stage, data, adapter, checked.cache)]}
    adapter_dir = stage2_dir / ADAPTER_DIR
    run_step("stage 2 (adapters)", stage2_dir, identity2,
             lambda: str(train_pair_stage(pair_stage, data, accelerator, adapter, checked.cache, backbone=new,
                                          old_encoder=old)),
             done=adapter_dir / "xbt_config.json", main_process=main)
    return adapter_dir


def config_from(path: str | Path, overrides: Sequence[str] = ()) -> FitConfig:
    """The :class:`FitConfig` of a fit file with command-line ``overrides`` applied."""
    from ..config import apply_dotted_overrides, read_config_file

    values = apply_dotted_overrides(read_config_file(path), overrides)
    allowed = [f.name for f in dataclasses.fields(FitConfig)]
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise InputError(f"Config file {str(path)!r}: unknown key(s) {unknown} at the top level; allowed keys: "
                         f"{allowed}.")
    missing = sorted({"old_model", "new_model", "run_dir"} - set(values))
    if missing:
        raise InputError(f"Config file {str(path)!r}: missing key(s) {missing} at the top level.")
    return FitConfig(**values)


def run(argv: Sequence[str]) -> int:
    """``xbt fit CONFIG [--section.key VALUE ...]``: cache -> stage 1 -> stage 2; prints the adapter folder."""
    from ..config import CommandParser

    parser = CommandParser(prog="xbt fit", description=__doc__.split("\n\n")[0],
                                     epilog="Overrides: --KEY VALUE or --SECTION.KEY VALUE (values read as YAML), "
                                            "e.g. --stage2.max_steps 3 --run_dir runs/try.")
    parser.add_argument("config", help="YAML or JSON file (see the module documentation for its layout)")
    options, overrides = parser.parse_known_args(list(argv))
    checked = plan(config_from(options.config, overrides))  # everything checked before anything loads
    from . import engine

    def body() -> int:
        accelerator = engine.make_accelerator(cpu=checked.config.cpu)
        adapter = fit(checked, accelerator)
        if accelerator.is_main_process:
            print(adapter)
        return 0

    return engine.run_entry_point(body)
