"""Stage 2 on trained tiny CLIPs: without an old-space term the adapter drifts; anchored and gallery-aware do not.

Measured against OLD-space galleries of held-out test data, per query: xbt caption queries
against the old CAPTION gallery (t2t: a hit@5 is a caption of the same image; the most
direct "is it still in the old space" measure), against the old IMAGE gallery (t2i), xbt
image queries against the old caption gallery (i2t), and the cosine between ψ(new text)
and the old embedding of the same caption.

Every comparison is paired (the same queries under two models) and must be clearly
separated: the mean per-query difference at least Z standard errors of that mean away
from zero. Z = 3 is fixed up front (a one-sided chance of about 0.1 % that no effect
passes), not fitted to a run; the margin follows from the spread of the data itself.

The number of queries is set by power, not by a threshold: with the 300 test images alone
the weakest effect (gallery-aware image→text over old→old) measured z = 2.0; seven
held-out galleries of 300 (2,100 image and 10,500 caption queries, each gallery as hard
as the test split) give an expected z of about 2.0·√7 ≈ 5 if the effect is real.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import Z, hits_at_5, separated

from xbt import load_backbone
from xbt.baselines import fit_ridge
from xbt.data.config import CacheConfig, PairSourceConfig
from xbt.demo.scenes import read_split, write_split
from xbt.model import XBTModel
from xbt.projection import Projection
from xbt.train.config import PairStageConfig
from xbt.train.engine import make_accelerator
from xbt.train.pair_stage import train

pytestmark = pytest.mark.slow
BLOCKS = 7  # held-out galleries of the test split's size; the first is the pair's own test split

RUNS = {
    "control": {"loss_weights": "new_new=1,anchor=0"},
    "anchored": {"loss_weights": "new_new=1,anchor=1"},
    "gallery-aware": {"gallery": True},
}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict[str, np.ndarray]]:
    from xbt.demo.pretrain import tiny_pair

    root = tmp_path_factory.mktemp("drift")
    accelerator = make_accelerator(cpu=True)
    pair = tiny_pair(root / "pair", domain="shapes", seed=0)
    old, new = load_backbone(pair.old), load_backbone(pair.new)

    corpus = [line for line in pair.corpus.read_text().splitlines() if line.strip()][:3000]
    fit_ridge(new.encode_text(corpus).numpy(), old.encode_text(corpus).numpy(), alpha=1e-4,
              source_space=new.fingerprint, target_space=old.fingerprint).save_pretrained(root / "psi")
    train_paths, _ = read_split(pair.train)
    np.save(root / "gallery.npy", old.encode_image(train_paths).numpy())  # the user's stored old gallery
    (root / "gallery_ids.txt").write_text("\n".join(path.name for path in train_paths))

    # Held-out queries: BLOCKS galleries of the test split's size, each searched on its own (as Flickr30k's 1k
    # test is), so the galleries stay as hard as the pair's own test split while the queries are many.
    test_size = len(read_split(pair.test)[0])
    heldout = write_split(root / "heldout", "shapes", BLOCKS * test_size, seed=0, split="test")
    test_paths, test_captions = read_split(heldout)
    captions = [caption for group in test_captions for caption in group]
    caption_labels = np.repeat(np.arange(len(test_paths)), [len(group) for group in test_captions])
    old_images = old.encode_image(test_paths).numpy()
    old_captions = old.encode_text(captions).numpy()
    image_labels = np.arange(len(test_paths))
    image_block, caption_block = image_labels // test_size, caption_labels // test_size

    def blockwise(queries, query_labels, query_block, gallery, labels, block) -> np.ndarray:
        return np.concatenate([hits_at_5(queries[query_block == b], query_labels[query_block == b],
                                         gallery[block == b], labels[block == b]) for b in range(BLOCKS)])

    def measure(encode_text, encode_image) -> dict[str, np.ndarray]:
        texts = encode_text(captions)
        text_queries = (texts.numpy(), caption_labels, caption_block)
        return {"cos": (texts * torch.from_numpy(old_captions)).sum(-1).numpy(),
                "t2t": blockwise(*text_queries, old_captions, caption_labels, caption_block),
                "t2i": blockwise(*text_queries, old_images, image_labels, image_block),
                "i2t": blockwise(encode_image(test_paths).numpy(), image_labels, image_block, old_captions,
                                 caption_labels, caption_block)}

    found = {"old→old": measure(old.encode_text, old.encode_image)}
    start = XBTModel(load_backbone(pair.new), Projection.from_pretrained(root / "psi"))
    found["ψ only"] = measure(start.encode_text, start.encode_image)
    for name, options in RUNS.items():
        gallery = {"old_image_embeddings": str(root / "gallery.npy"), "old_image_ids": str(root / "gallery_ids.txt")}
        stage = PairStageConfig(new_model=pair.new, old_model=pair.old, projection=str(root / "psi"),
                                output_dir=str(root / name), max_steps=150, save_steps=1000, learning_rate=1e-3,
                                warmup_steps=5, batch_size=64, **(gallery if options.get("gallery") else options))
        folder = train(stage, PairSourceConfig(source=str(pair.train)), accelerator, None,
                       CacheConfig(cache_dir=str(root / "cache")))
        model = XBTModel.from_pretrained(folder)
        found[name] = measure(model.encode_text, model.encode_image)
    # Query blending (after Ricci et al.): xbt text queries mixed with the old text encoder's.
    found["gallery-aware + blend 0.5"] = measure(lambda texts: model.encode_text(texts, blend_old=0.5),
                                                 model.encode_image)
    print("\n".join(f"{name:>26}: " + ", ".join(f"{k} {v.mean():.3f}" for k, v in values.items())
                    for name, values in found.items()))
    return found


def _assert_separated(results, better: str, worse: str, measure: str) -> None:
    ok, z = separated(results[better][measure], results[worse][measure])
    print(f"{measure}: {better} {results[better][measure].mean():.3f} vs {worse} "
          f"{results[worse][measure].mean():.3f}: z = {z:.1f}")
    assert ok, f"{measure}: {better} does not clearly beat {worse} (z = {z:.1f} < {Z})"


@pytest.mark.parametrize("measure", ["cos", "t2t"])
def test_without_an_old_space_term_the_adapter_drifts(results, measure):
    _assert_separated(results, "ψ only", "control", measure)


@pytest.mark.parametrize("name", ["anchored", "gallery-aware"])
@pytest.mark.parametrize("measure", ["cos", "t2t"])
def test_anchored_and_gallery_aware_stay_in_the_old_space(results, name, measure):
    _assert_separated(results, name, "control", measure)


def test_gallery_aware_beats_old_to_old_image_to_text(results):
    _assert_separated(results, "gallery-aware", "old→old", "i2t")


def test_query_blending_keeps_text_to_image_at_least_at_old_to_old(results):
    blended = results["gallery-aware + blend 0.5"]
    assert blended["t2i"].mean() >= results["old→old"]["t2i"].mean()
    assert blended["cos"].mean() > results["gallery-aware"]["cos"].mean()  # pulled towards the old text embedding
