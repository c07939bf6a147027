"""Both backends, with tiny real models saved in their own libraries' formats."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from xbt import InputError, ModelLoadError, load_backbone
from xbt.demo.models import BUILDERS, TinyClipConfig, build_clip_tokenizer

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
    with pytest.raises(ValueError, match="towers must be"):
        tiny_encoders["hf"].lora_target_modules(("audio",))


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
    assert json.loads(out.stdout)["embed_dim"] == 32
    bad = subprocess.run(xbt + ["info", "hf:/not/here"], capture_output=True, text=True)
    assert bad.returncode == 2 and "does not exist" in bad.stderr
