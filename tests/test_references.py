import pytest

from xbt import InputError, ModelReferenceError, parse_reference
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


@pytest.mark.parametrize("text, name, revision", [
    ("xbt:my-org/clip-upgrade", "my-org/clip-upgrade", None),
    ("xbt:my-org/clip-upgrade@v2.1", "my-org/clip-upgrade", "v2.1"),
    ("xbt:my-org/clip-upgrade@refs/pr/3", "my-org/clip-upgrade", "refs/pr/3"),
])
def test_parses_hub_adapter_references(text, name, revision):
    ref = parse_reference(text)
    assert (ref.backend, ref.kind, ref.name, ref.revision, ref.is_adapter) == ("xbt", "hub", name, revision, True)
    assert str(ref) == text and parse_reference(str(ref)) == ref


def test_an_adapter_folder_is_a_reference_with_or_without_the_prefix(tmp_path):
    (tmp_path / "xbt_config.json").write_text("{}")
    prefixed, bare = parse_reference(f"xbt:{tmp_path}"), parse_reference(str(tmp_path))
    assert prefixed == bare and (bare.kind, bare.path, bare.is_adapter) == ("local", tmp_path.resolve(), True)
    assert not parse_reference("hf:org/model").is_adapter


@pytest.mark.parametrize("text, words", [
    ("xbt:", "names no adapter"),
    ("xbt:/definitely/not/here", "does not exist"),
    ("xbt:noslash", "ORG/REPO"),
    ("xbt:org/repo@", "ORG/REPO"),
    ("xbt:org/repo@bad rev", "ORG/REPO"),
])
def test_bad_adapter_references_say_what_is_wrong(text, words):
    with pytest.raises(ModelReferenceError, match=words):
        parse_reference(text)


def test_a_folder_without_an_adapter_config_is_not_an_adapter(tmp_path):
    with pytest.raises(ModelReferenceError, match="holds no xbt_config.json"):
        parse_reference(f"xbt:{tmp_path}")


def test_an_adapter_is_no_backbone_and_no_new_model(tmp_path):
    from xbt import ModelLoadError, load_backbone
    from xbt.train.config import FitConfig
    from xbt.train.fit import plan

    (tmp_path / "xbt_config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="OLD side"):
        load_backbone(f"xbt:{tmp_path}")
    with pytest.raises(InputError, match="new_model: .* is an xbt adapter"):
        plan(FitConfig(old_model="hf:org/old", new_model=f"xbt:{tmp_path}", run_dir=str(tmp_path / "run"),
                       stage1={"captions": str(tmp_path / "corpus.txt")}, stage2={"source": str(tmp_path)}))
