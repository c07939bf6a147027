import pytest

from xbt import ModelReferenceError, parse_reference
from xbt.references import BACKENDS


@pytest.mark.parametrize("text, backend, kind, name, pretrained", [
    ("open_clip:ViT-B-32/openai", "open_clip", "builtin", "ViT-B-32", "openai"),
    ("open_clip:ViT-B-32", "open_clip", "builtin", "ViT-B-32", None),
    ("open_clip:hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "open_clip", "hub",
     "laion/CLIP-ViT-B-32-laion2B-s34B-b79K", None),
    ("hf:openai/clip-vit-base-patch32", "hf", "hub", "openai/clip-vit-base-patch32", None),
])
def test_parses_remote_references(text, backend, kind, name, pretrained):
    ref = parse_reference(text)
    assert (ref.backend, ref.kind, ref.name, ref.pretrained) == (backend, kind, name, pretrained)
    assert str(ref) == text
    assert parse_reference(str(ref)) == ref


def test_parses_local_references(tmp_path):
    hf = parse_reference(f"hf:{tmp_path}")
    oc = parse_reference(f"open_clip:local-dir:{tmp_path}")
    assert (hf.backend, hf.kind, hf.path) == ("hf", "local", tmp_path.resolve())
    assert (oc.backend, oc.kind, oc.path) == ("open_clip", "local", tmp_path.resolve())
    assert parse_reference(str(oc)) == oc


@pytest.mark.parametrize("text, words", [
    ("", "Empty"),
    ("ViT-B-32/openai", "known backend"),
    ("clip:foo", "known backend"),
    ("hf:", "names no model"),
    ("open_clip:", "names no model"),
    ("hf:/definitely/not/here", "does not exist"),
    ("open_clip:local-dir:/definitely/not/here", "does not exist"),
    ("open_clip:/some/path", "local-dir:"),
    ("open_clip:hf-hub:noslash", "ORG/REPO"),
    ("hf:bad repo id", "neither an existing folder"),
    ("open_clip:ViT B/32", "malformed"),
])
def test_bad_references_say_what_is_wrong(text, words):
    with pytest.raises(ModelReferenceError, match=words):
        parse_reference(text)


def test_a_file_is_not_a_model_folder(tmp_path):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"x")
    with pytest.raises(ModelReferenceError, match="is a file"):
        parse_reference(f"hf:{path}")


@pytest.mark.parametrize("text", ["clip:foo", "siglip:/models/x", "ViT-B-32/openai"])
def test_an_unknown_prefix_is_refused_listing_every_known_prefix_and_form(text):
    with pytest.raises(ModelReferenceError, match="known backend") as caught:
        parse_reference(text)
    message = str(caught.value)
    assert all(f"{prefix}:" in message for prefix in BACKENDS)
    assert all(repr(form) in message for forms in BACKENDS.values() for form in forms)
