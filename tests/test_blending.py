"""Query blending fitted on held-out pairs: per direction, recorded in the adapter, used by encode and eval."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import write_pairs

from xbt import InputError, XBTModel, load_backbone
from xbt.blending import fit_query_blending
from xbt.cli import main as cli
from xbt.data.config import CacheConfig, PairSourceConfig
from xbt.demo.models import BUILDERS, TinyClipConfig
from xbt.demo.scenes import write_split
from xbt.evaluation import load_eval_set
from xbt.evaluation.fitted import ALPHAS
from xbt.model import blend_embeddings
from xbt.projection import Projection
from xbt.retrieval import Labeled, recall_at_k
from xbt.train.config import PairStageConfig
from xbt.train.engine import make_accelerator
from xbt.train.pair_stage import train


@pytest.fixture(scope="module")
def world(tiny_refs, tmp_path_factory):
    """A tiny adapter onto the open_clip model's space (lstsq ψ, LoRA made to act) and held-out support pairs."""
    root = tmp_path_factory.mktemp("blend")
    support = write_split(root / "support", "shapes", 20, seed=3, split="test")
    old, new = load_backbone(tiny_refs["open_clip"]), load_backbone(tiny_refs["hf"])
    texts = [f"a {c} {s}" for c in ("red", "green", "blue", "yellow") for s in ("square", "circle", "star")]
    solution = torch.linalg.lstsq(new.encode_text(texts), old.encode_text(texts)).solution
    projection = Projection.from_linear_map(solution.T, source_space=new.fingerprint, target_space=old.fingerprint)
    model = XBTModel(new, projection, old_reference=tiny_refs["open_clip"])
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.lora_parameters():
            parameter.normal_(std=0.05)
    return {"root": root, "support": support, "old": old, "model": model}


def _brute_curve(adapter: np.ndarray, old_queries: np.ndarray, labels, gallery: Labeled) -> list[float]:
    return [recall_at_k(Labeled(blend_embeddings(torch.from_numpy(adapter), torch.from_numpy(old_queries), a).numpy(),
                                labels), gallery, (1,))[1] for a in ALPHAS]


def test_the_fitted_weight_is_the_best_support_recall_of_each_direction(world):
    fitted = fit_query_blending(world["model"], world["old"], world["support"])
    pairs = load_eval_set(world["support"])
    images = pairs.load_images(range(len(pairs.ids)))
    model, old = world["model"], world["old"]
    vectors = {"text": (model.encode_text(pairs.texts).numpy(), old.encode_text(pairs.texts).numpy()),
               "image": (model.encode_image(images).numpy(), old.encode_image(images).numpy())}
    galleries = {"text→image": Labeled(vectors["image"][1], pairs.ids),
                 "image→text": Labeled(vectors["text"][1], pairs.caption_ids)}
    labels = {"text→image": pairs.caption_ids, "image→text": pairs.ids}
    for direction, query in (("text→image", "text"), ("image→text", "image")):
        curve = _brute_curve(*vectors[query], labels[direction], galleries[direction])
        assert fitted["curve"][direction]["recall"]["1"] == pytest.approx(curve)
        best = max(curve)
        chosen = fitted["blend_old"][direction]
        assert curve[ALPHAS.index(chosen)] == best  # the weight with the best support R@1 (ties: see best_alpha)
    assert fitted["support"] == {"source": str(world["support"]), "images": 20, "captions": len(pairs.texts)}


def test_fitted_weights_travel_with_the_adapter_and_a_number_overrides_them(world, tmp_path):
    model = world["model"]
    model.query_blending = {"method": "slerp", "blend_old": {"text→image": 0.3, "image→text": 0.8}}
    model.save_pretrained(tmp_path / "adapter")
    loaded = XBTModel.from_pretrained(tmp_path / "adapter")
    loaded.use_old_encoder(world["old"])
    texts, images = ["a red square", "a blue star"], list(sorted(world["support"].glob("*.png")))[:2]
    assert loaded.query_blending["blend_old"] == {"text→image": 0.3, "image→text": 0.8}
    torch.testing.assert_close(loaded.encode_text(texts, blend_old="fitted"), loaded.encode_text(texts, blend_old=0.3))
    torch.testing.assert_close(loaded.encode_image(images, blend_old="fitted"),
                               blend_embeddings(loaded.encode_image(images), world["old"].encode_image(images), 0.8))
    assert not torch.allclose(loaded.encode_image(images, blend_old=0.2), loaded.encode_image(images, blend_old="fitted"))
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert 'blend_old="fitted"' in card and "text→image 0.30, image→text 0.80" in card
    assert "runs the old model on every query" in card
    model.query_blending = None
    with pytest.raises(InputError, match="records no fitted blend weights"):
        model.encode_text(texts, blend_old="fitted")
    with pytest.raises(InputError, match="a number in \\[0, 1\\] or 'fitted'"):
        model.encode_text(texts, blend_old="best")


def test_xbt_eval_blends_both_directions_with_the_fitted_weights(world, tiny_refs, tmp_path):
    model = world["model"]
    model.query_blending = {"method": "slerp", "blend_old": {"text→image": 0.25, "image→text": 0.6}}
    model.save_pretrained(tmp_path / "adapter")
    model.query_blending = None
    output = tmp_path / "eval"
    assert cli(["eval", "--old_model", tiny_refs["open_clip"], "--new_model", tiny_refs["hf"], "--adapter",
                str(tmp_path / "adapter"), "--eval_set", str(world["support"]), "--orderings", "random",
                "--output_dir", str(output)]) == 0
    report = json.loads((output / "metrics.json").read_text())
    assert report["spaces"]["xbt+old"]["blend_alpha"] == {"text": 0.25, "image": 0.6}
    cells = {(c["direction"], c["name"]): c for c in report["cells"]}
    pairs = load_eval_set(world["support"])
    images = pairs.load_images(range(len(pairs.ids)))
    loaded = XBTModel.from_pretrained(tmp_path / "adapter")
    loaded.use_old_encoder(world["old"])
    queries = Labeled(loaded.encode_image(images, blend_old="fitted").numpy(), pairs.ids)
    gallery = Labeled(world["old"].encode_text(pairs.texts).numpy(), pairs.caption_ids)
    expected = recall_at_k(queries, gallery)
    assert cells[("image→text", "xbt+old→old")]["recall"] == {str(k): v for k, v in expected.items()}


@pytest.mark.slow
def test_stage_2_fits_and_records_the_weights_on_its_held_out_pairs(tmp_path):
    new_ref = BUILDERS["hf"](tmp_path / "new", TinyClipConfig(seed=0))
    old_ref = BUILDERS["open_clip"](tmp_path / "old", TinyClipConfig(embed_dim=24, width=32, seed=1))
    new, old = load_backbone(new_ref), load_backbone(old_ref)
    Projection(new.embed_dim, old.embed_dim, kind="linear", source_space=new.fingerprint,
               target_space=old.fingerprint).save_pretrained(tmp_path / "psi")
    write_pairs(tmp_path / "train", 16)
    support = write_split(tmp_path / "support", "shapes", 12, seed=5, split="test")
    stage = PairStageConfig(new_model=new_ref, old_model=old_ref, projection=str(tmp_path / "psi"), batch_size=8,
                            output_dir=str(tmp_path / "run"), max_steps=2, save_steps=0, warmup_steps=1,
                            blend_support=str(support))
    folder = train(stage, PairSourceConfig(source=str(tmp_path / "train"), max_bad_fraction=0.2),
                   make_accelerator(cpu=True), None, CacheConfig(cache_dir=str(tmp_path / "cache")))
    recorded = json.loads((folder / "xbt_config.json").read_text())["query_blending"]
    assert set(recorded["blend_old"]) == {"text→image", "image→text"} and recorded["support"]["images"] == 12
    assert all(len(curve["recall"]["1"]) == len(ALPHAS) for curve in recorded["curve"].values())
    with pytest.raises(InputError, match="blend_support: .* does not exist"):
        PairStageConfig(new_model=new_ref, old_model=old_ref, projection=str(tmp_path / "psi"),
                        output_dir=str(tmp_path / "x"), blend_support=str(tmp_path / "nowhere"))
