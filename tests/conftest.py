"""Shared fixtures: tiny real models of both backends, built from configs (no download)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# `from helpers import ...` (the shared test helpers) in every test module and in any import mode.
if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))

# No test may reach a model hub; a test that needs a Hub runs its own server on 127.0.0.1.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from xbt.demo.models import BUILDERS, TinyClipConfig  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_refs(tmp_path_factory) -> dict[str, str]:
    """References of one tiny saved model per backend: {'open_clip': ..., 'hf': ...}."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {backend: build(root / backend, TinyClipConfig(seed=0)) for backend, build in BUILDERS.items()}


@pytest.fixture(scope="session")
def tiny_encoders(tiny_refs):
    from xbt import load_backbone

    return {backend: load_backbone(reference) for backend, reference in tiny_refs.items()}


@pytest.fixture(params=sorted(BUILDERS))
def backend(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def trained_pair(tmp_path_factory):
    """A trained OLD (open_clip) and NEW (transformers, better) model on generated shapes scenes.

    A :class:`xbt.demo.pretrain.TrainedPair`: ``.old`` / ``.new`` references and the
    ``.train`` / ``.test`` image folders (PNG + metadata.jsonl) and ``.corpus`` text file.
    Built once per session (about 30 s on 2 cores); ``xbt.demo.pretrain.tiny_pair`` with
    ``backends=("hf", "open_clip")`` gives the reverse-backend pair.
    """
    from xbt.demo.pretrain import tiny_pair

    return tiny_pair(tmp_path_factory.mktemp("trained_pair"), domain="shapes", seed=0)
