"""The training commands' entry points: ``xbt pretrain-text``, ``xbt train`` and the scripts ``accelerate launch`` runs.

Options are parsed from the torch-free config modules first; the stage (and torch) is
imported only once the options are valid, so ``--help`` and a bad flag cost no model
code. Each entry point creates the run's one :class:`~accelerate.Accelerator`.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Sequence

from ..adapter_config import AdapterConfig, ProjectionConfig
from ..config import parse_configs
from ..data.config import CacheConfig, CaptionConfig, PairSourceConfig
from ..errors import XBTError
from .config import AcceleratorConfig, ModelPairConfig, PairStageConfig, TextStageConfig

TEXT_STAGE_CONFIGS = (CaptionConfig, CacheConfig, ModelPairConfig, ProjectionConfig, TextStageConfig, AcceleratorConfig)
PAIR_STAGE_CONFIGS = (PairStageConfig, PairSourceConfig, AdapterConfig, CacheConfig, AcceleratorConfig)


def pretrain_text(argv: Sequence[str]) -> int:
    """``xbt pretrain-text``: train ψ from the new model's text space into the old one's, on captions alone."""
    captions, cache, models, projection, stage, device = parse_configs(
        TEXT_STAGE_CONFIGS, argv, prog="xbt pretrain-text", description=pretrain_text.__doc__)
    from . import engine
    from .text_stage import pretrain_text as run_stage

    def body() -> int:
        accelerator = engine.make_accelerator(cpu=device.cpu)
        summary = run_stage(captions, cache, models, projection, stage, accelerator)
        if accelerator.is_main_process:
            print(json.dumps({"output_dir": stage.output_dir, "untrained": summary["untrained"],
                              "validation": summary["validation"], "baselines": summary["baselines"]}, indent=2))
        return 0

    return engine.run_entry_point(body)


def train(argv: Sequence[str]) -> int:
    """``xbt train``: stage 2, LoRA adapters + ψ on image-text pairs; prints the adapter folder."""
    config, data, adapter, cache, device = parse_configs(
        PAIR_STAGE_CONFIGS, argv, prog="xbt train", description=train.__doc__)
    from . import engine
    from .pair_stage import train as run_stage

    def body() -> int:
        accelerator = engine.make_accelerator(cpu=device.cpu)
        folder = run_stage(config, data, accelerator, adapter, cache)
        if accelerator.is_main_process:
            print(folder)
        return 0

    return engine.run_entry_point(body)


def script_main(name: str, command: Callable[[Sequence[str]], int]) -> int:
    """A command as a plain script (``python`` or ``accelerate launch``): INFO logging, one error line."""
    from ..cli import configure_progress

    configure_progress()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("xbt").setLevel(logging.INFO)
    try:
        return command(sys.argv[1:])
    except XBTError as error:
        print(f"{name}: error: {error}", file=sys.stderr)
        return 2
