"""XBTModel with tiny real models of both backends (old and new always on different backends)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from xbt import load_backbone, lora
from xbt.adapter_config import AdapterConfig
from xbt.demo.models import BUILDERS, TinyClipConfig
from xbt.errors import FingerprintMismatchError, InputError, ModelLoadError
from xbt.model import SPACES, XBTModel, blend_embeddings
from xbt.projection import Projection, ProjectionConfig
from xbt.spaces import Encoder, full_space_id

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


def perturb(parameters, seed: int = 3, std: float = 0.2) -> None:
    """Random values (LoRA B starts at zero, ψ at its init) so every weight changes the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in parameters:
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


def make_model(new_ref: str, old_ref: str, adapter: AdapterConfig | None = None, projection=ProjectionConfig(),
               random_lora: bool = True) -> XBTModel:
    """A fresh XBTModel of a fresh new backbone onto ``old_ref``'s space; with ``random_lora`` the adapters act."""
    backbone, old = load_backbone(new_ref), load_backbone(old_ref)
    torch.manual_seed(3)
    psi = Projection.build(backbone.dim, old.dim, projection, source_space=backbone.space_id,
                           target_space=old.space_id)
    model = XBTModel(backbone, psi, adapter, old_reference=old_ref, old_model_id=old.model_id)
    if random_lora:
        perturb(model.lora_parameters())
    return model.eval()


def test_lora_placement_follows_the_presets(backend, tiny_refs, old_refs, images):
    adapter = AdapterConfig(lora_towers=["text"], lora_layers=["mlp"], lora_rank=4)
    model = make_model(tiny_refs[backend], old_refs[other(backend)], adapter)
    names = [name for name, _ in model.backbone.model.named_parameters() if "lora_" in name]
    assert names and all(("text" in n or n.startswith("transformer.")) and "visual" not in n and "vision" not in n
                         for n in names)
    assert all(("mlp" in n) and "attn" not in n for n in names)
    assert all(p.shape[0] == 4 or p.shape[1] == 4 for p in model.lora_parameters())
    # Only the adapters train; the vision tower is untouched, so target-space image vectors are plain ψ(new image).
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and n.startswith("backbone.")]
    assert trainable and all("lora_" in n for n in trainable)
    native_images = model.encode_image(images, space="source")
    assert torch.allclose(model.encode_image(images), model._project(native_images), atol=1e-6)
    native_texts = model.encode_text(TEXTS, space="source")
    assert not torch.allclose(model.encode_text(TEXTS), model._project(native_texts), atol=1e-3)


# Explicit peft target_modules (suffix match) override the presets; one layer name per backend.
EXPLICIT_TARGETS = {"open_clip": ["c_fc"], "hf": ["fc1"]}


def test_explicit_target_modules_override_the_presets(backend, tiny_refs, old_refs, tmp_path):
    targets = EXPLICIT_TARGETS[backend]
    model = make_model(tiny_refs[backend], old_refs[other(backend)],
                       AdapterConfig(lora_towers=["text"], lora_layers=["attention"], target_modules=targets))
    adapted = {name.rsplit(".lora_", 1)[0] for name, _ in model.backbone.model.named_parameters() if "lora_" in name}
    assert adapted and all(name.endswith(f".{targets[0]}") for name in adapted)
    assert any("visual" in name or "vision" in name for name in adapted)  # not the text/attention preset
    model.save_pretrained(tmp_path / "adapter")
    loaded = XBTModel.from_pretrained(tmp_path / "adapter")
    assert loaded.adapter.target_modules == targets
    assert torch.equal(loaded.encode_text(TEXTS), model.encode_text(TEXTS))
    with pytest.raises(InputError, match="target_modules \\['no_such_layer'\\] match no module"):
        make_model(tiny_refs[backend], old_refs[other(backend)], AdapterConfig(target_modules=["no_such_layer"]))


def test_encodes_in_target_space_and_native_source_space(backend, tiny_refs, old_refs, images):
    model = make_model(tiny_refs[backend], old_refs[other(backend)])
    plain = load_backbone(tiny_refs[backend])
    texts, pictures = model.encode_text(TEXTS), model.encode_image(images)
    assert texts.shape == (len(TEXTS), OLD_DIM) and pictures.shape == (len(images), OLD_DIM)
    assert texts.dtype == torch.float32 and torch.allclose(texts.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)
    # space="source" is the untouched new model, from the same object, with the adapters live.
    assert torch.allclose(model.encode_text(TEXTS, space="source"), plain.encode_text(TEXTS), atol=1e-6)
    assert torch.allclose(model.encode_image(images, space="source"), plain.encode_image(images), atol=1e-6)
    assert all(p.requires_grad for p in model.lora_parameters())  # switching adapters off keeps them trainable
    # ... and the adapters really change the target-space output.
    assert not torch.allclose(texts, model._project(plain.encode_text(TEXTS)), atol=1e-3)
    assert SPACES == ("target", "source", "full")
    with pytest.raises(InputError, match="space must be one of"):
        model.encode_text(TEXTS, space="old")
    with pytest.raises(InputError, match="space='full' needs a ψ with extra dims"):
        model.encode_image(images, space="full")


def test_fresh_adapter_is_identity(backend, tiny_refs, old_refs, images):
    model = make_model(tiny_refs[backend], old_refs[other(backend)], random_lora=False)
    plain = load_backbone(tiny_refs[backend])
    assert torch.allclose(model.encode_image(images), model._project(plain.encode_image(images)), atol=1e-6)


def test_save_and_from_pretrained_give_identical_embeddings(backend, tiny_refs, old_refs, images, tmp_path):
    model = make_model(tiny_refs[backend], old_refs[other(backend)], AdapterConfig(lora_rank=4, lora_alpha=8))
    model.training_summary = {"steps": 3}
    folder = tmp_path / "adapter"
    model.save_pretrained(folder)
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "projection/README.md",
        "projection/config.json", "projection/model.safetensors", "xbt_config.json"]
    config = json.loads((folder / "xbt_config.json").read_text())
    old = load_backbone(old_refs[other(backend)])
    assert config["new_model"]["fingerprint"] == model.backbone.fingerprint
    assert config["old_model"] == {"reference": old_refs[other(backend)], "fingerprint": old.model_id,
                                   "embed_dim": OLD_DIM}
    assert (config["source_space"], config["target_space"]) == (model.backbone.space_id, old.space_id)
    assert config["model_id"] == model.model_id
    assert config["lora"]["lora_rank"] == 4 and config["training"] == {"steps": 3}

    loaded = XBTModel.from_pretrained(folder)  # rebuilds the backbone from the recorded reference
    assert loaded.fingerprint == model.fingerprint != make_model(tiny_refs[backend], old_refs[other(backend)],
                                                                 random_lora=False).fingerprint
    assert torch.equal(loaded.encode_text(TEXTS), model.encode_text(TEXTS))
    assert torch.equal(loaded.encode_image(images), model.encode_image(images))
    # The files are plain peft: PeftModel can read them onto the bare backbone too.
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(load_backbone(tiny_refs[backend]).model, str(folder))
    peft_state = {k.replace("base_model.model.", "").replace(".default", ""): v
                  for k, v in peft_model.state_dict().items() if "lora_" in k}
    ours = {k.replace(".default", ""): v for k, v in model.backbone.model.state_dict().items() if "lora_" in k}
    assert peft_state.keys() == ours.keys() and all(torch.equal(peft_state[k], ours[k]) for k in ours)


# Every ψ kind with a non-default constructor argument: it must come back exactly.
PROJECTIONS = [
    ProjectionConfig(kind="linear"),
    ProjectionConfig(kind="mlp", hidden_dim=7),
    ProjectionConfig(kind="orthogonal", extra_dims=5),
]


@pytest.mark.parametrize("shape", PROJECTIONS, ids=lambda shape: shape.kind)
def test_every_projection_kind_round_trips_in_the_format_stage_1_writes(shape, tiny_refs, old_refs, images,
                                                                        tmp_path):
    model = make_model(tiny_refs["hf"], old_refs["open_clip"], AdapterConfig(lora_rank=2), projection=shape)
    perturb(model.projection.parameters(), seed=4, std=0.3)
    model.save_pretrained(tmp_path / "adapter")
    model.projection.save_pretrained(tmp_path / "stage1")  # what `xbt pretrain-text` writes
    inside, alone = tmp_path / "adapter" / "projection", tmp_path / "stage1"
    assert json.loads((inside / "config.json").read_text()) == json.loads((alone / "config.json").read_text())
    stored, written = load_file(inside / "model.safetensors"), load_file(alone / "model.safetensors")
    assert stored.keys() == written.keys() and all(torch.equal(stored[k], written[k]) for k in stored)

    loaded = XBTModel.from_pretrained(tmp_path / "adapter", backbone=load_backbone(tiny_refs["hf"]))
    psi = loaded.projection
    assert (psi.kind, psi.extra_dims, psi.source_space, psi.target_space) == (
        shape.kind, shape.extra_dims, model.projection.source_space, model.projection.target_space)
    if shape.hidden_dim:
        assert psi.residual[0].out_features == shape.hidden_dim
    spaces = ("target", "full") if shape.extra_dims else ("target",)
    for space in spaces:
        assert torch.equal(loaded.encode_text(TEXTS, space=space), model.encode_text(TEXTS, space=space))
        assert torch.equal(loaded.encode_image(images, space=space), model.encode_image(images, space=space))


def test_spaces_of_an_adapter_and_of_a_chained_one(tiny_refs, old_refs, images, tmp_path):
    old, new = load_backbone(old_refs["open_clip"]), load_backbone(tiny_refs["hf"])
    v2 = make_model(tiny_refs["hf"], old_refs["open_clip"], projection=ProjectionConfig(kind="orthogonal",
                                                                                         extra_dims=3))
    assert (v2.space_id, v2.dim, v2.source_space_id) == (old.space_id, old.dim, new.space_id)
    assert v2.model_id not in (old.model_id, new.model_id, old.space_id, new.space_id)
    # The full vectors (BT²/OCA) live in the adapter's own space; their first dims are the compatible part.
    full = v2.encode_image(images, space="full")
    assert full.shape == (len(images), OLD_DIM + 3) and v2.full_space_id == full_space_id(v2.model_id)
    torch.testing.assert_close(torch.nn.functional.normalize(full[:, :OLD_DIM], dim=-1), v2.encode_image(images))
    # An encoder of another space is refused for blending, naming both spaces.
    with pytest.raises(FingerprintMismatchError) as caught:
        v2.use_old_encoder(new)
    assert old.space_id in str(caught.value) and new.space_id in str(caught.value)

    # Chained: v3 is trained against v2 (the old side is an adapter); it writes into v1's space.
    backbone = load_backbone(tiny_refs["open_clip"])
    psi = Projection(backbone.dim, v2.dim, kind="linear", source_space=backbone.space_id, target_space=v2.space_id)
    v3 = XBTModel(backbone, psi, old_model_id=v2.model_id)
    assert v3.space_id == old.space_id != v2.model_id and v3.model_id != v2.model_id
    v3.use_old_encoder(v2)  # same space: accepted, and blending uses it
    torch.testing.assert_close(v3.encode_text(TEXTS, blend_old=1.0), v2.encode_text(TEXTS))
    v3.save_pretrained(tmp_path / "v3")
    config = json.loads((tmp_path / "v3" / "xbt_config.json").read_text())
    assert (config["target_space"], config["old_model"]["fingerprint"]) == (old.space_id, v2.model_id)

    # v2's full space is an encoder's space like any other: an old side by its id, with no special case.
    full = v2.full_encoder()
    assert isinstance(full, Encoder) and (full.space_id, full.dim, full.model_id) == (
        v2.full_space_id, OLD_DIM + 3, v2.model_id)
    torch.testing.assert_close(full.encode_image(images), v2.encode_image(images, space="full"))
    psi = Projection(backbone.dim, full.dim, kind="linear", source_space=backbone.space_id, target_space=full.space_id)
    onto_full = XBTModel(load_backbone(tiny_refs["open_clip"]), psi, old_model_id=v2.model_id)
    assert onto_full.space_id == v2.full_space_id and onto_full.dim == full.dim
    onto_full.use_old_encoder(full)
    torch.testing.assert_close(onto_full.encode_text(TEXTS, blend_old=1.0), v2.encode_text(TEXTS, space="full"))
    with pytest.raises(FingerprintMismatchError):
        onto_full.use_old_encoder(v2)  # v2's compatible (old-space) vectors are another space
    with pytest.raises(InputError, match="space='full' needs a ψ with extra dims"):
        v3.full_encoder()


def test_peft_multihead_attention_behaviour_is_recorded_and_checked(backend, tiny_refs, old_refs, tmp_path):
    model = make_model(tiny_refs[backend], old_refs[other(backend)], AdapterConfig(lora_layers=["attention"]))
    folder = tmp_path / "adapter"
    model.save_pretrained(folder)
    config = json.loads((folder / "xbt_config.json").read_text())
    recorded = config["lora"]["peft_mha_out_proj_factor"]
    # open_clip attention is nn.MultiheadAttention (peft adapts the module); transformers uses Linear layers.
    assert recorded == (lora.mha_out_proj_factor() if backend == "open_clip" else None)
    if backend == "open_clip":
        config["lora"]["peft_mha_out_proj_factor"] = 3 - recorded  # as if trained under the other peft behaviour
        (folder / "xbt_config.json").write_text(json.dumps(config))
        with pytest.raises(ModelLoadError, match="MultiheadAttention LoRA applies the out_proj update"):
            XBTModel.from_pretrained(folder)


def _attention_by_hand(x, in_weight, in_bias, out_weight, out_bias, heads: int) -> torch.Tensor:
    """nn.MultiheadAttention's batch-first self-attention, written out with plain tensor ops."""
    batch, length, width = x.shape
    q, k, v = (x @ in_weight.T + in_bias).chunk(3, dim=-1)
    split = [t.reshape(batch, length, heads, width // heads).transpose(1, 2) for t in (q, k, v)]
    scores = split[0] @ split[1].transpose(-1, -2) / math.sqrt(width // heads)
    mixed = (scores.softmax(-1) @ split[2]).transpose(1, 2).reshape(batch, length, width)
    return mixed @ out_weight.T + out_bias


def test_multihead_attention_lora_factor_against_an_independent_forward():
    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True).double()
    base = {name: tensor.clone() for name, tensor in holder.attn.state_dict().items()}
    rank, alpha = 2, 6.0
    lora.inject(holder, AdapterConfig(lora_rank=rank, lora_alpha=alpha), ["attn"], "probe")
    perturb(lora.lora_parameters(holder), seed=1, std=0.3)
    state = dict(lora.lora_state(holder))
    scale = alpha / rank
    in_delta = scale * state["attn.lora_B.default.weight"] @ state["attn.lora_A.default.weight"]
    out_delta = scale * (state["attn.base_layer.out_proj.lora_B.default.weight"]
                         @ state["attn.base_layer.out_proj.lora_A.default.weight"])
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    with torch.no_grad():
        adapted = holder.attn(x, x, x, need_weights=False)[0]
    by_hand = {factor: _attention_by_hand(x, base["in_proj_weight"] + in_delta, base["in_proj_bias"],
                                          base["out_proj.weight"] + factor * out_delta, base["out_proj.bias"], 2)
               for factor in (1, 2)}
    matching = [factor for factor, output in by_hand.items() if torch.allclose(output, adapted, atol=1e-10)]
    assert matching == [lora.mha_out_proj_factor()]
    lora.merge(holder)
    assert type(holder.attn) is torch.nn.MultiheadAttention and not lora.has_lora(holder)
    torch.testing.assert_close(holder.attn.in_proj_weight.detach(), base["in_proj_weight"] + in_delta)
    torch.testing.assert_close(holder.attn.out_proj.weight.detach(),
                               base["out_proj.weight"] + matching[0] * out_delta)
    with torch.no_grad():
        torch.testing.assert_close(holder.attn(x, x, x, need_weights=False)[0], adapted, atol=1e-10, rtol=0)


def test_wrong_backbone_and_broken_directories_are_refused(backend, tiny_refs, old_refs, tmp_path):
    model = make_model(tiny_refs[backend], old_refs[other(backend)])
    folder = tmp_path / "adapter"
    model.save_pretrained(folder)
    wrong = load_backbone(BUILDERS[backend](tmp_path / "other", TinyClipConfig(seed=5)))
    with pytest.raises(FingerprintMismatchError) as caught:
        XBTModel.from_pretrained(folder, backbone=wrong)
    assert model.backbone.fingerprint in str(caught.value) and wrong.fingerprint in str(caught.value)
    with pytest.raises(ModelLoadError, match="not an xbt adapter directory"):
        XBTModel.from_pretrained(tmp_path / "other")
    for missing in (tmp_path / "nowhere", "./nowhere"):
        with pytest.raises(ModelLoadError, match="nowhere' does not exist"):
            XBTModel.from_pretrained(missing)
    with pytest.raises(InputError, match="already carries LoRA"):
        XBTModel(model.backbone, model.projection)
    config = json.loads((folder / "xbt_config.json").read_text())
    (folder / "xbt_config.json").write_text(json.dumps({**config, "model_id": "xbt-0000000000000000"}))
    with pytest.raises(ModelLoadError, match="records xbt-0000000000000000: the adapter directory is inconsistent"):
        XBTModel.from_pretrained(folder)
    (folder / "xbt_config.json").write_text(json.dumps({**config, "format_version": 1}))
    with pytest.raises(ModelLoadError, match="format 1"):
        XBTModel.from_pretrained(folder)
    # ψ as a pickle only: refused before anything is unpickled.
    (folder / "xbt_config.json").write_text(json.dumps(config))
    (folder / "projection" / "model.safetensors").rename(folder / "projection" / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="missing projection/model.safetensors"):
        XBTModel.from_pretrained(folder)


def test_merge_gives_the_same_embeddings(backend, tiny_refs, old_refs, images):
    model = make_model(tiny_refs[backend], old_refs[other(backend)])
    texts, pictures = model.encode_text(TEXTS), model.encode_image(images)
    model.merge()
    assert not any(type(m).__module__.startswith("peft") for m in model.backbone.model.modules())
    assert not any("lora_" in name for name in model.backbone.model.state_dict())
    assert torch.allclose(model.encode_text(TEXTS), texts, atol=1e-5)
    assert torch.allclose(model.encode_image(images), pictures, atol=1e-5)
    with pytest.raises(InputError, match="merged"):
        model.encode_text(TEXTS, space="source")


def _lerp(a: np.ndarray, b: np.ndarray, alpha: float) -> np.ndarray:
    mixed = (1 - alpha) * a + alpha * b
    return mixed / np.linalg.norm(mixed, axis=-1, keepdims=True)


def _slerp(a: np.ndarray, b: np.ndarray, alpha: float) -> np.ndarray:
    angle = np.arccos(np.clip((a * b).sum(-1, keepdims=True), -1, 1))
    return (np.sin((1 - alpha) * angle) * a + np.sin(alpha * angle) * b) / np.sin(angle)


@pytest.mark.parametrize("method,formula", [("linear", _lerp), ("slerp", _slerp)])
def test_query_blending_mixes_in_the_old_encoders_vectors(method, formula, tiny_refs, old_refs):
    old_ref = old_refs["open_clip"]
    model = make_model(tiny_refs["hf"], old_ref)
    adapted = model.encode_text(TEXTS).double().numpy()
    assert model._old_encoder is None  # loaded lazily, only when blending is asked for
    old = load_backbone(old_ref).encode_text(TEXTS).double().numpy()
    assert np.abs(adapted - old).max() > 0.1  # the two ends differ, so every mix below is a real constraint
    blends = {}
    for alpha in (0.0, 0.3, 1.0):
        blends[alpha] = model.encode_text(TEXTS, blend_old=alpha, blend_method=method).double().numpy()
        np.testing.assert_allclose(blends[alpha], formula(adapted, old, alpha), atol=1e-5)
    assert model._old_encoder is not None and "_old_encoder" not in dict(model.named_children())
    # The old encoder really ran: the inner blend is neither end, and the endpoints are the two encoders.
    assert min(np.abs(blends[0.3] - blends[0.0]).max(), np.abs(blends[0.3] - blends[1.0]).max()) > 1e-2
    with pytest.raises(InputError, match="between 0 and 1"):
        blend_embeddings(torch.from_numpy(adapted), torch.from_numpy(old), 1.5)
    with pytest.raises(InputError, match="cannot be used with space='source'"):
        model.encode_text(TEXTS, space="source", blend_old=0.5)


# Each bad AdapterConfig value: the message names the option and the value.
BAD_ADAPTERS = [
    ({"lora_rank": 0}, "lora_rank must be at least 1, got 0"),
    ({"lora_rank": -3}, "lora_rank must be at least 1, got -3"),
    ({"lora_alpha": 0.0}, "lora_alpha must be greater than 0, got 0.0"),
    ({"lora_dropout": 1.0}, "lora_dropout must be in [0, 1), got 1.0"),
    ({"lora_towers": ["audio"]}, "lora_towers must be one or more of ['vision', 'text'], got ['audio']"),
    ({"lora_layers": []}, "lora_layers must be one or more of ['attention', 'mlp'], got []"),
    ({"target_modules": []}, "target_modules must be one or more module names (or one regex), got []"),
]


@pytest.mark.parametrize("options,message", BAD_ADAPTERS, ids=[str(o) for o, _ in BAD_ADAPTERS])
def test_bad_adapter_options_are_input_errors(options, message):
    with pytest.raises(InputError) as caught:
        AdapterConfig(**options)
    assert str(caught.value) == message
