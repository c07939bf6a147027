"""SigLIP through transformers: a tiny SiglipModel built from its config, as a backbone, as new and as old model."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from xbt import ModelLoadError, load_backbone
from xbt.backbones import FAMILIES, LAYER_KINDS, TOWERS
from xbt.demo.models import TinyClipConfig, build_hf_siglip
from xbt.model import XBTModel
from xbt.projection import Projection

WIDTH = 48  # SigLIP's joint dimension is its hidden width; unlike the tiny CLIPs' 32
CONTEXT = 16
CAPTIONS = ["a red circle on grass", "two blue squares", "a small green triangle at the top left of a picture"]


@pytest.fixture(scope="module")
def siglip_ref(tmp_path_factory) -> str:
    return build_hf_siglip(tmp_path_factory.mktemp("siglip"), TinyClipConfig(width=WIDTH, context_length=CONTEXT))


@pytest.fixture(scope="module")
def siglip(siglip_ref):
    return load_backbone(siglip_ref)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(4)]


# -- as a backbone ---------------------------------------------------------------------
def test_an_hf_siglip_folder_loads_as_the_siglip_family(siglip):
    from transformers import CLIPTokenizer, SiglipImageProcessor, SiglipModel

    assert type(siglip) is FAMILIES["siglip"] and (siglip.family, siglip.backend) == ("siglip", "hf")
    assert isinstance(siglip.model, SiglipModel) and not hasattr(siglip.model.config, "projection_dim")
    # The tokenizer and image processor saved with the model came back through the reference.
    assert isinstance(siglip.tokenizer, CLIPTokenizer)
    assert isinstance(siglip.preprocess.processor, SiglipImageProcessor)
    assert siglip.embed_dim == siglip.dim == WIDTH and siglip.image_size == 32


def test_texts_are_padded_to_max_length_without_an_attention_mask(siglip):
    tokens = siglip.tokenize(CAPTIONS[:2])
    assert set(tokens) == {"input_ids"} and tokens["input_ids"].shape == (2, CONTEXT)
    pad = siglip.tokenizer.pad_token_id
    assert tokens["input_ids"][0, -1] == pad and tokens["input_ids"][1, -1] == pad
    # SigLIP pools the last position: only max_length padding makes a text's vector independent of its batch.
    torch.testing.assert_close(siglip.encode_text(CAPTIONS, batch_size=1), siglip.encode_text(CAPTIONS),
                               atol=1e-5, rtol=0)


def test_embeddings_equal_siglip_models_own_forward_pass(siglip, images):
    texts, pictures = siglip.encode_text(CAPTIONS), siglip.encode_image(images)
    for embedding, count in ((texts, len(CAPTIONS)), (pictures, len(images))):
        assert embedding.dtype == torch.float32 and embedding.shape == (count, WIDTH)
        torch.testing.assert_close(embedding.norm(dim=-1), torch.ones(count))
    assert not torch.allclose(texts[0], texts[1])
    # Independent computation, as transformers documents SigLIP: padding="max_length", input ids only.
    ids = siglip.tokenizer(CAPTIONS, padding="max_length", max_length=CONTEXT, return_tensors="pt")["input_ids"]
    pixels = siglip.preprocess.processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        output = siglip.model(input_ids=ids, pixel_values=pixels)
    torch.testing.assert_close(texts, output.text_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(pictures, output.image_embeds, atol=1e-5, rtol=0)


def test_fingerprint_is_stable_under_a_move_and_changes_with_the_weights(siglip, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(siglip.reference.path, moved)
    again = load_backbone(f"hf:{moved}")
    assert again.fingerprint == siglip.fingerprint and again.fingerprint.startswith("hf-")
    assert torch.equal(again.encode_text(CAPTIONS), siglip.encode_text(CAPTIONS))
    other = load_backbone(build_hf_siglip(tmp_path / "seed1", TinyClipConfig(width=WIDTH, context_length=CONTEXT,
                                                                             seed=1)))
    assert other.fingerprint != siglip.fingerprint


@pytest.mark.parametrize("tower, kind", [(t, k) for t in TOWERS for k in LAYER_KINDS])
def test_lora_presets_select_the_tower_and_kind_and_never_the_pooling_head(siglip, tower, kind):
    regex = siglip.lora_target_modules((tower,), (kind,))
    selected = [name for name, _ in siglip.model.named_modules() if re.fullmatch(regex, name)]
    leaves = ("q_proj", "k_proj", "v_proj", "out_proj") if kind == "attention" else ("fc1", "fc2")
    expected = [f"{tower}_model.encoder.layers.{i}.{'self_attn' if kind == 'attention' else 'mlp'}.{leaf}"
                for i in range(2) for leaf in leaves]
    assert sorted(selected) == sorted(expected)


def _save_variant(folder, **changes) -> str:
    """A tiny SigLIP whose config differs by ``changes`` (text_/vision_ prefixed), weights only."""
    from transformers import SiglipConfig, SiglipModel

    tower = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    text = {**tower, "vocab_size": 64, **{k[5:]: v for k, v in changes.items() if k.startswith("text_")}}
    vision = {**tower, "image_size": 16, "patch_size": 8,
              **{k[7:]: v for k, v in changes.items() if k.startswith("vision_")}}
    SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).save_pretrained(folder)
    return f"hf:{folder}"


@pytest.mark.parametrize("changes, words", [
    ({"vision_vision_use_head": False}, "no pooling head"),
    ({"text_projection_size": 8}, "text embeddings have 8 dimensions but image embeddings 16"),
])
def test_siglip_configs_without_one_shared_space_are_refused(tmp_path, changes, words):
    with pytest.raises(ModelLoadError, match=words):
        load_backbone(_save_variant(tmp_path, **changes))


# -- as the new and as the old model of an XBTModel ------------------------------------------
def _train_briefly(model: XBTModel, images, steps: int = 3) -> None:
    """A few contrastive steps on one tiny batch: the LoRA weights (B starts at zero) must move."""
    backbone = model.backbone
    pixels, tokens = backbone.preprocess_images(images), backbone.tokenize(CAPTIONS + ["a yellow star"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        image, text = model(pixels=pixels, tokens=tokens)
        logits = image @ text.T / 0.07
        labels = torch.arange(len(images))
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    assert all(p.abs().sum() > 0 for n, p in backbone.model.named_parameters() if "lora_B" in n)


@pytest.mark.parametrize("role", ["new", "old"])
def test_siglip_as_the_new_or_the_old_model_round_trips(role, siglip_ref, tiny_refs, images, tmp_path):
    new_ref, old_ref = (siglip_ref, tiny_refs["open_clip"]) if role == "new" else (tiny_refs["hf"], siglip_ref)
    new, old = load_backbone(new_ref), load_backbone(old_ref)
    assert (new if role == "new" else old).family == "siglip"
    torch.manual_seed(0)
    projection = Projection(new.embed_dim, old.embed_dim, kind="linear", source_space=new.space_id,
                            target_space=old.space_id)
    model = XBTModel(new, projection, old_reference=old_ref)
    assert model.lora_parameters()
    _train_briefly(model, images)
    texts, pictures = model.encode_text(CAPTIONS), model.encode_image(images)
    assert texts.shape == (len(CAPTIONS), old.embed_dim) and pictures.shape == (len(images), old.embed_dim)
    assert model.space_id == old.space_id and model.source_space_id == new.space_id
    # The adapters act, and switching them off gives the plain new backbone back.
    native = model.encode_text(CAPTIONS, space="source")
    assert not torch.allclose(new.encode_text(CAPTIONS), native, atol=1e-3)  # the backbone now carries live LoRA
    torch.testing.assert_close(native, load_backbone(new_ref).encode_text(CAPTIONS), atol=1e-5, rtol=0)

    model.save_pretrained(tmp_path / "adapter")
    loaded = XBTModel.from_pretrained(tmp_path / "adapter")
    assert loaded.backbone.family == new.family and loaded.space_id == old.space_id
    torch.testing.assert_close(loaded.encode_text(CAPTIONS), texts, atol=1e-5, rtol=0)
    torch.testing.assert_close(loaded.encode_image(images), pictures, atol=1e-5, rtol=0)
    # The old side is used as such: blending loads the old text encoder from its reference.
    assert loaded.old_encoder().family == old.family
    assert loaded.encode_text(CAPTIONS, blend_old=0.5).shape == (len(CAPTIONS), old.embed_dim)
