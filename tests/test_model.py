"""XBTModel with tiny real models of both backends (old and new always on different backends)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from xbt import load_backbone
from xbt.demo.models import BUILDERS, TinyClipConfig
from xbt.errors import FingerprintMismatchError, InputError, ModelLoadError
from xbt.model import AdapterConfig, XBTModel, blend_embeddings
from xbt.projection import Projection, ProjectionConfig

TEXTS = ["a red circle", "two blue squares on grass", "a small green triangle", "a yellow star at the top"]
OLD_DIM = 24


@pytest.fixture(scope="module")
def old_refs(tmp_path_factory) -> dict[str, str]:
    """An OLD tiny model per backend, with its own dimension so space mix-ups cannot pass."""
    root = tmp_path_factory.mktemp("old_models")
    config = TinyClipConfig(embed_dim=OLD_DIM, width=32, seed=1)
    return {backend: build(root / backend, config) for backend, build in BUILDERS.items()}


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(5)]


def other(backend: str) -> str:
    return "hf" if backend == "open_clip" else "open_clip"


def make_model(new_ref: str, old_ref: str, adapter: AdapterConfig | None = None, perturb: bool = True) -> XBTModel:
    """A fresh XBTModel; with ``perturb`` its LoRA B matrices are random so the adapters change outputs."""
    backbone, old = load_backbone(new_ref), load_backbone(old_ref)
    torch.manual_seed(3)
    projection = Projection.build(backbone.embed_dim, old.embed_dim, ProjectionConfig(kind="mlp"),
                                  source_space=backbone.fingerprint, target_space=old.fingerprint)
    model = XBTModel(backbone, projection, adapter, old_reference=old_ref)
    if perturb:
        with torch.no_grad():
            for name, parameter in backbone.model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0.0, 0.2)
    return model.eval()


def test_lora_placement_follows_the_presets(backend, tiny_refs, old_refs, images):
    adapter = AdapterConfig(lora_towers=["text"], lora_layers=["mlp"], lora_rank=4)
    model = make_model(tiny_refs[backend], old_refs[other(backend)], adapter)
    names = [name for name, _ in model.backbone.model.named_parameters() if "lora_" in name]
    assert names and all(("text" in n or n.startswith("transformer.")) and "visual" not in n and "vision" not in n
                         for n in names)
    assert all(("mlp" in n) and "attn" not in n for n in names)
    assert all(p.shape[0] == 4 or p.shape[1] == 4 for p in model.lora_parameters())
    # Only the adapters train; the vision tower is untouched, so xbt image vectors are plain ψ(new image).
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and n.startswith("backbone.")]
    assert trainable and all("lora_" in n for n in trainable)
    native_images = model.encode_image(images, space="new")
    assert torch.allclose(model.encode_image(images), model._project(native_images), atol=1e-6)
    native_texts = model.encode_text(TEXTS, space="new")
    assert not torch.allclose(model.encode_text(TEXTS), model._project(native_texts), atol=1e-3)


def test_encodes_in_old_space_and_native_new_space(backend, tiny_refs, old_refs, images):
    model = make_model(tiny_refs[backend], old_refs[other(backend)])
    plain = load_backbone(tiny_refs[backend])
    texts, pictures = model.encode_text(TEXTS), model.encode_image(images)
    assert texts.shape == (len(TEXTS), OLD_DIM) and pictures.shape == (len(images), OLD_DIM)
    assert texts.dtype == torch.float32 and torch.allclose(texts.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)
    # space="new" is the untouched new model, from the same object, with the adapters live.
    assert torch.allclose(model.encode_text(TEXTS, space="new"), plain.encode_text(TEXTS), atol=1e-6)
    assert torch.allclose(model.encode_image(images, space="new"), plain.encode_image(images), atol=1e-6)
    # ... and the adapters really change the old-space output.
    assert not torch.allclose(texts, model._project(plain.encode_text(TEXTS)), atol=1e-3)
    with pytest.raises(InputError, match="space must be one of"):
        model.encode_text(TEXTS, space="old")


def test_fresh_adapter_is_identity(backend, tiny_refs, old_refs, images):
    model = make_model(tiny_refs[backend], old_refs[other(backend)], perturb=False)
    plain = load_backbone(tiny_refs[backend])
    assert torch.allclose(model.encode_image(images), model._project(plain.encode_image(images)), atol=1e-6)


def test_save_and_from_pretrained_give_identical_embeddings(backend, tiny_refs, old_refs, images, tmp_path):
    model = make_model(tiny_refs[backend], old_refs[other(backend)], AdapterConfig(lora_rank=4, lora_alpha=8))
    model.training_summary = {"steps": 3}
    folder = model.save_pretrained(tmp_path / "adapter")
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "projection.safetensors", "xbt_config.json"]
    config = json.loads((folder / "xbt_config.json").read_text())
    assert config["new_model"]["fingerprint"] == model.backbone.fingerprint
    assert config["old_model"]["reference"] == old_refs[other(backend)]
    assert config["lora"]["lora_rank"] == 4 and config["training"] == {"steps": 3}

    loaded = XBTModel.from_pretrained(folder)  # rebuilds the backbone from the recorded reference
    assert loaded.fingerprint == model.fingerprint != make_model(tiny_refs[backend], old_refs[other(backend)],
                                                                 perturb=False).fingerprint
    assert torch.equal(loaded.encode_text(TEXTS), model.encode_text(TEXTS))
    assert torch.equal(loaded.encode_image(images), model.encode_image(images))
    # The files are plain peft: PeftModel can read them onto the bare backbone too.
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(load_backbone(tiny_refs[backend]).model, str(folder))
    peft_state = {k.replace("base_model.model.", "").replace(".default", ""): v
                  for k, v in peft_model.state_dict().items() if "lora_" in k}
    ours = {k.replace(".default", ""): v for k, v in model.backbone.model.state_dict().items() if "lora_" in k}
    assert peft_state.keys() == ours.keys() and all(torch.equal(peft_state[k], ours[k]) for k in ours)


def test_peft_multihead_attention_behaviour_is_recorded_and_checked(backend, tiny_refs, old_refs, tmp_path):
    from xbt.model import mha_out_proj_factor

    model = make_model(tiny_refs[backend], old_refs[other(backend)], AdapterConfig(lora_layers=["attention"]))
    folder = model.save_pretrained(tmp_path / "adapter")
    config = json.loads((folder / "xbt_config.json").read_text())
    recorded = config["lora"]["peft_mha_out_proj_factor"]
    # open_clip attention is nn.MultiheadAttention (peft adapts the module); transformers uses Linear layers.
    assert recorded == (mha_out_proj_factor() if backend == "open_clip" else None)
    if backend == "open_clip":
        config["lora"]["peft_mha_out_proj_factor"] = 3 - recorded  # as if trained under the other peft behaviour
        (folder / "xbt_config.json").write_text(json.dumps(config))
        with pytest.raises(ModelLoadError, match="MultiheadAttention LoRA applies the out_proj update"):
            XBTModel.from_pretrained(folder)


def test_wrong_backbone_is_refused(backend, tiny_refs, old_refs, tmp_path):
    model = make_model(tiny_refs[backend], old_refs[other(backend)])
    folder = model.save_pretrained(tmp_path / "adapter")
    wrong = load_backbone(BUILDERS[backend](tmp_path / "other", TinyClipConfig(seed=5)))
    with pytest.raises(FingerprintMismatchError) as caught:
        XBTModel.from_pretrained(folder, backbone=wrong)
    assert model.backbone.fingerprint in str(caught.value) and wrong.fingerprint in str(caught.value)
    with pytest.raises(ModelLoadError, match="not an xbt adapter directory"):
        XBTModel.from_pretrained(tmp_path / "other")
    with pytest.raises(InputError, match="already carries LoRA"):
        XBTModel(model.backbone, model.projection)


def test_merge_gives_the_same_embeddings(backend, tiny_refs, old_refs, images):
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = make_model(tiny_refs[backend], old_refs[other(backend)])
    texts, pictures = model.encode_text(TEXTS), model.encode_image(images)
    model.merge()
    assert not any(isinstance(m, BaseTunerLayer) for m in model.backbone.model.modules())
    assert not any("lora_" in name for name in model.backbone.model.state_dict())
    assert torch.allclose(model.encode_text(TEXTS), texts, atol=1e-5)
    assert torch.allclose(model.encode_image(images), pictures, atol=1e-5)
    with pytest.raises(InputError, match="merged"):
        model.encode_text(TEXTS, space="new")


def test_query_blending(backend, tiny_refs, old_refs):
    old_ref = old_refs[other(backend)]
    model = make_model(tiny_refs[backend], old_ref)
    adapted = model.encode_text(TEXTS)
    assert model._old_encoder is None  # loaded lazily, only when blending is asked for
    old = load_backbone(old_ref).encode_text(TEXTS)
    assert torch.allclose(model.encode_text(TEXTS, blend_old=1.0), old, atol=1e-5)
    assert model._old_encoder is not None and "_old_encoder" not in dict(model.named_children())
    half = model.encode_text(TEXTS, blend_old=0.5, blend_method="slerp")
    # The spherical midpoint is equally far from both ends.
    assert torch.allclose((half * adapted).sum(-1), (half * old).sum(-1), atol=1e-4)
    linear = model.encode_text(TEXTS, blend_old=0.3)
    assert torch.allclose(linear, torch.nn.functional.normalize(0.7 * adapted + 0.3 * old, dim=-1), atol=1e-5)
    with pytest.raises(FingerprintMismatchError):
        model.use_old_encoder(load_backbone(tiny_refs[backend]))
    with pytest.raises(InputError, match="between 0 and 1"):
        blend_embeddings(adapted, old, 1.5)
