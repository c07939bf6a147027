"""``xbt export``: exported checkpoints load without xbt and give XBTModel's vectors.

The equivalence battery builds tiny real adapters (non-zero LoRA, an old model of ANOTHER
dimension), exports each one, and loads every export in ONE subprocess in which importing
xbt raises ImportError and the repository is not on the path, with the export's own
library only (transformers, open_clip, onnxruntime). Its vectors must equal
``XBTModel.encode_text/encode_image`` within 1e-5 (float32).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xbt import load_backbone
from xbt.demo.models import BUILDERS, FAMILY_BUILDERS, TinyClipConfig
from xbt.errors import InputError, ModelLoadError
from xbt.export import ExportConfig, choose_format, fold_linear, fold_right, run, unfoldable_reason
from xbt.model import XBTModel
from xbt.projection import Projection

OLD_DIM = 24
TEXTS = ["a red circle", "two blue squares on the green grass near a tall tree", "a star", "a small triangle"]
TOLERANCE = 1e-5

# (backbone family, requested format, ψ kind, format the export must end up in)
EXPORTS = [
    ("clip", "native", "orthogonal", "native"),
    ("open_clip", "native", "orthogonal", "native"),
    ("clip", "onnx", "mlp", "onnx"),
    ("open_clip", "onnx", "mlp", "onnx"),
    ("clip", "auto", "linear-no-bias", "native"),  # a linear ψ whose bias is zero folds too
    ("open_clip", "auto", "linear", "onnx"),       # a bias does not: auto goes to ONNX
    ("siglip", "auto", "orthogonal", "onnx"),      # SigLIP has no projection to fold into: auto goes to ONNX
]

# Runs in the subprocess: only the export's own libraries, never xbt.
LOADER = r'''
import importlib.abc, json, sys

class BlockXBT(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "xbt" or name.startswith("xbt."):
            raise ImportError(f"import of {name} is blocked: exports must load without xbt")
        return None

sys.meta_path.insert(0, BlockXBT())
try:
    import xbt  # noqa: F401
    raise SystemExit("the xbt import blocker does not work")
except ImportError:
    pass

import numpy as np
from PIL import Image

def encode(folder, texts, images):
    manifest = json.load(open(f"{folder}/xbt_export.json"))
    kind = (manifest["backend"], manifest["format"])
    if kind == ("hf", "native"):
        import torch, transformers
        model = transformers.CLIPModel.from_pretrained(folder).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        processor = transformers.AutoImageProcessor.from_pretrained(folder)
        tokens = tokenizer(texts, **manifest["tokenizer"]["call"], return_tensors="pt")
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            outputs = [model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]),
                       model.get_image_features(pixel_values=pixels)]
        outputs = [o if isinstance(o, torch.Tensor) else o.pooler_output for o in outputs]
        assert model.config.projection_dim == manifest["dim"]
        return [torch.nn.functional.normalize(o, dim=-1).numpy() for o in outputs]
    if kind == ("open_clip", "native"):
        import torch, open_clip
        model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
        tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
        with torch.no_grad():
            return [model.eval().encode_text(tokenizer(texts), normalize=True).numpy(),
                    model.encode_image(torch.stack([preprocess(i) for i in images]), normalize=True).numpy()]
    import onnxruntime
    graphs = manifest["onnx"]
    if manifest["backend"] == "hf":
        import transformers
        tokens = transformers.AutoTokenizer.from_pretrained(folder)(texts, **manifest["tokenizer"]["call"],
                                                                    return_tensors="np")
        processor = transformers.AutoImageProcessor.from_pretrained(folder)
        pixels = processor(images=images, return_tensors="np")["pixel_values"]
        feeds = {name: tokens[name].astype(np.int64) for name in graphs["text"]["inputs"]}
    else:
        import torch, open_clip
        from open_clip.transform import PreprocessCfg, image_transform_v2
        preprocess = image_transform_v2(PreprocessCfg(**json.load(open(f"{folder}/open_clip_config.json"))
                                                      ["preprocess_cfg"]), is_train=False)
        feeds = {"input_ids": open_clip.get_tokenizer(f"local-dir:{folder}")(texts).numpy()}
        pixels = torch.stack([preprocess(i) for i in images]).numpy()
    def session(name):
        return onnxruntime.InferenceSession(f"{folder}/{graphs[name]['file']}", providers=["CPUExecutionProvider"])
    return [session("text").run([graphs["text"]["output"]], feeds)[0],
            session("image").run([graphs["image"]["output"]], {"pixel_values": pixels.astype(np.float32)})[0]]

spec = json.loads(sys.argv[1])
images = [Image.open(path).convert("RGB") for path in spec["images"]]
for name, folder in spec["exports"].items():
    text, image = encode(folder, spec["texts"], images)
    np.save(f"{spec['out']}/{name}.text.npy", text)
    np.save(f"{spec['out']}/{name}.image.npy", image)
assert not any(m == "xbt" or m.startswith("xbt.") for m in sys.modules)
'''


@pytest.fixture(scope="module")
def new_refs(tmp_path_factory, tiny_refs) -> dict[str, str]:
    """A NEW model per backbone family."""
    siglip = FAMILY_BUILDERS["siglip"](tmp_path_factory.mktemp("siglip") / "model", TinyClipConfig(seed=0))
    return {"clip": tiny_refs["hf"], "open_clip": tiny_refs["open_clip"], "siglip": siglip}


@pytest.fixture(scope="module")
def old_ref(tmp_path_factory) -> str:
    """The OLD model: its own dimension, so an export that kept the new dimension cannot pass."""
    return BUILDERS["open_clip"](tmp_path_factory.mktemp("old") / "model",
                                 TinyClipConfig(embed_dim=OLD_DIM, width=32, seed=1))


def save_adapter(folder: Path, new_ref: str, old_ref: str, kind: str) -> Path:
    """A saved adapter with random (non-zero) LoRA B matrices; ``linear-no-bias`` is a zero-bias linear ψ."""
    backbone, old = load_backbone(new_ref), load_backbone(old_ref)
    torch.manual_seed(3)
    spaces = {"source_space": backbone.fingerprint, "target_space": old.fingerprint}
    if kind == "linear-no-bias":
        projection = Projection.from_linear_map(torch.randn(OLD_DIM, backbone.embed_dim), **spaces)
    else:
        projection = Projection(backbone.embed_dim, OLD_DIM, kind=kind,
                                extra_dims=2 if kind == "orthogonal" else 0, **spaces)
    model = XBTModel(backbone, projection, old_reference=old_ref, old_model_id=old.model_id)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            # LoRA B starts at zero and the MLP's last layer too: make both matter
            if "lora_B" in name or "residual.2" in name or (kind == "linear" and name == "projection.linear.bias"):
                parameter.normal_(0.0, 0.2)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for index, (height, width) in enumerate([(40, 48), (64, 50), (32, 32)]):
        path = folder / f"image{index}.png"
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def exported(tmp_path_factory, new_refs, old_ref, image_files) -> dict[str, dict]:
    """Every row of EXPORTS exported, loaded without xbt in one subprocess; per row: vectors, manifest, adapter."""
    root = tmp_path_factory.mktemp("exports")
    rows = {}
    for family, requested, kind, _ in EXPORTS:
        name = f"{family}-{requested}-{kind}"
        adapter = save_adapter(root / f"{name}-adapter", new_refs[family], old_ref, kind)
        output = root / f"{name}-export"
        assert run([str(adapter), "--output_dir", str(output), "--format", requested]) == 0
        rows[name] = {"adapter": adapter, "folder": output,
                      "manifest": json.loads((output / "xbt_export.json").read_text())}
    vectors = root / "vectors"
    vectors.mkdir()
    spec = {"exports": {name: str(row["folder"]) for name, row in rows.items()}, "texts": TEXTS,
            "images": image_files, "out": str(vectors)}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", LOADER, json.dumps(spec)], cwd=root, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    for name, row in rows.items():
        row["text"] = np.load(vectors / f"{name}.text.npy")
        row["image"] = np.load(vectors / f"{name}.image.npy")
    return rows


@pytest.mark.slow
@pytest.mark.parametrize(("family", "requested", "kind", "chosen"), EXPORTS,
                         ids=[f"{f}-{r}-{k}" for f, r, k, _ in EXPORTS])
def test_export_loads_without_xbt_and_gives_xbt_vectors(exported, image_files, family, requested, kind, chosen):
    row = exported[f"{family}-{requested}-{kind}"]
    manifest = row["manifest"]
    reference = XBTModel.from_pretrained(row["adapter"])
    assert manifest["format"] == chosen and manifest["family"] == family
    assert manifest["dim"] == OLD_DIM and manifest["projection"]["folded"] == (chosen == "native")
    assert manifest["space_id"] == reference.space_id and manifest["source_space_id"] == reference.source_space_id
    assert manifest["adapter"]["model_id"] == reference.model_id and manifest["xbt_version"]
    assert manifest["verified_max_abs_diff"] <= TOLERANCE  # export_adapter checked itself through the same files
    expected_text, expected_image = reference.encode_text(TEXTS).numpy(), reference.encode_image(image_files).numpy()
    assert row["text"].dtype == np.float32 and row["text"].shape == (len(TEXTS), OLD_DIM)
    assert row["image"].shape == (len(image_files), OLD_DIM)
    assert np.abs(row["text"] - expected_text).max() <= TOLERANCE
    assert np.abs(row["image"] - expected_image).max() <= TOLERANCE
    # the adapter really changes the vectors: the export is not just ψ over the plain new model
    plain = reference.projection(reference.encode_text(TEXTS, space="source")).detach().numpy()
    assert np.abs(plain - expected_text).max() > 1e-2


def test_fold_formulas_equal_psi_after_normalisation():
    generator = torch.Generator().manual_seed(0)
    hidden, old_dim = torch.randn(5, 16, generator=generator), 6
    layer = torch.nn.Linear(16, 10, bias=True)
    matrix = torch.randn(old_dim, 10, generator=generator, dtype=torch.float64)
    normalize = torch.nn.functional.normalize
    with torch.no_grad():
        expected = normalize(normalize(layer(hidden), dim=-1).double() @ matrix.T, dim=-1)
        assert torch.allclose(normalize(fold_linear(layer, matrix)(hidden), dim=-1).double(), expected, atol=1e-6)
        parameter = layer.weight.T.contiguous()  # open_clip's layout: x @ P
        expected = normalize(normalize(hidden @ parameter, dim=-1).double() @ matrix.T, dim=-1)
        assert torch.allclose(normalize(hidden @ fold_right(parameter, matrix), dim=-1).double(), expected, atol=1e-6)


@pytest.mark.parametrize(("kind", "bias", "reason"), [
    ("orthogonal", None, None),
    ("linear", 0.0, None),
    ("linear", 0.1, "non-zero bias"),
    ("mlp", 0.0, "'mlp'"),
])
def test_which_psi_folds(kind, bias, reason):
    projection = Projection(8, 4, kind=kind)
    if bias is not None:
        torch.nn.init.constant_(projection.linear.bias, bias)
    found = unfoldable_reason(projection)
    assert found is None if reason is None else reason in found


@pytest.fixture(scope="module")
def mlp_adapter(tmp_path_factory, tiny_refs, old_ref) -> Path:
    return save_adapter(tmp_path_factory.mktemp("mlp") / "adapter", tiny_refs["open_clip"], old_ref, "mlp")


@pytest.fixture(scope="module")
def orthogonal_adapter(tmp_path_factory, tiny_refs, old_ref) -> Path:
    return save_adapter(tmp_path_factory.mktemp("orth") / "adapter", tiny_refs["open_clip"], old_ref, "orthogonal")


def _non_empty(folder: Path) -> Path:
    folder.mkdir()
    (folder / "keep.txt").write_text("user data")
    return folder


REFUSALS = [
    # (name, argv builder, error type, words the one-line message must contain)
    ("native-mlp", lambda a, o, tmp: [str(a["mlp"]), "--output_dir", str(o), "--format", "native"],
     InputError, ["'mlp'", "--kind orthogonal", "--format onnx"]),
    ("missing-adapter", lambda a, o, tmp: ["--adapter", str(tmp / "no_such_adapter"), "--output_dir", str(o)],
     ModelLoadError, ["no_such_adapter", "does not exist"]),
    ("output-not-empty", lambda a, o, tmp: [str(a["orthogonal"]), "--output_dir", str(_non_empty(o))],
     InputError, ["not empty", "--overwrite"]),
    ("output-is-adapter", lambda a, o, tmp: [str(a["orthogonal"]), "--output_dir", str(a["orthogonal"]),
                                             "--overwrite"],
     InputError, ["holds the adapter"]),
    ("bad-format", lambda a, o, tmp: [str(a["orthogonal"]), "--output_dir", str(o), "--format", "tflite"],
     InputError, ["--format", "tflite", "native"]),
]


@pytest.mark.parametrize(("name", "argv", "error", "words"), REFUSALS, ids=[row[0] for row in REFUSALS])
def test_refusals(tmp_path, mlp_adapter, orthogonal_adapter, name, argv, error, words):
    output = tmp_path / "out"
    adapters = {"mlp": mlp_adapter, "orthogonal": orthogonal_adapter}
    before = sorted(p.name for p in orthogonal_adapter.iterdir())
    with pytest.raises(error) as raised:
        run(argv(adapters, output, tmp_path))
    message = str(raised.value)
    assert "\n" not in message and all(word in message for word in words), message
    # nothing half-written: no export, no staging folder, the user's files and the adapter untouched
    assert not (output / "xbt_export.json").exists()
    assert not any(p.name.startswith(".out.partial-") for p in tmp_path.iterdir())
    assert sorted(p.name for p in orthogonal_adapter.iterdir()) == before
    if (output / "keep.txt").exists():
        assert (output / "keep.txt").read_text() == "user data"


def test_overwrite_replaces_a_non_empty_output(tmp_path, orthogonal_adapter):
    output = _non_empty(tmp_path / "out")
    assert run(["--adapter", str(orthogonal_adapter), "--output_dir", str(output), "--overwrite"]) == 0
    assert sorted(p.name for p in output.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors",
                                                        "xbt_export.json"]
    assert json.loads((output / "open_clip_config.json").read_text())["model_cfg"]["embed_dim"] == OLD_DIM


def test_auto_without_onnx_names_the_kind_and_the_foldable_option():
    with pytest.raises(InputError, match=r"'mlp'.*onnx package is not installed.*--kind orthogonal"):
        choose_format("auto", Projection(8, 4, kind="mlp"), onnx_available=False)
    assert choose_format("auto", Projection(8, 4, kind="orthogonal"), onnx_available=False) == "native"


def test_config_file_and_help(tmp_path, capsys):
    config = tmp_path / "export.yaml"
    config.write_text("format: native\nopset: 10\n")
    with pytest.raises(InputError, match="--opset must be an ONNX opset version of 14 or higher, got 10"):
        run(["adapter", "--output_dir", str(tmp_path / "out"), "--config", str(config)])
    with pytest.raises(SystemExit) as raised:
        run(["--help"])
    assert raised.value.code == 0 and "--format" in capsys.readouterr().out
    assert ExportConfig(adapter="a", output_dir="b").format == "auto"


def _open_clip_resnet(refs):
    from open_clip.model import CLIP

    from xbt.backbones.open_clip import OpenClipEncoder

    config = {"embed_dim": 16, "vision_cfg": {"layers": [1, 1, 1, 1], "width": 8, "image_size": 32},
              "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}
    clip = load_backbone(refs["open_clip"])
    return OpenClipEncoder(clip.reference, CLIP(**config), clip.preprocess, clip.tokenizer, config)


@pytest.mark.parametrize(("build", "names"), [(lambda refs: load_backbone(refs["siglip"]), "SigLIP"),
                                              (_open_clip_resnet, "ModifiedResNet")],
                         ids=["siglip", "open_clip-resnet"])
def test_backbones_without_foldable_projections_go_to_onnx(new_refs, build, names):
    from xbt.export import backbone_unfoldable_reason

    backbone = build(new_refs)
    reason = backbone_unfoldable_reason(backbone)
    assert names in reason
    projection = Projection(16, 4, kind="orthogonal")  # a ψ that would fold
    with pytest.raises(InputError, match=f"{names}.*--format onnx"):
        choose_format("native", projection, onnx_available=True, backbone_reason=reason)
    assert choose_format("auto", projection, onnx_available=True, backbone_reason=reason) == "onnx"
    for family in ("clip", "open_clip"):
        assert backbone_unfoldable_reason(load_backbone(new_refs[family])) is None


def test_an_export_that_does_not_reproduce_the_adapter_is_not_written(tmp_path, orthogonal_adapter, monkeypatch):
    import xbt.export
    from xbt.errors import XBTError

    true_matrix = xbt.export.psi_matrix
    # a fold with the old-space coordinates in the wrong order: right shapes, wrong vectors
    monkeypatch.setattr(xbt.export, "psi_matrix", lambda projection: true_matrix(projection).flip(0))
    with pytest.raises(XBTError, match="does not reproduce the adapter's vectors"):
        run([str(orthogonal_adapter), "--output_dir", str(tmp_path / "out")])
    assert list(tmp_path.iterdir()) == []
