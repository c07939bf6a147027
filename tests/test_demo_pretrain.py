"""Tiny CLIPs trained from scratch, both backends: they learn, save in their own format, reload alike."""

import json

import pytest
import torch

from xbt import InputError, load_backbone
from xbt.demo.models import BUILDERS, TinyClipConfig, save_weights
from xbt.demo.pretrain import ModelRecipe, PretrainConfig, compact_token_embedding, tiny_pair, train_contrastive, train_model
from xbt.demo.quality import evaluate_model, flatten_captions, recall_at_k
from xbt.demo.scenes import BenchmarkConfig, generate, read_split, write_benchmark
from xbt.train.engine import make_accelerator
from xbt.train.records import RECORD_FILE

SMALL = TinyClipConfig(width=32, layers=1, heads=2, context_length=20, seed=0)
SHORT = PretrainConfig(max_steps=120, batch_size=64, learning_rate=2e-3, warmup_steps=10, seed=0)


@pytest.fixture(scope="module")
def accelerator():
    return make_accelerator(cpu=True)


@pytest.fixture(scope="module")
def scenes():
    return {"train": generate("shapes", 600, seed=0, split="train"),
            "test": generate("shapes", 200, seed=0, split="test")}


def test_recall_counts_exact_hits():
    images = torch.eye(3)
    texts = torch.tensor([[1.0, 0, 0], [0, 0.5, 0.9], [0, 0.6, 1.0], [0.1, 0, 0.9]])
    owner = torch.tensor([0, 1, 2, 2])  # caption 1 describes image 1 but is closer to image 2
    recall = recall_at_k(images, texts, owner, ks=(1, 2))
    assert recall["text→image"] == {1: 75.0, 2: 100.0}
    assert recall["image→text"] == {1: 66.67, 2: 100.0}  # image 1's best caption is image 2's


def test_training_lowers_the_loss_and_beats_the_untrained_model(backend, scenes, tmp_path, accelerator):
    encoder = load_backbone(BUILDERS[backend](tmp_path, SMALL))
    untrained = evaluate_model(encoder, *scenes["test"], ks=(1, 5))
    result = train_contrastive(encoder, *scenes["train"], SHORT, accelerator)
    trained = evaluate_model(encoder, *scenes["test"], ks=(1, 5))
    assert result.last_loss < result.first_loss - 0.5
    for direction in trained:
        assert trained[direction][5] > untrained[direction][5] + 3, (untrained, trained)
        assert trained[direction][1] > untrained[direction][1], (untrained, trained)
    assert not any(parameter.requires_grad for parameter in encoder.model.parameters())  # frozen again


def test_saved_model_reloads_with_identical_embeddings(backend, scenes, tmp_path, accelerator):
    reference = BUILDERS[backend](tmp_path, SMALL)
    encoder = load_backbone(reference)
    before = encoder.fingerprint
    train_contrastive(encoder, *scenes["train"], PretrainConfig(max_steps=5, batch_size=64, seed=0), accelerator)
    save_weights(encoder.model, backend, tmp_path)
    reloaded = load_backbone(reference)
    images, captions = scenes["test"]
    texts, _ = flatten_captions(captions[:20])
    assert reloaded.fingerprint != before
    torch.testing.assert_close(reloaded.encode_image(images[:20]), encoder.encode_image(images[:20]), atol=1e-6, rtol=0)
    torch.testing.assert_close(reloaded.encode_text(texts), encoder.encode_text(texts), atol=1e-6, rtol=0)
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt"))  # safetensors only


def test_training_is_reproducible_from_the_seed(scenes, tmp_path, accelerator):
    embeddings = []
    for run in range(2):
        encoder = load_backbone(BUILDERS["open_clip"](tmp_path / str(run), SMALL))
        train_contrastive(encoder, *scenes["train"], PretrainConfig(max_steps=5, batch_size=64, seed=0), accelerator)
        embeddings.append(encoder.encode_text(["a small red circle in the center"]))
    torch.testing.assert_close(embeddings[0], embeddings[1])


def test_only_the_used_vocabulary_rows_change(tmp_path):
    encoder = load_backbone(BUILDERS["hf"](tmp_path, SMALL))
    table = encoder.model.text_model.embeddings.token_embedding
    before = table.weight.detach().clone()
    tokens = encoder.tokenize(["a red circle", "a blue square"])["input_ids"]
    with compact_token_embedding(encoder.model, tokens) as compact:
        assert encoder.model.text_model.embeddings.token_embedding is compact
        assert compact.weight.shape[0] == len(torch.unique(tokens)) < 20
        with torch.no_grad():
            compact.weight.add_(1.0)
    assert encoder.model.text_model.embeddings.token_embedding is table
    changed = (table.weight != before).any(dim=1).nonzero().flatten()
    assert changed.tolist() == torch.unique(tokens).tolist()


def test_bad_training_input_is_a_clear_error(tmp_path, scenes, accelerator):
    encoder = load_backbone(BUILDERS["open_clip"](tmp_path, SMALL))
    images, captions = scenes["test"]
    with pytest.raises(InputError, match="200 images but 199 caption lists"):
        train_contrastive(encoder, images, captions[:-1], SHORT, accelerator)
    with pytest.raises(InputError, match="fewer than one batch"):
        train_contrastive(encoder, images[:10], captions[:10], SHORT, accelerator)


def test_train_model_is_cached_by_recipe_and_data(tmp_path, accelerator):
    data = write_benchmark(tmp_path / "data", BenchmarkConfig(train_images=128, test_images=8, corpus_captions=10))
    recipe = ModelRecipe("hf", SMALL, PretrainConfig(max_steps=3, batch_size=64))
    reference = train_model(tmp_path / "model", recipe, data["train"], accelerator)
    record = json.loads((tmp_path / "model" / RECORD_FILE).read_text())
    assert record["finished"] and record["result"]["fingerprint"] == load_backbone(reference).fingerprint
    weights = tmp_path / "model" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert train_model(tmp_path / "model", recipe, data["train"], accelerator) == reference
    assert weights.stat().st_mtime_ns == stamp  # skipped
    train_model(tmp_path / "model", ModelRecipe("hf", SMALL, PretrainConfig(max_steps=4, batch_size=64)), data["train"],
                accelerator)
    assert weights.stat().st_mtime_ns != stamp  # another recipe retrains


def _assert_new_beats_old(pair):
    images, captions = read_split(pair.test)
    old = evaluate_model(load_backbone(pair.old), images, captions, ks=(1, 5))
    new = evaluate_model(load_backbone(pair.new), images, captions, ks=(1, 5))
    for direction in old:
        assert new[direction][1] > old[direction][1] + 3, (old, new)
        assert new[direction][5] > old[direction][5] + 10, (old, new)
    return old, new


@pytest.mark.slow
def test_trained_pair_new_clearly_beats_old(trained_pair):
    assert trained_pair.old.startswith("open_clip:") and trained_pair.new.startswith("hf:")
    assert (trained_pair.train / "metadata.jsonl").is_file() and trained_pair.corpus.is_file()
    _assert_new_beats_old(trained_pair)


@pytest.mark.slow
def test_reverse_backend_pair_on_the_second_domain(tmp_path):
    pair = tiny_pair(tmp_path, domain="patterns", seed=1, backends=("hf", "open_clip"))
    assert pair.old.startswith("hf:") and pair.new.startswith("open_clip:")
    _assert_new_beats_old(pair)
