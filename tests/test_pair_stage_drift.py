"""Stage 2 on trained tiny CLIPs: without an old-space term the adapter drifts; anchored and gallery-aware do not.

Measured against OLD-space galleries of held-out test data (R@5, percent): xbt caption
queries against the old CAPTION gallery (t2t: a hit is a caption of the same image; the
most direct "is it still in the old space" measure), against the old IMAGE gallery
(t2i), xbt image queries against the old caption gallery (i2t), and the mean cosine
between ψ(new text) and the old embedding of the same caption. The tiny models are weak
(old→old R@5 ≈ 8-11 on 300 test images), so t2i alone is too noisy to judge drift.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xbt import load_backbone
from xbt.baselines import fit_ridge
from xbt.cache import CacheConfig
from xbt.data.pairs import PairDataConfig
from xbt.demo.scenes import read_split
from xbt.model import XBTModel
from xbt.projection import Projection
from xbt.retrieval import Labeled, recall_at_k
from xbt.train.pair_stage import PairStageConfig, train

pytestmark = pytest.mark.slow

RUNS = {
    "control": {"anchor_weight": 0.0, "image_to_old_text_weight": 0.0},
    "anchored": {"anchor_weight": 1.0, "image_to_old_text_weight": 0.0},
    "gallery-aware": {"gallery": True},
}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict[str, float]]:
    from xbt.demo.pretrain import tiny_pair

    root = tmp_path_factory.mktemp("drift")
    pair = tiny_pair(root / "pair", domain="shapes", seed=0)
    old, new = load_backbone(pair.old), load_backbone(pair.new)

    corpus = [line for line in pair.corpus.read_text().splitlines() if line.strip()][:3000]
    fit_ridge(new.encode_text(corpus).numpy(), old.encode_text(corpus).numpy(), alpha=1e-4,
              source_space=new.fingerprint, target_space=old.fingerprint).save_pretrained(root / "psi")
    train_paths, _ = read_split(pair.train)
    np.save(root / "gallery.npy", old.encode_image(train_paths).numpy())  # the user's stored old gallery
    (root / "gallery_ids.txt").write_text("\n".join(path.name for path in train_paths))

    test_paths, test_captions = read_split(pair.test)
    captions = [caption for group in test_captions for caption in group]
    caption_labels = np.repeat(np.arange(len(test_paths)), [len(group) for group in test_captions])
    old_images = Labeled(old.encode_image(test_paths).numpy(), np.arange(len(test_paths)))
    old_captions = Labeled(old.encode_text(captions).numpy(), caption_labels)

    def measure(encode_text, encode_image) -> dict[str, float]:
        texts = encode_text(captions)
        queries = Labeled(texts.numpy(), caption_labels)
        return {"cos": float((texts * torch.from_numpy(old_captions.vectors)).sum(-1).mean()),
                "t2t": recall_at_k(queries, old_captions, (5,))[5],
                "t2i": recall_at_k(queries, old_images, (5,))[5],
                "i2t": recall_at_k(Labeled(encode_image(test_paths).numpy(), old_images.labels), old_captions,
                                   (5,))[5]}

    found = {"old→old": measure(old.encode_text, old.encode_image)}
    start = XBTModel(load_backbone(pair.new), Projection.from_pretrained(root / "psi"))
    found["ψ only"] = measure(start.encode_text, start.encode_image)
    for name, options in RUNS.items():
        gallery = {"old_image_embeddings": str(root / "gallery.npy"), "old_image_ids": str(root / "gallery_ids.txt")}
        stage = PairStageConfig(new_model=pair.new, old_model=pair.old, projection=str(root / "psi"),
                                output_dir=str(root / name), max_steps=150, save_steps=1000, learning_rate=1e-3,
                                warmup_steps=5, **(gallery if options.get("gallery") else options))
        folder = train(stage, PairDataConfig(source=str(pair.train), batch_size=64), None,
                       CacheConfig(cache_dir=str(root / "cache")))
        model = XBTModel.from_pretrained(folder)
        found[name] = measure(model.encode_text, model.encode_image)
    # Query blending (after Ricci et al.): xbt text queries mixed with the old text encoder's.
    found["gallery-aware + blend 0.5"] = measure(lambda texts: model.encode_text(texts, blend_old=0.5),
                                                 model.encode_image)
    print("\n".join(f"{name:>14}: {values}" for name, values in found.items()))
    return found


def test_without_an_old_space_term_the_adapter_drifts(results):
    start, control = results["ψ only"], results["control"]
    assert control["cos"] < start["cos"] - 0.2  # 0.25 with the final fast preset (0.3 was tuned on a draft)
    assert control["t2t"] < start["t2t"] - 3.0


@pytest.mark.parametrize("name", ["anchored", "gallery-aware"])
def test_anchored_and_gallery_aware_stay_in_the_old_space(results, name):
    start, control, run = results["ψ only"], results["control"], results[name]
    # Gallery-aware training never pulls ψ(text) onto the old caption vector itself, so ask for a share of
    # the control's cosine drop back, not a fixed cosine; the retrieval measures below are the real test.
    assert run["cos"] - control["cos"] > 0.4 * (start["cos"] - control["cos"])
    assert run["t2t"] > control["t2t"] + 3.0
    assert run["t2i"] >= control["t2i"]


def test_gallery_aware_beats_old_to_old_image_to_text(results):
    assert results["gallery-aware"]["i2t"] > results["old→old"]["i2t"] + 1.0


def test_query_blending_keeps_text_to_image_at_least_at_old_to_old(results):
    blended = results["gallery-aware + blend 0.5"]
    assert blended["t2i"] >= results["old→old"]["t2i"]
    assert blended["cos"] > results["gallery-aware"]["cos"]  # pulled towards the old text embedding
