"""Chained upgrades: v3 trained against the v2 adapter (``xbt:``) lands in v1's space with v1 deleted.

Three tiny CLIPs of different dimensions are trained on generated scenes: v1 (weak, 24-d),
v2 (32-d) and v3 (48-d). ``xbt fit`` trains an adapter v2 -> v1 against v1's stored
gallery (written by ``xbt embed``); v1 is then deleted from disk, and ``xbt fit`` trains
v3 -> ``xbt:<v2 adapter>`` against the same stored gallery: the only thing that still
writes v1-space vectors is the v2 adapter. The v3 adapter's vectors must search stored
v1 galleries of held-out data better than v1 did itself, in both directions (paired
per query, :data:`helpers.Z` standard errors, fixed up front).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import Z, hits_at_5, separated

from xbt import FingerprintMismatchError, InputError, XBTModel, load_backbone
from xbt.demo.models import TinyClipConfig
from xbt.demo.pretrain import ModelRecipe, PretrainConfig, train_model
from xbt.demo.scenes import BenchmarkConfig, read_split, write_benchmark
from xbt.embed import read_embeddings_dir
from xbt.embed import run as embed
from xbt.encoders import load_encoder
from xbt.train import engine
from xbt.train.fit import config_from, fit

pytestmark = pytest.mark.slow

VERSIONS = {  # (backend, embed dim, width, layers, steps, training images): v1 is the weak one to upgrade from
    "v1": ("open_clip", 24, 32, 1, 100, 600),
    "v2": ("hf", 32, 64, 2, 250, None),
    "v3": ("open_clip", 48, 64, 2, 300, None),
}


def _recipe(version: str, seed: int) -> ModelRecipe:
    backend, dim, width, layers, steps, images = VERSIONS[version]
    model = TinyClipConfig(embed_dim=dim, width=width, layers=layers, heads=2, context_length=20, seed=seed)
    return ModelRecipe(backend, model, PretrainConfig(max_steps=steps, batch_size=64, learning_rate=2e-3, seed=seed),
                       images)


def _embed(model: str, source: Path, modality: str, output: Path) -> Path:
    assert embed(["--model", model, "--source", str(source), "--modality", modality, "--output_dir", str(output),
                  "--num_workers", "0", "--no_progress", "--cpu"]) == 0
    return output


def _fit(root: Path, old: str, new: str, data: dict[str, Path], gallery: Path) -> Path:
    values = {"old_model": old, "new_model": new, "run_dir": str(root), "cpu": True,
              "stage1": {"captions": str(data["corpus"]), "epochs": 2, "seed": 0},
              "stage2": {"source": str(data["train"]), "old_image_embeddings": str(gallery), "max_steps": 150,
                         "learning_rate": 1e-3, "warmup_steps": 5, "batch_size": 64, "seed": 0}}
    (root.parent / f"{root.name}.yaml").write_text(yaml.safe_dump(values))
    return fit(config_from(root.parent / f"{root.name}.yaml"))


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("chain")
    accelerator = engine.make_accelerator(cpu=True)
    data = write_benchmark(root / "data", BenchmarkConfig(train_images=2000, test_images=1000, corpus_captions=5000))
    models = {v: train_model(root / "models" / v, _recipe(v, seed), data["train"], accelerator)
              for seed, v in enumerate(VERSIONS)}
    v1 = load_backbone(models["v1"])
    # What a deployment keeps of v1: its stored vectors (training gallery, held-out images and captions).
    stored = {name: _embed(models["v1"], data[split], modality, root / "v1" / name)
              for name, split, modality in [("train_images", "train", "image"), ("test_images", "test", "image"),
                                            ("test_captions", "test", "text")]}
    v2_adapter = _fit(root / "fit_v2", models["v1"], models["v2"], data, stored["train_images"])
    shutil.rmtree(root / "models" / "v1")  # v1 is retired: only its stored vectors and the v2 adapter remain
    v3_adapter = _fit(root / "fit_v3", f"xbt:{v2_adapter}", models["v3"], data, stored["train_images"])
    v2_native = _embed(models["v2"], data["test"], "image", root / "v2_test_images")
    return {"root": root, "data": data, "models": models, "v1_space": v1.space_id, "stored": stored,
            "v2_adapter": v2_adapter, "v3_adapter": v3_adapter, "v2_native_gallery": v2_native}


def test_the_v3_adapter_writes_into_v1_space_and_records_its_chain(chain):
    v2 = load_encoder(f"xbt:{chain['v2_adapter']}")
    v3 = XBTModel.from_pretrained(chain["v3_adapter"])
    config = json.loads((chain["v3_adapter"] / "xbt_config.json").read_text())
    assert v3.space_id == v2.space_id == chain["v1_space"] == config["target_space"]
    assert (v3.dim, v2.dim, v3.source_space_id) == (24, 24, load_backbone(chain["models"]["v3"]).space_id)
    assert config["old_model"]["reference"] == f"xbt:{chain['v2_adapter']}"
    assert config["old_model"]["fingerprint"] == v2.model_id  # trained against the v2 adapter itself
    for name, folder in chain["stored"].items():
        assert read_embeddings_dir(folder)[2]["space_id"] == chain["v1_space"], name


@pytest.mark.parametrize("direction", ["text→image", "image→text"])
def test_v3_adapter_queries_search_the_stored_v1_gallery_better_than_v1_did(chain, direction):
    v3 = XBTModel.from_pretrained(chain["v3_adapter"])
    paths, captions = read_split(chain["data"]["test"])
    flat = [c for group in captions for c in group]
    caption_labels = np.repeat(np.arange(len(paths)), [len(group) for group in captions])
    image_labels = np.arange(len(paths))
    stored = {name: read_embeddings_dir(chain["stored"][name])[0] for name in ("test_images", "test_captions")}
    if direction == "text→image":
        v1_queries, v3_queries = stored["test_captions"], v3.encode_text(flat).numpy()
        labels, gallery, gallery_labels = caption_labels, stored["test_images"], image_labels
    else:
        v1_queries, v3_queries = stored["test_images"], v3.encode_image(paths).numpy()
        labels, gallery, gallery_labels = image_labels, stored["test_captions"], caption_labels
    v3_hits = hits_at_5(v3_queries, labels, gallery, gallery_labels)
    v1_hits = hits_at_5(v1_queries, labels, gallery, gallery_labels)
    ok, z = separated(v3_hits, v1_hits)
    print(f"{direction} hit@5 against the stored v1 gallery: v3 adapter {v3_hits.mean():.3f}, "
          f"v1→v1 {v1_hits.mean():.3f}, z = {z:.1f}")
    assert ok, f"{direction}: the v3 adapter does not clearly beat v1→v1 (z = {z:.1f} < {Z})"


def test_an_adapter_refuses_a_gallery_of_another_space_naming_both(chain, tmp_path):
    v3 = XBTModel.from_pretrained(chain["v3_adapter"])
    gallery = read_embeddings_dir(chain["v2_native_gallery"])[2]["space_id"]
    with pytest.raises(InputError) as caught:
        embed(["--model", f"xbt:{chain['v3_adapter']}", "--source", str(chain["data"]["test"]), "--modality",
               "image", "--append_to", str(chain["v2_native_gallery"]), "--num_workers", "0", "--cpu"])
    assert v3.space_id in str(caught.value) and gallery in str(caught.value)


def test_a_chained_adapter_as_old_model_of_eval(chain):
    from xbt import eval_cli

    output = chain["root"] / "eval"
    assert eval_cli.main(["--old_model", f"xbt:{chain['v2_adapter']}", "--new_model", chain["models"]["v3"],
                          "--adapter", str(chain["v3_adapter"]), "--eval_set", str(chain["data"]["test"]),
                          "--output_dir", str(output)]) == 0
    metrics = json.loads((output / "metrics.json").read_text())
    spaces = metrics["spaces"]
    assert spaces["old"]["space_id"] == spaces["xbt"]["space_id"] == chain["v1_space"]
    assert spaces["old"]["model_id"] == load_encoder(f"xbt:{chain['v2_adapter']}").model_id


def test_a_v3_adapter_is_refused_as_the_old_side_of_an_unrelated_space(chain, tmp_path):
    from xbt.train.targets import old_text_source

    source = old_text_source(f"xbt:{chain['v3_adapter']}", "any", "some-other-space", 24, "cpu")
    with pytest.raises(FingerprintMismatchError, match="some-other-space"):
        source.encode(["a red square"])
