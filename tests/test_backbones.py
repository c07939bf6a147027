"""Both backends, with tiny real models saved in their own libraries' formats; the family registry."""

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from xbt import InputError, ModelLoadError, load_backbone
from xbt.backbones import FAMILIES, DualEncoder, families, family_for, register
from xbt.demo.models import BUILDERS, FAMILY_BUILDERS, TinyClipConfig, build_clip_tokenizer
from xbt.references import BACKENDS

CAPTIONS = ["a red circle on grass", "two blue squares", "a small green triangle at the top left"]


def _images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(3)]


def test_both_modalities_encode_to_unit_vectors(tiny_encoders, backend):
    encoder = tiny_encoders[backend]
    text = encoder.encode_text(CAPTIONS)
    image = encoder.encode_image(_images())
    for embedding, count in ((text, len(CAPTIONS)), (image, 3)):
        assert embedding.dtype == torch.float32 and embedding.device.type == "cpu"
        assert embedding.shape == (count, encoder.embed_dim)
        torch.testing.assert_close(embedding.norm(dim=-1), torch.ones(count))
    assert not torch.allclose(text[0], text[1])


def test_batching_and_preprocessed_tensors_give_the_same_embeddings(tiny_encoders, backend):
    encoder = tiny_encoders[backend]
    torch.testing.assert_close(encoder.encode_text(CAPTIONS, batch_size=1), encoder.encode_text(CAPTIONS),
                               atol=1e-5, rtol=0)
    pixels = encoder.preprocess_images(_images())
    assert pixels.shape == (3, 3, encoder.image_size, encoder.image_size)
    torch.testing.assert_close(encoder.encode_image(pixels, batch_size=2), encoder.encode_image(_images()),
                               atol=1e-5, rtol=0)


def test_image_paths_and_modes_are_accepted(tiny_encoders, backend, tmp_path):
    encoder = tiny_encoders[backend]
    grey = Image.new("L", (32, 32), 200)
    transparent = Image.new("RGBA", (32, 32), (10, 20, 30, 0))
    sixteen = Image.fromarray(np.full((32, 32), 65535, dtype=np.uint16))
    cmyk = Image.new("CMYK", (32, 32), (0, 0, 0, 0))
    path = tmp_path / "grey.png"
    grey.save(path)
    out = encoder.encode_image([grey, transparent, sixteen, cmyk, path])
    white = encoder.encode_image([Image.new("RGB", (32, 32), (255, 255, 255))])[0]
    torch.testing.assert_close(out[0], out[4])  # from disk == in memory
    for index in (1, 2, 3):  # all three are white once converted
        torch.testing.assert_close(out[index], white, atol=1e-5, rtol=0)


def test_reload_gives_identical_embeddings_and_fingerprint(tiny_refs, tiny_encoders, backend, tmp_path):
    first = tiny_encoders[backend]
    # Moving the folder keeps the fingerprint: it names the model, not its location.
    moved = tmp_path / "moved"
    shutil.copytree(first.reference.path, moved)
    prefix = "hf:" if backend == "hf" else "open_clip:local-dir:"
    second = load_backbone(prefix + str(moved))
    assert second.fingerprint == first.fingerprint
    assert torch.equal(second.encode_text(CAPTIONS), first.encode_text(CAPTIONS))
    assert torch.equal(second.encode_image(_images()), first.encode_image(_images()))


def test_fingerprints_differ_between_models_and_weights(tiny_encoders, tmp_path):
    assert tiny_encoders["hf"].fingerprint != tiny_encoders["open_clip"].fingerprint
    other_seed = load_backbone(BUILDERS["open_clip"](tmp_path / "seed1", TinyClipConfig(seed=1)))
    assert other_seed.fingerprint != tiny_encoders["open_clip"].fingerprint
    # One weight nudged by one ulp-scale step changes it too.
    folder = tmp_path / "nudged"
    shutil.copytree(tiny_encoders["open_clip"].reference.path, folder)
    weights = load_file(folder / "open_clip_model.safetensors")
    weights["text_projection"][0, 0] += 1e-3
    save_file(weights, folder / "open_clip_model.safetensors")
    assert load_backbone(f"open_clip:local-dir:{folder}").fingerprint != tiny_encoders["open_clip"].fingerprint


# Computed on main before the backbones became a registry (same seed-0 tiny models): artefacts depend on
# these, so the fingerprint bytes and the preset regexes (recorded in every adapter) must never change.
PINNED = {
    "open_clip": ("open_clip-a82b1d66b1f299f7",
                  r"(?:visual\.transformer\.resblocks\.\d+\.attn)|(?:visual\.transformer\.resblocks\.\d+\.mlp\.(?:c_fc|c_proj))"
                  r"|(?:(?:text\.)?transformer\.resblocks\.\d+\.attn)|(?:(?:text\.)?transformer\.resblocks\.\d+\.mlp\.(?:c_fc|c_proj))"),
    "hf": ("hf-dcbcf360c7af9ac7",
           r"(?:vision_model\.encoder\.layers\.\d+\.self_attn\.(?:q_proj|k_proj|v_proj|out_proj))"
           r"|(?:vision_model\.encoder\.layers\.\d+\.mlp\.(?:fc1|fc2))"
           r"|(?:text_model\.encoder\.layers\.\d+\.self_attn\.(?:q_proj|k_proj|v_proj|out_proj))"
           r"|(?:text_model\.encoder\.layers\.\d+\.mlp\.(?:fc1|fc2))"),
}


def test_fingerprints_and_default_lora_targets_are_pinned(tiny_encoders, backend):
    fingerprint, targets = PINNED[backend]
    assert tiny_encoders[backend].fingerprint == fingerprint
    assert tiny_encoders[backend].lora_target_modules() == targets


def test_fingerprint_is_stable_across_processes(tiny_refs, tiny_encoders):
    code = (f"from xbt import load_backbone; print(load_backbone({tiny_refs['hf']!r}).fingerprint)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == tiny_encoders["hf"].fingerprint


def test_hf_tokenizer_matches_open_clip_ids(tiny_encoders):
    hf = tiny_encoders["hf"].tokenize(CAPTIONS)
    oc = tiny_encoders["open_clip"].tokenize(CAPTIONS)["input_ids"]
    for row, mask, reference in zip(hf["input_ids"], hf["attention_mask"], oc):
        ids = row[mask.bool()].tolist()
        assert ids == reference[: len(ids)].tolist()
        assert reference[len(ids):].eq(0).all()
    assert len(build_clip_tokenizer()) == 49408


@pytest.mark.parametrize("towers, layers", [(("vision",), ("attention",)), (("text",), ("mlp",)),
                                            (("vision", "text"), ("attention", "mlp"))])
def test_lora_presets_select_the_named_tower_and_layers(tiny_encoders, backend, towers, layers):
    import re

    encoder = tiny_encoders[backend]
    regex = encoder.lora_target_modules(towers, layers)
    selected = [name for name, _ in encoder.model.named_modules() if re.fullmatch(regex, name)]
    assert selected
    is_vision = ("visual." if backend == "open_clip" else "vision_model.")
    assert {name.startswith(is_vision) for name in selected} == {t == "vision" for t in towers}
    attention_words = ("attn",)
    kinds = {"attention" if any(w in name for w in attention_words) else "mlp" for name in selected}
    assert kinds == set(layers)


def test_lora_preset_rejects_unknown_names(tiny_encoders):
    with pytest.raises(InputError, match="towers must be"):
        tiny_encoders["hf"].lora_target_modules(("audio",))


def _lora_modules(reference: str, target_modules) -> list[str]:
    """Names of the modules peft actually wraps with LoRA for ``target_modules`` (fresh backbone)."""
    from peft import LoraConfig, inject_adapter_in_model

    model = load_backbone(reference).model
    inject_adapter_in_model(LoraConfig(r=2, target_modules=target_modules), model)
    # peft wraps a MultiheadAttention's inner out_proj too ("....attn.base_layer.out_proj"): part of the target.
    return sorted(name for name, module in model.named_modules() if hasattr(module, "lora_A")
                  and ".base_layer." not in name)


@pytest.mark.parametrize("backend, target_modules, expected", [
    ("hf", r"text_model\.encoder\.layers\.0\.mlp\.fc1", ["text_model.encoder.layers.0.mlp.fc1"]),
    ("hf", ["q_proj", "v_proj"], sorted(f"{tower}_model.encoder.layers.{i}.self_attn.{p}_proj" for tower in
                                        ("text", "vision") for i in (0, 1) for p in ("q", "v"))),
    ("open_clip", r"visual\.transformer\.resblocks\.1\.attn", ["visual.transformer.resblocks.1.attn"]),
    ("open_clip", ["c_fc"], sorted(f"{prefix}transformer.resblocks.{i}.mlp.c_fc" for prefix in ("", "visual.")
                                   for i in (0, 1))),
], ids=["hf-regex", "hf-names", "open_clip-regex", "open_clip-names"])
def test_explicit_target_modules_override_the_presets(tiny_refs, tiny_encoders, backend, target_modules, expected):
    # The preset arguments (vision attention only) are ignored once targets are explicit.
    given = tiny_encoders[backend].lora_target_modules(("vision",), ("attention",), target_modules=target_modules)
    assert given == target_modules and type(given) is type(target_modules)
    assert _lora_modules(tiny_refs[backend], given) == expected


@pytest.mark.parametrize("target_modules, words", [
    (r"text_model\.nothing\.\d+", "matches no module"),
    (["q_proj", "query"], r"\['query'\] match no module"),
    ([], "non-empty list"),
    ("(", "not a valid regex"),
])
def test_explicit_target_modules_that_select_nothing_are_refused(tiny_encoders, target_modules, words):
    with pytest.raises(InputError, match=words) as caught:
        tiny_encoders["hf"].lora_target_modules(target_modules=target_modules)
    if "match" in words:
        assert "Valid names include: text_model.encoder.layers.0.self_attn.k_proj" in str(caught.value)


# -- the family registry -----------------------------------------------------------------
@pytest.mark.parametrize("family, config, dim, prefix, wrong_prefix, wrong_words", [
    ("open_clip", TinyClipConfig(), 32, "open_clip:local-dir:", "hf:", "no config.json"),
    ("clip", TinyClipConfig(embed_dim=24), 24, "hf:", "open_clip:local-dir:", "no open_clip_config.json"),
    ("siglip", TinyClipConfig(width=48), 48, "hf:", "open_clip:local-dir:", "no open_clip_config.json"),
])
def test_each_family_loads_through_its_prefix(tmp_path, family, config, dim, prefix, wrong_prefix, wrong_words):
    reference = FAMILY_BUILDERS[family](tmp_path / family, config)
    assert reference.startswith(prefix)
    encoder = load_backbone(reference)
    assert type(encoder) is FAMILIES[family] and encoder.family == family
    assert encoder.backend == prefix.partition(":")[0] and encoder.fingerprint.startswith(encoder.backend + "-")
    assert encoder.embed_dim == encoder.dim == dim
    assert encoder.encode_text(CAPTIONS).shape == (len(CAPTIONS), dim)
    assert encoder.encode_image(_images()).shape == (3, dim)
    assert str(encoder.reference) == reference
    with pytest.raises(ModelLoadError, match=wrong_words):
        load_backbone(wrong_prefix + str(encoder.reference.path))


def test_every_reference_prefix_has_a_family_and_no_family_another_prefix():
    assert {cls.backend for cls in families()} == set(BACKENDS)
    assert set(FAMILIES) == set(FAMILY_BUILDERS)
    assert [cls.family for cls in families("hf")] == ["clip", "siglip"]
    assert family_for("open_clip") is FAMILIES["open_clip"] and family_for("hf", "siglip") is FAMILIES["siglip"]


def _family(name: str, backend: str, model_type: str | None, base: type = DualEncoder) -> type:
    return type(f"Fake{name}", (base,), {"family": name, "backend": backend, "model_type": model_type})


@pytest.mark.parametrize("make, words", [
    (lambda: _family("new", "timm", None), "not a reference prefix"),
    (lambda: _family("clip", "hf", "other", FAMILIES["clip"]), "registered twice"),
    (lambda: _family("clip2", "hf", "siglip", FAMILIES["clip"]), "distinct model_type"),
    (lambda: _family("clip3", "hf", None, FAMILIES["clip"]), "distinct model_type"),
    (lambda: _family("own_loader", "hf", "own", FAMILIES["open_clip"]), "inherit the loader"),
], ids=["unknown-prefix", "same-name", "same-model-type", "no-model-type", "other-loader"])
def test_register_refuses_inconsistent_families(make, words):
    before = dict(FAMILIES)
    with pytest.raises(TypeError, match=words):
        register(make())
    assert FAMILIES == before


def test_an_unregistered_hf_dual_encoder_is_refused_naming_the_supported_types(tmp_path):
    from transformers import Siglip2Config, Siglip2Model

    tower = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    Siglip2Model(Siglip2Config(text_config={**tower, "vocab_size": 64},
                               vision_config={**tower, "num_patches": 16})).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="model type 'siglip2'; supported: 'clip', 'siglip'"):
        load_backbone(f"hf:{tmp_path}")


@pytest.mark.parametrize("texts, words", [([], "empty list"), (["ok", "  "], "Text #1"), ("a string", "single string"),
                                          ([None], "Text #0")])
def test_bad_texts_are_refused(tiny_encoders, backend, texts, words):
    with pytest.raises(InputError, match=words):
        tiny_encoders[backend].encode_text(texts)


def test_bad_images_are_refused(tiny_encoders, backend, tmp_path):
    encoder = tiny_encoders[backend]
    with pytest.raises(InputError, match="empty list"):
        encoder.encode_image([])
    with pytest.raises(InputError, match=r"\(N, 3, 32, 32\)"):
        encoder.encode_image(torch.zeros(2, 3, 64, 64))
    with pytest.raises(InputError, match=r"\(N, 3, 32, 32\)"):
        encoder.encode_image(torch.zeros(3, 32, 32))
    with pytest.raises(InputError, match="does not exist"):
        encoder.encode_image([tmp_path / "nope.png"])
    with pytest.raises(InputError, match="PIL image or an image path"):
        encoder.encode_image([np.zeros((4, 4, 3))])


def test_folders_without_a_dual_encoder_are_refused(tiny_refs, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_backbone(f"hf:{empty}")
    with pytest.raises(ModelLoadError, match="no open_clip_config.json"):
        load_backbone(f"open_clip:local-dir:{empty}")
    # A transformers model that is not a dual encoder.
    from transformers import BertConfig, BertModel

    bert = tmp_path / "bert"
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=100)).save_pretrained(bert)
    with pytest.raises(ModelLoadError, match="'bert' model, not a dual encoder"):
        load_backbone(f"hf:{bert}")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "open_clip_config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not a valid open_clip config"):
        load_backbone(f"open_clip:local-dir:{broken}")


def test_pickle_only_weights_are_never_loaded(tiny_encoders, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_encoders["open_clip"].reference.path, folder)
    weights = folder / "open_clip_model.safetensors"
    torch.save(load_file(weights), folder / "open_clip_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(ModelLoadError, match="never unpickles"):
        load_backbone(f"open_clip:local-dir:{folder}")
    # A pickle beside safetensors is refused too: open_clip would prefer the .bin.
    save_file(load_file(tiny_encoders["open_clip"].reference.path / "open_clip_model.safetensors"), weights)
    with pytest.raises(ModelLoadError, match="open_clip_pytorch_model.bin"):
        load_backbone(f"open_clip:local-dir:{folder}")


def test_unknown_architecture_and_offline_tags_fail_clearly():
    with pytest.raises(ModelLoadError, match="not an open_clip architecture"):
        load_backbone("open_clip:NoSuchNet-7")
    with pytest.raises(ModelLoadError, match="unknown pretrained tag"):
        load_backbone("open_clip:ViT-B-32/nosuchtag")
    with pytest.raises(ModelLoadError, match="could not"):
        load_backbone("hf:nobody/no-such-clip")  # HF_HUB_OFFLINE=1: nothing to fetch


def test_cli_version_help_and_info(tiny_refs):
    xbt = [sys.executable, "-m", "xbt"]
    assert subprocess.run(xbt + ["--version"], capture_output=True, text=True).stdout.startswith("xbt ")
    assert "info" in subprocess.run(xbt + ["--help"], capture_output=True, text=True).stdout
    out = subprocess.run(xbt + ["info", tiny_refs["hf"]], capture_output=True, text=True, check=True)
    info = json.loads(out.stdout)
    assert (info["embed_dim"], info["backend"], info["family"]) == (32, "hf", "clip")
    bad = subprocess.run(xbt + ["info", "hf:/not/here"], capture_output=True, text=True)
    assert bad.returncode == 2 and "does not exist" in bad.stderr


def test_a_clip_variant_with_a_projection_dim_loads_as_the_clip_family(tmp_path):
    from transformers import AutoConfig, MetaClip2Config, MetaClip2Model

    # A CLIP folder (tokenizer, processor) whose model is replaced by MetaCLIP 2, an unregistered CLIP variant.
    reference = BUILDERS["hf"](tmp_path, TinyClipConfig())
    clip = AutoConfig.from_pretrained(tmp_path)
    MetaClip2Model(MetaClip2Config(text_config=clip.text_config.to_dict(), vision_config=clip.vision_config.to_dict(),
                                   projection_dim=clip.projection_dim)).save_pretrained(tmp_path)
    encoder = load_backbone(reference)
    assert type(encoder) is FAMILIES["clip"] and type(encoder.model).__name__ == "MetaClip2Model"
    assert encoder.encode_text(CAPTIONS).shape == (len(CAPTIONS), 32)
    assert any(re.fullmatch(encoder.lora_target_modules(), name) for name, _ in encoder.model.named_modules())
